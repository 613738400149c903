"""SPEC steps 4 and 5: score the candidates, keep the top m, list the kept patches in order.

One program per image holds the whole row of T scores (BLOCK_T = next_power_of_2(T)): the
min-max normalisation needs the row's extremes over the candidates, and the top-m is an exact
selection (topk.py) with ties to the lower index. The kept positions then come from a running
count of the keep mask, so keep_idx is ascending without a sort.
"""
import torch
import triton
import triton.language as tl

from .topk import top_count_mask

EPS_MINMAX = 1e-12


@triton.jit
def _minmax(values, candidate, EPS: tl.constexpr):
    lo = tl.min(tl.where(candidate, values, float("inf")), axis=0)
    hi = tl.max(tl.where(candidate, values, float("-inf")), axis=0)
    return (values - lo) / (hi - lo + EPS)


@triton.jit
def _select_topm_kernel(
    importance_ptr, diversity_ptr, anchor_mask_ptr, keep_idx_ptr,
    T, NUM_PREFIX, TOP_M, KEPT, alpha, beta,
    BLOCK_T: tl.constexpr, MINMAX: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    is_anchor = tl.load(anchor_mask_ptr + b * T + tok, mask=tok_ok, other=0) != 0
    candidate = tok_ok & (tok >= NUM_PREFIX) & ~is_anchor
    importance = tl.load(importance_ptr + b * T + tok, mask=tok_ok, other=0.0)
    diversity = tl.load(diversity_ptr + b * T + tok, mask=tok_ok, other=0.0)
    if MINMAX:
        importance = _minmax(importance, candidate, EPS)
        diversity = _minmax(diversity, candidate, EPS)
    score = alpha * importance + beta * diversity

    # Anchors are never candidates, so the chosen set can never repeat one (whatever the scores).
    chosen = top_count_mask(score, candidate, TOP_M)
    keep = is_anchor | chosen
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(keep_idx_ptr + b * KEPT + slot, tok.to(tl.int64), mask=keep)


def select_topm(importance, diversity, anchor_mask, k_anchors, top_m, alpha, score_norm,
                num_prefix=1):
    """keep_idx (B, k_anchors + top_m) int64, ascending: the anchors and the top_m candidates
    (patches p..T-1 that are not anchors; the p prefix tokens are never candidates)."""
    B, T = importance.shape
    kept = k_anchors + top_m
    keep_idx = torch.empty(B, kept, device=importance.device, dtype=torch.int64)
    BLOCK_T = triton.next_power_of_2(T)
    _select_topm_kernel[(B,)](
        importance, diversity, anchor_mask, keep_idx,
        T, num_prefix, top_m, kept, float(alpha), 1.0 - float(alpha),
        BLOCK_T=BLOCK_T, MINMAX=score_norm == "minmax", EPS=EPS_MINMAX,
        num_warps=8 if BLOCK_T >= 1024 else 4,
    )
    return keep_idx
