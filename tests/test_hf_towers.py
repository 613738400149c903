"""Hugging Face CLIP and SigLIP image towers: the pruned model is the original tower run on the
SPEC-selected tokens, under both `sdpa` and `eager` attention.

The selection is checked against the attention probabilities that the block's own attention
returns under `eager` (not against the adapter's packed qkv), so a wrong projection, norm or
scale in the adapter shows up here. Tiny random configurations: width 32, 2 heads, 3 layers,
32 px images in 8 px patches (16 patches).
"""
from contextlib import contextmanager

import pytest
import torch

from tokenprune import UnsupportedModelError, pruned_block, remove_pruning, replace_last_block
from tokenprune.block import PrunedBlock
from tokenprune.config import PruneConfig
from tokenprune.reference import head_mean_attention, select_from_attention

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig,  # noqa: E402
                          CLIPVisionModel, CLIPVisionModelWithProjection, SiglipConfig,
                          SiglipModel, SiglipTextConfig, SiglipVisionConfig, SiglipVisionModel)

SHAPES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=32, patch_size=8)
PATCHES = 16
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=50, max_position_embeddings=16)


def build(name):
    torch.manual_seed(0)
    if name == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**SHAPES))
    elif name == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**SHAPES))
    elif name == "CLIPVisionModelWithProjection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**SHAPES, projection_dim=16))
    elif name == "CLIPModel":
        model = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(**TEXT).to_dict(),
                                     vision_config=SHAPES, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(**TEXT).to_dict(),
                                         vision_config=SHAPES))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name)
        return built[name]
    return get


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@contextmanager
def attention(model, implementation):
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def block_attention(vision, block, x):
    """P (B, T, T): the head mean of the probabilities the block's own attention returns under
    eager attention."""
    seen = {}
    handle = block.self_attn.register_forward_hook(lambda m, a, out: seen.update(P=out[1]))
    try:
        with attention(vision, "eager"):
            block(x, None)
    finally:
        handle.remove()
    return seen["P"].float().mean(dim=1)


def gather(x, rows):
    return torch.stack([x[b, rows[b]] for b in range(x.shape[0])])


def run_by_hand(vision, images, layer, cfg):
    """(last_hidden_state, pooler_output, keep_idx): the vision model's blocks before `layer`,
    then those from `layer` on, on the prefix + the patches SPEC selects from the attention of
    block `layer`; the post-norm and pooling as the model does them."""
    siglip = isinstance(vision, SiglipVisionModel)
    p = 0 if siglip else 1
    x = vision.embeddings(images)
    if not siglip:
        x = vision.pre_layrnorm(x)
    blocks = list(vision.encoder.layers)
    for block in blocks[:layer]:
        x = block(x, None)
    P = block_attention(vision, blocks[layer], x)
    keep = select_from_attention(P, x, cfg.k_anchors, cfg.top_m, cfg.alpha, cfg.score_norm,
                                 num_prefix=p, class_token=not siglip)
    rows = torch.cat([torch.arange(p).expand(keep.shape[0], -1), keep], dim=1)
    x = gather(x, rows)
    for block in blocks[layer:]:
        x = block(x, None)
    if siglip:
        x = vision.post_layernorm(x)
        return x, vision.head(x), keep
    return x, vision.post_layernorm(x[:, 0]), keep


