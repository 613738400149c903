"""SPEC step 2: importance I_i = (1/k) sum_{j anchor} P[i, j], P the head-mean attention.

Grid: (images, query blocks of BLOCK_M tokens). Per head, each row's softmax normaliser
(running max m and sum l over all T keys, softmax_stats.py): computed here in one online-softmax
pass, or read from `softmax_stats`'s output when an earlier pass already made it (anchors
without a class token). Then the logits of the k anchor keys alone give
P_h[i, j] = 2^(t_ij - m) / l. Keeping the anchors out of the T-key loop leaves it one exp2 and
two row reductions per element.
Output: I, (B, T) float32 (the prefix rows are computed but never used).
"""
import torch
import triton
import triton.language as tl

from .dot import dot_f32, dot_mode
from .softmax_stats import launch_config, log2_scale, row_softmax_stats


@triton.jit
def _importance_kernel(
    qkv_ptr, anchor_idx_ptr, row_max_ptr, row_sum_ptr, importance_ptr,
    T, C, HEAD_DIM, NUM_HEADS, K_ANCHORS, qk_scale,
    stride_qkv_b, stride_qkv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
    LOAD_STATS: tl.constexpr, DOT: tl.constexpr,
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
        key_offset = C + h * HEAD_DIM
        if LOAD_STATS:
            stats = (b * NUM_HEADS + h) * T + rows
            m_i = tl.load(row_max_ptr + stats, mask=row_ok, other=0.0)
            l_i = tl.load(row_sum_ptr + stats, mask=row_ok, other=1.0)
        else:
            m_i, l_i = row_softmax_stats(q, qkv_ptr, T, key_offset, stride_qkv_t, qk_scale,
                                         dd, d_ok, BLOCK_M, BLOCK_N, DOT)
        # The anchor columns only: their logits once more (k keys, not T), then P = 2^(t - m) / l.
        for a0 in range(0, K_ANCHORS, BLOCK_A):
            slots = a0 + tl.arange(0, BLOCK_A)
            slot_ok = slots < K_ANCHORS
            anchors = tl.load(anchor_idx_ptr + slots, mask=slot_ok, other=0)
            ka_t = tl.load(qkv_ptr + anchors[None, :] * stride_qkv_t + key_offset + dd[:, None],
                           mask=d_ok[:, None] & slot_ok[None, :], other=0.0)
            s_a = dot_f32(q, ka_t, DOT) * qk_scale
            p_a = tl.where(slot_ok[None, :], tl.exp2(s_a - m_i[:, None]), 0.0)
            importance += tl.sum(p_a, axis=1) / l_i
    importance = importance / NUM_HEADS / K_ANCHORS
    tl.store(importance_ptr + b * T + rows, importance, mask=row_ok)


def importance(qkv, num_heads, anchor_idx, scale=None, row_stats=None, config=None):
    """I (B, T) float32 for the anchors anchor_idx (B, k) int32.

    scale: the attention's logit scale (d ** -0.5 when None). row_stats: `softmax_stats`'s
    (row_max, row_sum) for this qkv and scale, to skip the pass over all keys; None computes
    them inline. config: optional (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of
    `launch_config`.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    k_anchors = anchor_idx.shape[1]
    assert qkv.stride(-1) == 1, "qkv needs unit stride in its last dim"
    out = torch.empty(B, T, device=qkv.device, dtype=torch.float32)
    row_max, row_sum = row_stats if row_stats is not None else (out, out)  # unread without stats
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or launch_config(qkv.dtype)
    _importance_kernel[(B, triton.cdiv(T, BLOCK_M))](
        qkv, anchor_idx, row_max, row_sum, out,
        T, C, head_dim, num_heads, k_anchors, log2_scale(scale, head_dim),
        qkv.stride(0), qkv.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_A=max(16, min(64, triton.next_power_of_2(k_anchors))),
        LOAD_STATS=row_stats is not None, DOT=dot_mode(qkv.dtype), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
