"""The mmr selection (SPEC.md, "`mmr`: selection by maximal marginal relevance"): the k
anchors, then m greedy steps, each keeping the candidate with the largest
g_i = lambda * a_i / A - (1 - lambda) * c_i, c_i = max over the kept patches j of cos(X_i, X_j).

One program per image, grid (images,). The image's row of T tokens lives in registers
(BLOCK_T = next_power_of_2(T)): the relevance r = a / A, the running max-cosine c, each token's
norm and the kept mask. Each step is one pass over X (the new kept row against all T rows, in
BLOCK_C channel chunks) to update c, and one row reduction to find the next pick; the steps
are sequential, as the definition is. Nothing T x T is ever formed.

The pick is an argmax with SPEC's order: topk.py's order key (NaN above +inf, invalid entries
below -inf), the lower index among equal keys. Cosines are a row sum of products, as in the
reference, so equal tokens get bit-equal cosines and the tie rule holds between backends.
"""
import torch
import triton
import triton.language as tl

from .topk import order_key

EPS_COS = 1e-8


@triton.jit
def _cos_to_row(x_ptr, tok, tok_ok, norm, j, stride_x_t, C, EPS: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """cos(X_i, X_j) for every token i of the image, (BLOCK_T,) float32."""
    cc = tl.arange(0, BLOCK_C)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cc < C
        xi = tl.load(x_ptr + tok[:, None] * stride_x_t + c0 + cc[None, :],
                     mask=tok_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + j * stride_x_t + c0 + cc, mask=c_ok, other=0.0).to(tl.float32)
        dot += tl.sum(xi * xj[None, :], axis=1)
    norm_j = tl.sum(tl.where(tok == j, norm, 0.0), axis=0)
    return dot / tl.maximum(norm, EPS) / tl.maximum(norm_j, EPS)


@triton.jit
def _nan_max(a, b):
    """max(a, b) that keeps a NaN from either side (tl.maximum need not, on the GPU)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _mmr_kernel(
    x_ptr, anchor_score_ptr, anchor_mask_ptr, anchor_idx_ptr, keep_idx_ptr,
    T, C, NUM_PREFIX, K_ANCHORS, TOP_M, KEPT, lam, beta,
    stride_x_b, stride_x_t,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at large batches
    x_ptr += b * stride_x_b
    tok = tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    patch = tok_ok & (tok >= NUM_PREFIX)

    # Relevance r = a / A, A the largest finite anchor score over the patches; 0 if A <= 0.
    a = tl.load(anchor_score_ptr + b * T + tok, mask=tok_ok, other=0.0)
    finite = (a == a) & (tl.abs(a) < float("inf"))
    top = tl.max(tl.where(patch & finite, a, float("-inf")), axis=0)
    rel = tl.where(top > 0, a / top, 0.0)

    cc = tl.arange(0, BLOCK_C)
    norm_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        xi = tl.load(x_ptr + tok[:, None] * stride_x_t + c0 + cc[None, :],
                     mask=tok_ok[:, None] & (c0 + cc < C)[None, :], other=0.0).to(tl.float32)
        norm_sq += tl.sum(xi * xi, axis=1)
    norm = tl.sqrt_rn(norm_sq)

    # The running max-cosine against the kept patches, starting from the anchors.
    kept = tl.load(anchor_mask_ptr + b * T + tok, mask=tok_ok, other=0) != 0
    redundancy = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    for s in range(K_ANCHORS):
        j = tl.load(anchor_idx_ptr + b * K_ANCHORS + s).to(tl.int64)
        redundancy = _nan_max(redundancy, _cos_to_row(x_ptr, tok, tok_ok, norm, j, stride_x_t,
                                                      C, EPS, BLOCK_T, BLOCK_C))
    for _ in range(TOP_M):
        gain = lam * rel - beta * redundancy
        key = order_key(gain, patch & ~kept)
        best = tl.max(key, axis=0)
        j = tl.min(tl.where(key == best, tok, BLOCK_T), axis=0).to(tl.int64)
        kept = kept | (tok == j)
        redundancy = _nan_max(redundancy, _cos_to_row(x_ptr, tok, tok_ok, norm, j, stride_x_t,
                                                      C, EPS, BLOCK_T, BLOCK_C))
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(keep_idx_ptr + b * KEPT + slot, tok.to(tl.int64), mask=kept)


def mmr(x, anchor_score, anchor_mask, anchor_idx, top_m, mmr_lambda, num_prefix=1):
    """keep_idx (B, k + top_m) int64, ascending: the k anchors (anchor_mask (B, T) int8,
    anchor_idx (B, k) int32) and top_m patches added by maximal marginal relevance, from the
    anchor scores anchor_score (B, T) float32 and the block input x (B, T, C), unit stride in
    its last dim. The p = num_prefix leading tokens are never candidates."""
    B, T, C = x.shape
    k_anchors = anchor_idx.shape[1]
    kept = k_anchors + top_m
    assert x.stride(-1) == 1, "x needs unit stride in its last dim"
    keep_idx = torch.empty(B, kept, device=x.device, dtype=torch.int64)
    BLOCK_T = triton.next_power_of_2(T)
    # A (BLOCK_T, BLOCK_C) tile of X per chunk: about 8K elements whatever T is.
    BLOCK_C = max(1, min(64, triton.next_power_of_2(C), 8192 // BLOCK_T))
    lam = float(mmr_lambda)
    _mmr_kernel[(B,)](
        x, anchor_score, anchor_mask, anchor_idx, keep_idx,
        T, C, num_prefix, k_anchors, top_m, kept, lam, 1.0 - lam,
        x.stride(0), x.stride(1),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, EPS=EPS_COS, num_warps=8 if BLOCK_T >= 1024 else 4,
    )
    return keep_idx
