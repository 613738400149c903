"""The pruned block is the original block applied to the kept tokens."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

from tokenprune import PruneConfig, PrunedResidualAttentionBlock, select_reference

C, HEADS, T = 64, 4, 50  # 49 patches, as ViT-B-32 at 224 px


def make_block(batch_first=True, ls_init_value=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(C, HEADS, mlp_ratio=2.0, ls_init_value=ls_init_value,
                                   batch_first=batch_first)
    return block.to(dtype).eval()


def expected_output(block, x, cfg):
    """SPEC.md: select with the reference, then run the unmodified block on CLS + kept rows."""
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    keep = select_reference(x, qkv, HEADS, cfg.k_anchors, cfg.top_m, cfg.alpha, cfg.score_norm,
                            selection=cfg.selection, mmr_lambda=cfg.mmr_lambda)
    rows = torch.cat([torch.zeros_like(keep[:, :1]), keep], dim=1)
    kept = torch.stack([x[b, rows[b]] for b in range(x.shape[0])])
    if not block.attn.batch_first:
        return keep, block(kept.transpose(0, 1)).transpose(0, 1)
    return keep, block(kept)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("ls_init_value, cfg", [
    (None, PruneConfig(k_anchors=5, top_m=12)),
    (0.1, PruneConfig(k_anchors=1, top_m=0, alpha=1.0, score_norm="minmax")),   # LayerScale, anchors only
    (None, PruneConfig(k_anchors=8, top_m=40, alpha=0.0)),                       # k + m = N - 1
    (None, PruneConfig(k_anchors=3, top_m=14, selection="cls")),
    (0.1, PruneConfig(k_anchors=3, top_m=14, selection="mmr", mmr_lambda=0.6)),  # LayerScale
    (None, PruneConfig(k_anchors=1, top_m=47, selection="mmr")),                 # k + m = N - 1
])
def test_matches_original_block_on_gathered_tokens(batch_first, ls_init_value, cfg):
    block = make_block(batch_first, ls_init_value)
    x = torch.randn(3, T, C)
    pruned = PrunedResidualAttentionBlock(block, cfg)
    with torch.no_grad():
        out = pruned(x if batch_first else x.transpose(0, 1).contiguous())
        keep, expected = expected_output(block, x, cfg)
    if not batch_first:
        out = out.transpose(0, 1)
    assert out.shape == (3, 1 + cfg.kept_patches, C)
    assert torch.equal(pruned.last_keep_idx, keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_nothing_to_prune_is_bit_identical_and_warns_once(batch_first):
    block = make_block(batch_first)
    pruned = PrunedResidualAttentionBlock(block, PruneConfig())  # 10 + 50 >= 49 patches
    x = torch.randn(2, T, C) if batch_first else torch.randn(T, 2, C)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = pruned(x), pruned(x)
        original = block(x)
    assert torch.equal(first, original) and torch.equal(second, original)
    assert [str(w.message) for w in caught if "nothing to prune" in str(w.message)] == \
        ["k_anchors + top_m = 60 >= 49 patch tokens: nothing to prune, the block runs on all tokens"]
    assert pruned.last_keep_idx is None


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precisions(dtype, tol):
    block = make_block(dtype=dtype)
    x = torch.randn(2, T, C).to(dtype)
    cfg = PruneConfig(k_anchors=4, top_m=10)
    pruned = PrunedResidualAttentionBlock(block, cfg)
    with torch.no_grad():
        out = pruned(x)
        keep, expected = expected_output(block, x, cfg)
    assert out.dtype == dtype
    assert torch.equal(pruned.last_keep_idx, keep)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_under_autocast():
    block = make_block()
    x = torch.randn(2, T, C)
    cfg = PruneConfig(k_anchors=4, top_m=10)
    pruned = PrunedResidualAttentionBlock(block, cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pruned(x)
        rows = F.pad(pruned.last_keep_idx, (1, 0))
        expected = block(torch.stack([x[b, rows[b]] for b in range(2)]))
    assert out.shape == (2, 15, C)
    torch.testing.assert_close(out.float(), expected.float(), atol=5e-2, rtol=5e-2)


def test_batch_of_one_and_gradients_flow():
    block = make_block().train()
    x = torch.randn(1, T, C, requires_grad=True)
    out = PrunedResidualAttentionBlock(block, PruneConfig(k_anchors=3, top_m=7))(x)
    out.sum().backward()
    assert out.shape == (1, 11, C)
    assert block.attn.in_proj_weight.grad is not None and x.grad is not None


def test_masks_and_cross_attention_are_refused():
    pruned = PrunedResidualAttentionBlock(make_block(), PruneConfig(k_anchors=2, top_m=2))
    x = torch.randn(1, T, C)
    with pytest.raises(ValueError, match="attn_mask"):
        pruned(x, attn_mask=torch.zeros(T, T))
    with pytest.raises(TypeError, match="CustomResidualAttentionBlock"):
        PrunedResidualAttentionBlock(CustomResidualAttentionBlock(C, HEADS))


def test_backend_choice(monkeypatch):
    from tokenprune.selection import resolve_backend
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "reference"  # auto never interprets Triton on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pruned = PrunedResidualAttentionBlock(make_block(), PruneConfig(k_anchors=2, top_m=2, backend="triton"))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: the tensors are on cpu"):
        pruned(torch.randn(1, T, C))


def test_random_control_draws_seeded_distinct_patches_and_runs_the_block_on_them():
    block = make_block()
    x = torch.randn(4, T, C)
    cfg = PruneConfig(k_anchors=3, top_m=9, selection="random", seed=7)
    with torch.no_grad():
        first = PrunedResidualAttentionBlock(block, cfg)
        out1, keep1 = first(x), first.last_keep_idx
        first(x)                                                  # the generator moves on
        keep2 = first.last_keep_idx
        again = PrunedResidualAttentionBlock(block, cfg)          # same seed: same draws
        again(x)
        other = PrunedResidualAttentionBlock(block, PruneConfig(k_anchors=3, top_m=9,
                                                                selection="random", seed=8))
        other(x)
        scored = PrunedResidualAttentionBlock(block, PruneConfig(k_anchors=3, top_m=9))
        scored(x)
    assert keep1.shape == (4, 12)
    assert ((keep1 >= 1) & (keep1 < T)).all()
    assert all(row == sorted(set(row)) for row in keep1.tolist())  # ascending, no repeats
    assert torch.equal(again.last_keep_idx, keep1)
    assert not torch.equal(keep2, keep1)
    assert not torch.equal(other.last_keep_idx, keep1)
    assert not torch.equal(scored.last_keep_idx, keep1)
    rows = torch.cat([torch.zeros_like(keep1[:, :1]), keep1], dim=1)
    with torch.no_grad():
        expected = block(torch.stack([x[b, rows[b]] for b in range(4)]))
    torch.testing.assert_close(out1, expected, atol=1e-5, rtol=1e-5)


def test_selections_keep_different_tokens_and_cls_is_all_anchors():
    """The block is not blind to the selection: score, cls and mmr keep different patches on
    the same input, and cls keeps what score keeps with every patch an anchor."""
    block = make_block()
    x = torch.randn(2, T, C)
    keeps = {}
    with torch.no_grad():
        for name, cfg in {"score": PruneConfig(k_anchors=3, top_m=12),
                          "cls": PruneConfig(k_anchors=3, top_m=12, selection="cls"),
                          "mmr": PruneConfig(k_anchors=3, top_m=12, selection="mmr"),
                          "all anchors": PruneConfig(k_anchors=15, top_m=0)}.items():
            pruned = PrunedResidualAttentionBlock(block, cfg)
            pruned(x)
            keeps[name] = pruned.last_keep_idx
    assert torch.equal(keeps["cls"], keeps["all anchors"])
    assert len({tuple(keeps[name].flatten().tolist()) for name in ("score", "cls", "mmr")}) == 3
