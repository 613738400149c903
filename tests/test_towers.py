"""timm towers (SigLIP2, EVA02, PE-Core, timm ViTs): the pruned model is the original tower run
on the SPEC-selected tokens.

The selection is checked against attention probabilities captured from the block's own
(unfused) attention, not against the adapters' packed qkv, so a wrong projection, q/k norm,
rotary embedding or scale in an adapter shows up here. Towers are OpenCLIP's real
configurations with random weights and their depth cut to 3 blocks (the blocks and heads are
the real ones; only the count is smaller) at 112 px, or small timm models.
"""
from contextlib import contextmanager
from unittest import mock

import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower

from tokenprune import (PruneConfig, PrunedResidualAttentionBlock, PrunedVisionEncoder,
                        UnsupportedModelError, apply_pruning_to_model, pruned_block,
                        remove_pruning, replace_last_block)
from tokenprune.block import PrunedBlock
from tokenprune.reference import head_mean_attention, select_from_attention

timm = pytest.importorskip("timm")
from timm.layers.pos_embed_sincos import create_rope_embed  # noqa: E402
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402


# ----- helpers ------------------------------------------------------------------------------

@contextmanager
def captured_attention(block):
    """Runs the block's attention unfused and records the head-mean of its softmax
    probabilities (the input of attn_drop): P (B, T, T) as the block itself computes it."""
    attn, seen = block.attn, {}

    def record(module, args, out):
        seen["P"] = out.float().mean(dim=1)

    handle = attn.attn_drop.register_forward_hook(record)
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        yield seen
    finally:
        attn.fused_attn = fused
        handle.remove()


def block_attention(block, x, **kwargs):
    with captured_attention(block) as seen, torch.no_grad():
        block(x, **kwargs)
    return seen["P"]


def gather(x, rows):
    return torch.stack([x[b, rows[b]] for b in range(x.shape[0])])


def kept_rows(keep, num_prefix):
    prefix = torch.arange(num_prefix).expand(keep.shape[0], -1)
    return torch.cat([prefix, keep], dim=1)


def select(P, x, cfg, num_prefix, class_token):
    return select_from_attention(P, x, cfg.k_anchors, cfg.top_m, cfg.alpha, cfg.score_norm,
                                 num_prefix, class_token, cfg.selection, cfg.mmr_lambda)


def assert_close(actual, expected):
    """Equal up to float32 rounding, relative to the output's scale (random-weight towers give
    outputs of very different sizes)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def clip_tower(name, depth=3, **timm_kwargs):
    """The image tower of OpenCLIP model `name` (its TimmModel), random weights, `depth` blocks
    (and any other timm argument, e.g. img_size)."""
    cfg = open_clip.get_model_config(name)
    create = timm.create_model
    with mock.patch.object(timm, "create_model",
                           lambda *a, **kw: create(*a, depth=depth, **timm_kwargs, **kw)):
        torch.manual_seed(0)
        return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def trunk_of(model):
    return getattr(model, "trunk", model)


def run_by_hand(model, images, layer, cfg, positions="kept"):
    """The tower run block by block: the original blocks before `layer`, then the original
    blocks from `layer` on, on the prefix tokens + the patches that SPEC selects from the
    attention of block `layer`; then the final norm, pooling and head unchanged.
    positions: for rotary towers, "kept" gives later blocks the kept patches' own rotary rows,
    "first" the rows of the first n patches (wrong, to show that it matters).
    Returns (output, keep_idx)."""
    trunk = trunk_of(model)
    p = trunk.num_prefix_tokens
    x = trunk.patch_embed(images)
    if isinstance(trunk, Eva):
        x, rope = trunk._pos_embed(x)
    else:
        x, rope = trunk.patch_drop(trunk._pos_embed(x)), None
    x = trunk.norm_pre(x)
    extra = {} if rope is None else {"rope": rope}
    blocks = list(trunk.blocks)
    for block in blocks[:layer]:
        x = block(x, **extra)
    keep = select(block_attention(blocks[layer], x, **extra), x, cfg, p, trunk.cls_token is not None)
    x = gather(x, kept_rows(keep, p))
    if rope is not None:
        rows = keep - p if positions == "kept" else torch.arange(keep.shape[1]).expand_as(keep)
        if rope.dim() == 2:
            extra = {"rope": rope[rows].unsqueeze(1)}  # (B, 1, n, d), as timm's patch dropout
        else:  # already per image (B, 1, N, d), after timm's patch dropout
            extra = {"rope": torch.stack([rope[b, :, rows[b]] for b in range(len(rows))])}
    for block in blocks[layer:]:
        x = block(x, **extra)
    out = trunk.forward_head(trunk.norm(x))
    return (model.head(out) if trunk is not model else out), keep


# ----- the block adapters -------------------------------------------------------------------

C, HEADS, GRID = 64, 4, 7


def rope_table():
    return create_rope_embed(rope_type="cat", dim=C, num_heads=HEADS, feat_shape=(GRID, GRID),
                             in_pixels=False).get_embed()


def randomise(block):
    """Random values in every parameter (LayerScale, q/v biases and norms start constant)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 0.5)
    return block.eval()


