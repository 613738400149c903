"""The drop-in API on real OpenCLIP models with random weights."""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from tokenprune import (PruneConfig, PrunedResidualAttentionBlock, PrunedVisionEncoder,
                        UnsupportedModelError, apply_pruning_to_model, pruned_block, remove_pruning,
                        replace_last_block, select_reference)


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def unpatch(vit_b16):
    yield
    remove_pruning(vit_b16)


def manual_pruned_features(visual, images, layer, cfg):
    """The tower run by hand: blocks before `layer`, then the original block on the tokens the
    reference keeps, then the later blocks, ln_post, pooling and proj, all unchanged."""
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:layer]:
        x = block(x)
    block = blocks[layer]
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    keep = select_reference(x, qkv, block.attn.num_heads, cfg.k_anchors, cfg.top_m, cfg.alpha,
                            cfg.score_norm, selection=cfg.selection, mmr_lambda=cfg.mmr_lambda)
    rows = F.pad(keep, (1, 0))
    x = torch.stack([x[b, rows[b]] for b in range(x.shape[0])])
    for block in blocks[layer:]:
        x = block(x)
    pooled, tokens = visual._pool(x)
    return pooled @ visual.proj, tokens, keep


@pytest.mark.parametrize("layer, selection", [(-1, "score"), (6, "score"), (6, "cls"),
                                              (6, "mmr")])
def test_encode_image_matches_the_tower_run_by_hand(vit_b16, images, layer, selection):
    cfg = PruneConfig(k_anchors=10, top_m=50, layer=layer, selection=selection)
    with torch.no_grad():
        expected, expected_tokens, keep = manual_pruned_features(vit_b16.visual, images, layer % 12, cfg)
        assert replace_last_block(vit_b16, config=cfg) is vit_b16
        features = vit_b16.encode_image(images)
        vit_b16.visual.output_tokens = True
        try:
            pooled, tokens = vit_b16.visual(images)
        finally:
            vit_b16.visual.output_tokens = False
    assert isinstance(vit_b16.visual.transformer.resblocks[layer], PrunedResidualAttentionBlock)
    assert torch.equal(pruned_block(vit_b16).last_keep_idx, keep)
    assert features.shape == (2, 512) and tokens.shape == (2, 60, 768)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-4, rtol=1e-4)


def test_vit_b32_defaults_prune_nothing_and_warn():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model.encode_image(images)
        replace_last_block(model)
        with pytest.warns(UserWarning, match="60 >= 49 patch tokens: nothing to prune"):
            after = model.encode_image(images)
    assert torch.equal(before, after)


def test_patching_twice_replaces_and_undo_restores(vit_b16, images):
    blocks = vit_b16.visual.transformer.resblocks
    originals = list(blocks)
    with torch.no_grad():
        before = vit_b16.encode_image(images)
        replace_last_block(vit_b16, top_m=20)
        replace_last_block(vit_b16, top_m=30, layer=4)
        assert sum(isinstance(b, PrunedResidualAttentionBlock) for b in blocks) == 1
        assert isinstance(blocks[4], PrunedResidualAttentionBlock) and blocks[11] is originals[11]
        assert pruned_block(vit_b16).config.top_m == 30
        assert vit_b16.encode_image(images).shape == before.shape
        assert remove_pruning(vit_b16) is vit_b16
        after = vit_b16.encode_image(images)
    assert list(blocks) == originals
    assert torch.equal(before, after)


def test_state_dicts_round_trip(vit_b16, images):
    torch.manual_seed(1)
    other = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    keys = list(vit_b16.state_dict())
    replace_last_block(vit_b16, layer=-2)
    assert list(vit_b16.state_dict()) == keys
    # A checkpoint of an unpatched model loads into the patched one, and back.
    saved = {k: v.clone() for k, v in vit_b16.state_dict().items()}
    vit_b16.load_state_dict(other.state_dict())
    replace_last_block(other, layer=-2)
    with torch.no_grad():
        assert torch.equal(vit_b16.encode_image(images), other.encode_image(images))
    remove_pruning(other)
    other.load_state_dict(vit_b16.state_dict())
    vit_b16.load_state_dict(saved)


def test_bad_layer_and_bad_values():
    visual = VisionTransformer(image_size=32, patch_size=4, width=64, layers=3, heads=4, mlp_ratio=2,
                               output_dim=32)
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 2\] for this 3-block tower, got 3"):
        replace_last_block(visual, layer=3)
    with pytest.raises(ValueError, match="alpha"):
        replace_last_block(visual, alpha=2)
    assert pruned_block(visual) is None


