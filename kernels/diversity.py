"""SPEC step 3: diversity D_i = 1 - max_{j anchor} cos(X_i, X_j) on the block input X.

Grid: (images, query blocks of BLOCK_M tokens). Only the k anchor rows of X are needed, so
each program computes a (BLOCK_M, BLOCK_A) Gram block per chunk of anchors (channels in
BLOCK_C chunks), divides by the norms and keeps the running max.
cos(u, v) = u.v / (max(|u|, eps) * max(|v|, eps)), eps = 1e-8, as in SPEC.md.
Output: D, (B, T) float32 (the prefix rows are computed but never used).
"""
import torch
import triton
import triton.language as tl

from .dot import dot_f32, dot_mode

EPS_COS = 1e-8


@triton.jit
def _diversity_kernel(
    x_ptr, anchor_idx_ptr, diversity_ptr,
    T, C, K_ANCHORS,
    stride_x_b, stride_x_t,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    x_ptr += b * stride_x_b
    anchor_idx_ptr += b * K_ANCHORS
    cc = tl.arange(0, BLOCK_C)

    norm_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        xq = tl.load(x_ptr + rows[:, None] * stride_x_t + c0 + cc[None, :],
                     mask=row_ok[:, None] & (c0 + cc < C)[None, :], other=0.0).to(tl.float32)
        norm_sq += tl.sum(xq * xq, axis=1)
    norm_q = tl.maximum(tl.sqrt_rn(norm_sq), EPS)

    best_cos = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for a0 in range(0, K_ANCHORS, BLOCK_A):
        slots = a0 + tl.arange(0, BLOCK_A)
        slot_ok = slots < K_ANCHORS
        anchors = tl.load(anchor_idx_ptr + slots, mask=slot_ok, other=0)
        gram = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
        anchor_sq = tl.zeros([BLOCK_A], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c_ok = c0 + cc < C
            xq = tl.load(x_ptr + rows[:, None] * stride_x_t + c0 + cc[None, :],
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            xa_t = tl.load(x_ptr + anchors[None, :] * stride_x_t + c0 + cc[:, None],
                           mask=c_ok[:, None] & slot_ok[None, :], other=0.0)
            gram += dot_f32(xq, xa_t, DOT)
            xa = xa_t.to(tl.float32)
            anchor_sq += tl.sum(xa * xa, axis=0)
        norm_a = tl.maximum(tl.sqrt_rn(anchor_sq), EPS)
        cos = gram / norm_q[:, None] / norm_a[None, :]
        cos = tl.where(slot_ok[None, :], cos, float("-inf"))
        best_cos = tl.maximum(best_cos, tl.max(cos, axis=1))
    tl.store(diversity_ptr + b * T + rows, 1.0 - best_cos, mask=row_ok)


def diversity(x, anchor_idx):
    """D (B, T) float32 for x (B, T, C) and the anchor list anchor_idx (B, k) int32."""
    B, T, C = x.shape
    k_anchors = anchor_idx.shape[1]
    assert x.stride(-1) == 1, "x needs unit stride in its last dim"
    out = torch.empty(B, T, device=x.device, dtype=torch.float32)
    BLOCK_M = 64
    _diversity_kernel[(B, triton.cdiv(T, BLOCK_M))](
        x, anchor_idx, out,
        T, C, k_anchors,
        x.stride(0), x.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_A=max(16, min(32, triton.next_power_of_2(k_anchors))),
        BLOCK_C=64, DOT=dot_mode(x.dtype), EPS=EPS_COS, num_warps=4, num_stages=2,
    )
    return out