BLOCKS = {
    # name: (factory, num_prefix, class_token, rotary)
    "timm Block, qk_norm, LayerScale": (
        lambda: Block(C, HEADS, qkv_bias=True, qk_norm=True, init_values=0.1), 1, True, False),
    "timm Block, no class token, 4 registers": (
        lambda: Block(C, HEADS, qkv_bias=True), 4, False, False),
    "EvaBlock, EVA02 (separate q/k/v, SwiGLU, inner norms), rotary": (
        lambda: EvaBlock(C, HEADS, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                         scale_attn_inner=True, num_prefix_tokens=1), 1, True, True),
    "EvaBlock, EVA01 (packed qkv, q/v biases), LayerScale": (
        lambda: EvaBlock(C, HEADS, qkv_fused=True, init_values=0.1, num_prefix_tokens=1),
        1, True, False),
    "EvaBlockPostNorm, EVA02-E (post-norm, separate q/k/v, SwiGLU), rotary": (
        lambda: EvaBlockPostNorm(C, HEADS, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                                 num_prefix_tokens=1), 1, True, True),
    "EvaBlock, PE-Core (AttentionRope, packed qkv), rotary": (
        lambda: EvaBlock(C, HEADS, attn_type="rope", num_prefix_tokens=1), 1, True, True),
    "EvaBlock, AttentionRope with qk_norm, gate, no class token, rotary": (
        lambda: EvaBlock(C, HEADS, attn_type="rope", qk_norm=True, gated_attn=True,
                         num_prefix_tokens=0), 0, False, True),
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("cfg", [PruneConfig(k_anchors=5, top_m=12),
                                 PruneConfig(k_anchors=2, top_m=30, alpha=0.2, score_norm="minmax"),
                                 PruneConfig(k_anchors=4, top_m=12, selection="cls"),
                                 PruneConfig(k_anchors=3, top_m=14, selection="mmr",
                                             mmr_lambda=0.6)],
                         ids=["score", "score-minmax", "cls", "mmr"])
def test_block_adapter_matches_the_block_on_the_kept_tokens(name, cfg):
    factory, p, class_token, rotary = BLOCKS[name]
    block = randomise(factory())
    torch.manual_seed(2)
    x = torch.randn(3, p + GRID * GRID, C)
    rope = rope_table() if rotary else None
    extra = {"rope": rope} if rotary else {}
    pruned = PrunedBlock(block, cfg, num_prefix=p, class_token=class_token)
    with torch.no_grad():
        out = pruned(x, **extra)
        P = block_attention(block, x, **extra)
        keep = select(P, x, cfg, p, class_token)
        kept_extra = {"rope": rope[keep - p].unsqueeze(1)} if rotary else {}
        expected = block(gather(x, kept_rows(keep, p)), **kept_extra)
        # The adapter's qkv gives the block's own attention probabilities (projections, norms,
        # rotary embedding and scale all included).
        qkv = pruned.adapter.qkv(x, rope)
        torch.testing.assert_close(head_mean_attention(qkv, HEADS, pruned.adapter.scale), P,
                                   atol=1e-5, rtol=1e-4)
    assert torch.equal(pruned.last_keep_idx, keep)
    assert (keep >= p).all() and out.shape == (3, p + cfg.kept_patches, C)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_block_state_dict_keys_and_gradients():
    block = randomise(EvaBlock(C, HEADS, qkv_fused=True, init_values=0.1)).train()
    keys = list(block.state_dict())
    pruned = PrunedBlock(block, PruneConfig(k_anchors=3, top_m=7))
    assert list(pruned.state_dict()) == keys  # gamma_1 / gamma_2 live on the block itself
    x = torch.randn(2, 1 + GRID * GRID, C, requires_grad=True)
    out = pruned(x, rope=rope_table())
    out.sum().backward()
    assert out.shape == (2, 11, C)
    assert block.attn.qkv.weight.grad is not None and block.gamma_1.grad is not None
    assert x.grad is not None


def test_block_masks_are_refused():
    pruned = PrunedBlock(Block(C, HEADS), PruneConfig(k_anchors=2, top_m=2))
    with pytest.raises(ValueError, match="attn_mask"):
        pruned(torch.randn(1, 50, C), attn_mask=torch.zeros(50, 50))


# ----- the towers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


# name -> builder; the id says what each covers.
SIZE = 112  # 7 x 7 patches of 16 px: the real blocks, a quarter of the tokens of 224 px
TOWERS = {
    "ViT-B-16-SigLIP2": lambda: clip_tower("ViT-B-16-SigLIP2", img_size=SIZE),  # no class token, map pool
    "EVA02-B-16": lambda: clip_tower("EVA02-B-16", img_size=SIZE),        # class token, rotary, q/k/v
    "PE-Core-B-16": lambda: clip_tower("PE-Core-B-16", img_size=SIZE),    # class token, rotary, map pool
    "ViTamin-S": lambda: clip_tower("ViTamin-S", img_size=SIZE),          # conv stem, no cls, avg pool
    "vit_tiny_patch16_224": lambda: timm_model("vit_tiny_patch16_224", depth=4, img_size=SIZE),
    "deit_tiny_distilled": lambda: timm_model("deit_tiny_distilled_patch16_224", depth=4,
                                              img_size=SIZE),             # class + distillation token
    "vit_tiny_reg4_gap": lambda: timm_model("vit_tiny_patch16_224", depth=4, img_size=SIZE,
                                            reg_tokens=4, class_token=False,
                                            global_pool="avg"),           # 4 registers, no class token
    "dinov2_reg4": lambda: timm_model("vit_small_patch14_reg4_dinov2", depth=3,
                                      img_size=SIZE),                     # class + 4 registers
}


def cache(builders):
    """A module-scoped fixture: get(name) builds a tower once."""
    @pytest.fixture(scope="module")
    def fixture():
        built = {}

        def get(name):
            if name not in built:
                built[name] = builders[name]()
            return built[name]

        return get
    return fixture


towers = cache(TOWERS)


@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_matches_the_tower_run_by_hand(towers, images, name, layer):
    model = towers(name)
    depth = len(trunk_of(model).blocks)
    cfg = PruneConfig(k_anchors=6, top_m=18, layer=layer)
    try:
        with torch.no_grad():
            expected, keep = run_by_hand(model, images, layer % depth, cfg)
            replace_last_block(model, config=cfg)
            out = model(images)
        block = pruned_block(model)
        assert isinstance(block, PrunedBlock) and block is trunk_of(model).blocks[layer]
        assert torch.equal(block.last_keep_idx, keep)
        assert_close(out, expected)
    finally:
        remove_pruning(model)


@pytest.mark.parametrize("selection", ["cls", "mmr"])
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "EVA02-B-16", "vit_tiny_reg4_gap",
                                  "deit_tiny_distilled"])
