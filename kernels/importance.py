"""SPEC step 2: importance I_i = (1/k) sum_{j anchor} P[i, j], P the head-mean attention.

Grid: (images, query blocks of BLOCK_M tokens). Per head, one online-softmax pass over all T
keys (running max m and sum l, as in the fused-attention tutorial) gives each row's
normaliser; then the logits of the k anchor keys alone give P_h[i, j] = exp(s_ij - m) / l.
Keeping the anchors out of the T-key loop leaves it one exp2 and two row reductions per
element. The T x T matrix never leaves registers, one (BLOCK_M, BLOCK_N) tile at a time.
Output: I, (B, T) float32 (row 0, the CLS token, is computed but never used).
"""
import math

import torch
import triton
import triton.language as tl

LOG2_E = math.log2(math.e)


@triton.jit
def dot_f32(a, b, MODE: tl.constexpr):
    """a @ b accumulated in float32, MODE from `dot_mode`.

    "ieee" (float32 inputs): exact fp32 products, no TF32, so GPU selections match the reference.
    "mma" (fp16/bf16 inputs): tensor cores; the products are exact in the float32 accumulator.
    "interpreter" (TRITON_INTERPRET=1): a broadcast product and sum. The interpreter's tl.dot is
    numpy's matmul, whose BLAS kernels round rows differently (identical tokens would get
    different scores, breaking SPEC's tie rule), and which multiplies bf16 as raw integer bits.
    """
    if MODE == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    elif MODE == "interpreter":
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b)


# Triton fixes interpreted-or-compiled when a function is decorated (TRITON_INTERPRET=1 then).
_INTERPRETED = type(dot_f32).__name__ == "InterpretedFunction"


def dot_mode(dtype):
    """The MODE of `dot_f32` for inputs of `dtype`."""
    if _INTERPRETED:
        return "interpreter"
    return "ieee" if dtype == torch.float32 else "mma"


@triton.jit
def _importance_kernel(
    qkv_ptr, anchor_idx_ptr, importance_ptr,
    T, C, HEAD_DIM, NUM_HEADS, K_ANCHORS, qk_scale,
    stride_qkv_b, stride_qkv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
    DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at large batches
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    qkv_ptr += b * stride_qkv_b
    anchor_idx_ptr += b * K_ANCHORS
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM  # pads head sizes like 80 up to BLOCK_D = 128

    importance = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(NUM_HEADS):
        q = tl.load(qkv_ptr + rows[:, None] * stride_qkv_t + h * HEAD_DIM + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # The row normaliser: running max m and sum l over all T keys. Logits are kept in
        # log2 units (qk_scale holds log2(e)) so that each element costs one exp2.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, T, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            # K^T tile (BLOCK_D, BLOCK_N), read straight from the packed qkv rows.
            k_t = tl.load(qkv_ptr + cols[None, :] * stride_qkv_t + C + h * HEAD_DIM + dd[:, None],
                          mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            s = dot_f32(q, k_t, DOT) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new
        # The anchor columns only: their logits once more (k keys, not T), then P = 2^(s - m) / l.
        for a0 in range(0, K_ANCHORS, BLOCK_A):
            slots = a0 + tl.arange(0, BLOCK_A)
            slot_ok = slots < K_ANCHORS
            anchors = tl.load(anchor_idx_ptr + slots, mask=slot_ok, other=0)
            ka_t = tl.load(qkv_ptr + anchors[None, :] * stride_qkv_t + C + h * HEAD_DIM + dd[:, None],
                           mask=d_ok[:, None] & slot_ok[None, :], other=0.0)
            s_a = dot_f32(q, ka_t, DOT) * qk_scale
            p_a = tl.where(slot_ok[None, :], tl.exp2(s_a - m_i[:, None]), 0.0)
            importance += tl.sum(p_a, axis=1) / l_i
    importance = importance / NUM_HEADS / K_ANCHORS
    tl.store(importance_ptr + b * T + rows, importance, mask=row_ok)


def launch_config(dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the online-softmax pass.

    float32: exact fp32 dots run on FMA units, not tensor cores: small tiles, or registers
    spill. fp16/bf16: the fastest of the configurations timed by bench/gpu_kernels.py on an
    H200 at ViT-L/14-336 shapes (bench/results/gpu_kernels_h200.md).
    """
    if dtype == torch.float32:
        return 32, 32, 8, 2
    return 128, 64, 4, 3


def importance(qkv, num_heads, anchor_idx, config=None):
    """I (B, T) float32 for the anchors anchor_idx (B, k) int32 (from `cls_anchors`).

    config: optional (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of `launch_config`.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    k_anchors = anchor_idx.shape[1]
    assert qkv.stride(-1) == 1, "qkv needs unit stride in its last dim"
    out = torch.empty(B, T, device=qkv.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or launch_config(qkv.dtype)
    _importance_kernel[(B, triton.cdiv(T, BLOCK_M))](
        qkv, anchor_idx, out,
        T, C, head_dim, num_heads, k_anchors, head_dim ** -0.5 * LOG2_E,
        qkv.stride(0), qkv.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_A=max(16, min(64, triton.next_power_of_2(k_anchors))),
        DOT=dot_mode(qkv.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out
