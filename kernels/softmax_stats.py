"""Each attention row's softmax normaliser: running max m and sum l over all T keys, per head.

P_h[i, j] = 2^(t_ij - m_hi) / l_hi with t_ij = scale * log2(e) * q_h[i] . k_h[j] (logits kept in
log2 units, so that each element costs one exp2). `row_softmax_stats` is the online-softmax
loop of the fused-attention tutorial for one (BLOCK_M queries, one head) tile; the importance
kernel runs it inline, and `softmax_stats` stores its result, (B, H, T) twice, for the passes
that need every row's normaliser before they can sum a column (anchors without a class token).
The T x T matrix never leaves registers, one (BLOCK_M, BLOCK_N) tile at a time.
"""
import math

import torch
import triton
import triton.language as tl

from .dot import dot_f32, dot_mode

LOG2_E = math.log2(math.e)


@triton.jit
def row_softmax_stats(q, qkv_ptr, T, key_offset, stride_qkv_t, qk_scale, dd, d_ok,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """(m, l), (BLOCK_M,) each, for the query tile q (BLOCK_M, BLOCK_D) against all T keys of
    one head, whose channels start at `key_offset` in each packed qkv row."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, T, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        # K^T tile (BLOCK_D, BLOCK_N), read straight from the packed qkv rows.
        k_t = tl.load(qkv_ptr + cols[None, :] * stride_qkv_t + key_offset + dd[:, None],
                      mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = dot_f32(q, k_t, DOT) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _softmax_stats_kernel(
    qkv_ptr, row_max_ptr, row_sum_ptr,
    T, C, HEAD_DIM, NUM_HEADS, qk_scale,
    stride_qkv_b, stride_qkv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at large batches
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    qkv_ptr += b * stride_qkv_b
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM  # pads head sizes like 80 up to BLOCK_D = 128
    for h in range(NUM_HEADS):
        q = tl.load(qkv_ptr + rows[:, None] * stride_qkv_t + h * HEAD_DIM + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i = row_softmax_stats(q, qkv_ptr, T, C + h * HEAD_DIM, stride_qkv_t, qk_scale,
                                     dd, d_ok, BLOCK_M, BLOCK_N, DOT)
        out = (b * NUM_HEADS + h) * T + rows
        tl.store(row_max_ptr + out, m_i, mask=row_ok)
        tl.store(row_sum_ptr + out, l_i, mask=row_ok)


def launch_config(dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the online-softmax pass.

    float32: exact fp32 dots run on FMA units, not tensor cores: small tiles, or registers
    spill. fp16/bf16: the fastest of the configurations timed by bench/gpu_kernels.py on an
    H200 at ViT-L/14-336 shapes (bench/results/gpu_kernels_h200.md), for the importance kernel.
    """
    if dtype == torch.float32:
        return 32, 32, 8, 2
    return 128, 64, 4, 3


def log2_scale(scale, head_dim):
    """The logit scale in log2 units: `scale` (the attention's own; d ** -0.5 when None)."""
    return (head_dim ** -0.5 if scale is None else scale) * LOG2_E


def softmax_stats(qkv, num_heads, scale=None, config=None):
    """(row_max, row_sum), (B, H, T) float32 each, in log2 units (see the module docstring).

    qkv: (B, T, 3C) packed [q | k | v], unit stride in the last dim; scale: the attention's
    logit scale (d ** -0.5 when None); config as in `launch_config`.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    assert qkv.stride(-1) == 1, "qkv needs unit stride in its last dim"
    row_max = torch.empty(B, num_heads, T, device=qkv.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or launch_config(qkv.dtype)
    _softmax_stats_kernel[(B, triton.cdiv(T, BLOCK_M))](
        qkv, row_max, row_sum,
        T, C, head_dim, num_heads, log2_scale(scale, head_dim),
        qkv.stride(0), qkv.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT=dot_mode(qkv.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return row_max, row_sum