def test_other_selections_match_the_tower_run_by_hand(towers, images, name, selection):
    """cls and mmr in whole towers (OpenCLIP's timm towers and timm models): without a class
    token, with rotary positions, with registers, with a distillation token; a middle block."""
    model = towers(name)
    cfg = PruneConfig(k_anchors=4, top_m=14, layer=1, selection=selection, mmr_lambda=0.4)
    try:
        with torch.no_grad():
            expected, keep = run_by_hand(model, images, 1, cfg)
            replace_last_block(model, config=cfg)
            out = model(images)
        assert torch.equal(pruned_block(model).last_keep_idx, keep)
        assert_close(out, expected)
    finally:
        remove_pruning(model)


@pytest.mark.parametrize("name", ["EVA02-B-16", "PE-Core-B-16"])
def test_rotary_towers_give_later_blocks_the_kept_positions(towers, images, name):
    model = towers(name)
    cfg = PruneConfig(k_anchors=6, top_m=18, layer=0)
    try:
        with torch.no_grad():
            right, _ = run_by_hand(model, images, 0, cfg, positions="kept")
            wrong, _ = run_by_hand(model, images, 0, cfg, positions="first")
            replace_last_block(model, config=cfg)
            out = model(images)
    finally:
        remove_pruning(model)
    # The positions matter in this case: the wrong ones move the output by more than ten times
    # the tolerance that assert_close holds the right ones to.
    assert (right - wrong).abs().max() > 1e-3 * right.abs().max()
    assert_close(out, right)