def test_custom_text_clip_and_the_seed_wrapper():
    model = open_clip.CustomTextCLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()
    images = torch.randn(3, 3, 32, 32)
    encoder = PrunedVisionEncoder(model, k_anchors=4, top_m=8)
    with torch.no_grad():
        features = encoder(images)
        assert torch.equal(model.encode_image(images), features)
    assert features.shape == (3, 32)
    assert encoder.keep_idx.shape == (3, 12) and encoder.config.k_anchors == 4
    assert isinstance(model.visual.transformer.resblocks[-1], PrunedResidualAttentionBlock)


@pytest.fixture(scope="module")
def small_clip():
    return open_clip.CustomTextCLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()


@pytest.mark.parametrize("entry", [replace_last_block, apply_pruning_to_model,
                                   PrunedVisionEncoder])
def test_config_and_keywords_together_are_refused(small_clip, entry):
    """Either a PruneConfig or the keywords: with both, one of them would be ignored."""
    name = entry.__name__
    config = PruneConfig(k_anchors=2, top_m=4)
    with pytest.raises(TypeError, match=rf"^{name}: give either config or the keywords "
                                        r"k_anchors=3, selection='mmr', not both "
                                        r"\(dataclasses.replace\(config, k_anchors=3, "):
        entry(small_clip, config=config, k_anchors=3, selection="mmr")
    # The keyword given at its default value is a keyword given all the same.
    with pytest.raises(TypeError, match=r"the keywords top_m=50, not both"):
        entry(small_clip, config=config, top_m=50)
    with pytest.raises(TypeError, match=rf"^{name}: config must be a PruneConfig, got dict"):
        entry(small_clip, config={"k_anchors": 3})
    assert pruned_block(small_clip) is None
    # Each on its own still works, the same way for every entry point.
    entry(small_clip, config=config)
    assert pruned_block(small_clip).config == config
    entry(small_clip, k_anchors=3, selection="mmr")
    assert pruned_block(small_clip).config == PruneConfig(k_anchors=3, selection="mmr")
    remove_pruning(small_clip)


class FakeCLIP(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def unsupported_models():
    resnet = FakeCLIP(ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=16))
    custom_blocks = FakeCLIP(VisionTransformer(image_size=32, patch_size=4, width=64, layers=2, heads=4,
                                               mlp_ratio=2, output_dim=32, qk_norm=True))
    return [("ModifiedResNet", resnet), ("CustomResidualAttentionBlock", custom_blocks)]


@pytest.mark.parametrize("name, model", unsupported_models())
def test_unsupported_towers(name, model):
    # Nothing was patched, so there is nothing to undo: the model comes back unchanged.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert remove_pruning(model) is model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedModelError, match=f"{name}.*tokenprune supports OpenCLIP, timm and Hugging Face models"):
        replace_last_block(model)
    with pytest.raises(UnsupportedModelError):
        apply_pruning_to_model(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=f"token pruning not applied, the model is unchanged: .*{name}"):
        assert apply_pruning_to_model(model, strict=False) is model
    assert not any(isinstance(m, PrunedResidualAttentionBlock) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="top_m"):
        apply_pruning_to_model(model, top_m=-1, strict=False)


def test_timm_convnext_tower_is_unsupported():
    pytest.importorskip("timm")
    from open_clip.timm_model import TimmModel
    model = FakeCLIP(TimmModel("convnext_atto", embed_dim=32, image_size=32))
    with pytest.raises(UnsupportedModelError, match="TimmModel with a timm ConvNeXt trunk"):
        replace_last_block(model)


@pytest.mark.parametrize("entry", [replace_last_block, apply_pruning_to_model,
                                   PrunedVisionEncoder])
def test_a_missing_model_is_named_as_such(entry):
    """None is a mistake in the call: say that a model is required, not that None is an
    unsupported tower "of type NoneType" (issue 28); strict=False does not hide it."""
    name = entry.__name__
    with pytest.raises(TypeError, match=rf"^{name}: a model is required \(.*\), got None$") as err:
        entry(None)
    assert not isinstance(err.value, UnsupportedModelError)
    with pytest.raises(TypeError, match="a model is required"):
        apply_pruning_to_model(None, strict=False)


def test_asking_an_unprunable_model_for_its_pruning_answers_none():
    """docs/api.md: pruned_block is None for a model that is not pruned; one tokenprune cannot
    prune at all is not pruned either (issue 28: it raised UnsupportedModelError)."""
    from tokenprune import pruned_blocks
    for model in (torch.nn.Linear(2, 2), unsupported_models()[0][1]):
        assert pruned_block(model) is None
        assert pruned_blocks(model) == ()


@pytest.mark.parametrize("entry", ["pruned_block", "pruned_blocks", "remove_pruning"])
def test_reading_or_undoing_the_pruning_of_none_is_refused(entry):
    """remove_pruning(None) returned None silently (issue 28); None is a mistake in the call."""
    import tokenprune
    with pytest.raises(TypeError, match=rf"^{entry}: a model is required.*, got None$"):
        getattr(tokenprune, entry)(None)