def vision_of(model):
    return getattr(model, "vision_model", model)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tower_matches_the_tower_run_by_hand(models, images, name, layer, implementation):
    model = models(name)
    cfg = PruneConfig(k_anchors=3, top_m=5, layer=layer, score_norm="minmax", alpha=0.3)
    with attention(model, implementation), torch.no_grad():
        last, pooled, keep = run_by_hand(model, images, layer % 3, cfg)
        replace_last_block(model, config=cfg)
        try:
            out = model(images, output_hidden_states=True)
            block = pruned_block(model)
        finally:
            remove_pruning(model)
    assert isinstance(block, PrunedBlock) and torch.equal(block.last_keep_idx, keep)
    assert (keep >= (1 if name == "clip" else 0)).all() and keep.shape == (3, 8)
    torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=1e-5)
    # transformers' hidden-state recording still holds one entry per layer (and the embeddings),
    # with the kept tokens from the pruned layer on.
    kept = 8 + (1 if name == "clip" else 0)
    lengths = [h.shape[1] for h in out.hidden_states]
    full = PATCHES + (1 if name == "clip" else 0)
    assert lengths == [full] * (1 + layer % 3) + [kept] * (3 - layer % 3)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_adapter_qkv_gives_the_blocks_own_attention(models, images, name):
    """keep_idx is select_reference on the block's input and the adapter's qkv, and that qkv
    gives the attention probabilities the block itself computes."""
    from tokenprune import select_reference
    model = models(name)
    block = model.encoder.layers[1]
    with torch.no_grad():
        x = model.encoder.layers[0](model.embeddings(images), None)
        pruned = PrunedBlock(block, PruneConfig(k_anchors=2, top_m=4),
                             num_prefix=1 if name == "clip" else 0, class_token=name == "clip")
        pruned(x)
        qkv = pruned.adapter.qkv(x, {})
        torch.testing.assert_close(head_mean_attention(qkv, 2, pruned.adapter.scale),
                                   block_attention(model, block, x), atol=1e-6, rtol=1e-5)
        expected = select_reference(x, qkv, 2, 2, 4, 0.5, "none", pruned.num_prefix,
                                    pruned.class_token, pruned.adapter.scale)
    assert torch.equal(pruned.last_keep_idx, expected)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_nothing_to_prune_is_bit_identical(models, images, name, implementation):
    model = models(name)
    with attention(model, implementation), torch.no_grad():
        before = model(images, output_hidden_states=True)
        replace_last_block(model, k_anchors=10, top_m=PATCHES - 10, layer=1)
        try:
            with pytest.warns(UserWarning, match="nothing to prune"):
                after = model(images, output_hidden_states=True)
        finally:
            remove_pruning(model)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert torch.equal(before.pooler_output, after.pooler_output)
    assert len(after.hidden_states) == 4
    assert all(torch.equal(a, b) for a, b in zip(before.hidden_states, after.hidden_states))


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "CLIPVisionModelWithProjection"])
def test_image_text_models_prune_their_vision_model(models, images, name):
    model = models(name)
    vision = model.vision_model
    keys, originals = list(model.state_dict()), list(vision.encoder.layers)
    cfg = PruneConfig(k_anchors=2, top_m=3)
    with torch.no_grad():
        _, pooled, keep = run_by_hand(vision, images, 2, cfg)
        replace_last_block(model, config=cfg)
        try:
            assert list(model.state_dict()) == keys
            if name == "CLIPVisionModelWithProjection":
                features = model(images).image_embeds
            else:
                features = model.get_image_features(images).pooler_output
            assert pruned_block(model) is vision.encoder.layers[-1]
            assert torch.equal(pruned_block(model).last_keep_idx, keep)
        finally:
            remove_pruning(model)
    assert list(vision.encoder.layers) == originals
    expected = model.visual_projection(pooled) if name.startswith("CLIP") else pooled
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_attention_recording_under_eager(models, images):
    """output_attentions still records one map per layer; the pruned layer's is over the kept
    tokens."""
    model = models("clip")
    with attention(model, "eager"), torch.no_grad():
        replace_last_block(model, k_anchors=2, top_m=3, layer=1)
        try:
            out = model(images, output_attentions=True)
        finally:
            remove_pruning(model)
    assert [a.shape[-1] for a in out.attentions] == [17, 6, 6]


def test_llava_and_other_models_are_refused():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlamaConfig
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**SHAPES),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=50)))
    with pytest.raises(UnsupportedModelError, match="prune_image_tokens"):
        replace_last_block(llava)
    with pytest.raises(UnsupportedModelError, match="Hugging Face CLIP"):
        replace_last_block(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_triton_backend_matches_the_reference_backend(models, images, name, layer):
    model = models(name)
    outs, keeps = {}, {}
    for backend in ("reference", "triton"):
        replace_last_block(model, k_anchors=3, top_m=4, layer=layer, backend=backend)
        with torch.no_grad():
            outs[backend] = model(images[:2]).last_hidden_state
        keeps[backend] = pruned_block(model).last_keep_idx
    remove_pruning(model)
    assert torch.equal(keeps["triton"], keeps["reference"])
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=0, atol=0)


def test_the_library_works_without_transformers():
    """transformers is an extra: with it missing, tokenprune imports, prunes an OpenCLIP tower,
    and refuses other models with the usual error."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, tokenprune\n"
            "from open_clip.transformer import VisionTransformer\n"
            "tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2,"
            " mlp_ratio=2, output_dim=16).eval()\n"
            "tokenprune.replace_last_block(tower, k_anchors=2, top_m=3)\n"
            "assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 16)\n"
            "for call in (tokenprune.replace_last_block, tokenprune.prune_image_tokens):\n"
            "    try:\n"
            "        call(torch.nn.Linear(2, 2))\n"
            "    except tokenprune.UnsupportedModelError:\n"
            "        pass\n"
            "    else:\n"
            "        raise AssertionError('not refused')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