def test_after_patch_dropout_in_training_mode():
    """timm's patch dropout (training mode only) runs first: the selection is among the patches
    it kept, and Eva's rotary rows, already per image then, follow the kept ones."""
    model = timm_model("eva02_tiny_patch14_224", depth=3, img_size=SIZE, patch_drop_rate=0.5).train()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(k_anchors=3, top_m=9, layer=1)
    try:
        with torch.no_grad():
            torch.manual_seed(5)  # the same patches dropped in both runs
            expected, keep = run_by_hand(model, images, 1, cfg)
            replace_last_block(model, config=cfg)
            torch.manual_seed(5)
            out = model(images)
        assert torch.equal(pruned_block(model).last_keep_idx, keep)
        assert keep.max() <= (SIZE // 14) ** 2 // 2 + 1  # indexes the shorter sequence
        assert_close(out, expected)
    finally:
        remove_pruning(model)


@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("name", list(TOWERS))
def test_nothing_to_prune_is_bit_identical(towers, images, name, layer):
    model = towers(name)
    patches = trunk_of(model).patch_embed.num_patches
    with torch.no_grad():
        before = model(images)
        replace_last_block(model, k_anchors=10, top_m=patches - 10, layer=layer)
        try:
            with pytest.warns(UserWarning, match="nothing to prune"):
                after = model(images)
        finally:
            remove_pruning(model)
        again = model(images)
    assert torch.equal(before, after) and torch.equal(before, again)
    assert pruned_block(model) is None


def test_patching_keeps_state_dict_and_undo_removes_the_position_hooks(towers, images):
    model = towers("EVA02-B-16")
    blocks = trunk_of(model).blocks
    keys, originals = list(model.state_dict()), list(blocks)
    replace_last_block(model, layer=0)
    assert list(model.state_dict()) == keys
    assert all(len(block._forward_pre_hooks) == 1 for block in blocks[1:])
    replace_last_block(model, layer=1)  # replaces the earlier pruning
    assert sum(isinstance(block, PrunedBlock) for block in blocks) == 1
    assert len(blocks[1]._forward_pre_hooks) == 0
    assert all(len(block._forward_pre_hooks) == 1 for block in blocks[2:])
    remove_pruning(model)
    assert list(blocks) == originals
    assert not any(block._forward_pre_hooks for block in blocks)


def test_full_clip_model_and_the_seed_wrapper(images):
    """An OpenCLIP CustomTextCLIP with a timm tower, as open_clip.create_model builds it."""
    cfg = open_clip.get_model_config("EVA02-B-16")
    create = timm.create_model
    with mock.patch.object(timm, "create_model",
                           lambda *a, **kw: create(*a, depth=2, img_size=SIZE, **kw)):
        torch.manual_seed(0)
        model = open_clip.CustomTextCLIP(
            embed_dim=32, vision_cfg=cfg["vision_cfg"],
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()
    encoder = PrunedVisionEncoder(model, k_anchors=4, top_m=8)
    with torch.no_grad():
        features = encoder(images)
        assert torch.equal(model.encode_image(images), features)
    assert encoder.keep_idx.shape == (2, 12) and encoder.config.k_anchors == 4
    assert isinstance(model.visual.trunk.blocks[-1], PrunedResidualAttentionBlock)


# ----- the Triton path (under the interpreter on the CPU) -----------------------------------

# Small images (4 x 4 patches) and two blocks: the interpreter runs one program at a time.
SMALL_TOWERS = {
    "ViT-B-16-SigLIP2": lambda: clip_tower("ViT-B-16-SigLIP2", depth=2, img_size=64),
    "EVA02-B-16": lambda: clip_tower("EVA02-B-16", depth=2, img_size=64),
    "PE-Core-B-16": lambda: clip_tower("PE-Core-B-16", depth=2, img_size=64),
    "deit_tiny_distilled": lambda: timm_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64),
    "vit_tiny_reg4_gap": lambda: timm_model("vit_tiny_patch16_224", depth=2, img_size=64, reg_tokens=4,
                                            class_token=False, global_pool="avg"),
}


small_towers = cache(SMALL_TOWERS)


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", list(SMALL_TOWERS))
def test_triton_backend_matches_the_reference_backend(small_towers, name, layer):
    model = small_towers(name)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outs, keeps = {}, {}
    for selection in ("score", "mmr") if layer == 0 else ("score", "cls"):
        for backend in ("reference", "triton"):
            replace_last_block(model, k_anchors=3, top_m=5, layer=layer, backend=backend,
                               selection=selection)
            with torch.no_grad():
                outs[backend] = model(images)
            keeps[backend] = pruned_block(model).last_keep_idx
        remove_pruning(model)
        assert torch.equal(keeps["triton"], keeps["reference"]), selection
        # The same kept rows give the same computation after the selection.
        torch.testing.assert_close(outs["triton"], outs["reference"], rtol=0, atol=0)


# ----- what stays refused -------------------------------------------------------------------

def refused_towers():
    from open_clip.timm_model import TimmModel
    return [
        ("ConvNeXt", lambda: TimmModel("convnext_atto", embed_dim=32, image_size=32)),
        ("ResPostBlock", lambda: timm_model("vit_tiny_patch16_224", depth=2,
                                            block_fn=timm.models.vision_transformer.ResPostBlock)),
        ("VisionTransformerRelPos", lambda: timm_model("vit_relpos_small_patch16_224", depth=1)),
        ("mixed", lambda: timm_model("vit_small_patch16_rope_mixed_224", depth=1)),
    ]


@pytest.mark.parametrize("name, build", refused_towers(), ids=[n for n, _ in refused_towers()])
def test_unsupported_timm_towers_are_refused(name, build):
    model = build()
    with pytest.raises(UnsupportedModelError, match=name):
        replace_last_block(model)
    with pytest.warns(UserWarning, match=f"token pruning not applied, the model is unchanged: .*{name}"):
        assert apply_pruning_to_model(model, strict=False) is model
    assert not any(isinstance(m, PrunedBlock) for m in model.modules())


@pytest.mark.parametrize("name", ["EVA02-B-16", "ViT-B-16-SigLIP2"])
def test_sweep_engine_matches_the_patched_tower(towers, images, name):
    """tokenprune sweep's engine on a rotary tower (the kept positions must follow into the
    blocks after a middle-block prune) and on one without a class token: every configuration's
    output and keep_idx are the patched tower's."""
    from tokenprune.sweep import GridEncoder
    tower = towers(name)
    configs = [None, PruneConfig(k_anchors=3, top_m=8, layer=1, backend="reference"),
               PruneConfig(k_anchors=2, top_m=5, alpha=0.3, layer=-1, backend="reference")]
    with torch.no_grad():
        outputs = GridEncoder(tower, configs)(images)
        for config, got in zip(configs, outputs):
            if config is None:
                assert torch.equal(got.output, tower(images)) and got.keep_idx is None
                continue
            replace_last_block(tower, config=config)
            try:
                expected, keep = tower(images), pruned_block(tower).last_keep_idx
            finally:
                remove_pruning(tower)
            assert torch.equal(got.keep_idx, keep)
            torch.testing.assert_close(got.output, expected, atol=1e-6, rtol=1e-6)
