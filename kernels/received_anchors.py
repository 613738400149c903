"""SPEC step 1 without a class token: a_i = (1/T) sum_q P[q, i], the attention patch i
receives averaged over all T queries (prefix tokens included as queries), and its top-k
patches (the anchors).

A column of P needs every row's softmax normaliser first, so this runs after `softmax_stats`
(softmax_stats.py) and reads its (B, H, T) row max and sum. Two kernels:
  _received_attention_kernel  grid (images, blocks of BLOCK_KEYS keys): per head, the key tile
                              stays in registers while the loop walks all T queries in blocks
                              of BLOCK_QUERIES; P_h = 2^(t - m) / l per tile, summed over the
                              queries into the program's own columns (no atomics, so the sums
                              are deterministic). The T x T matrix is never stored.
  _received_anchors_kernel    grid (images,): the row of a_i in registers, the k largest
                              patches p..T-1 (topk.py, ties to the lower index).
"""
import torch
import triton
import triton.language as tl

from .dot import dot_f32, dot_mode
from .softmax_stats import launch_config, log2_scale
from .topk import store_top_anchors


@triton.jit
def _received_attention_kernel(
    qkv_ptr, row_max_ptr, row_sum_ptr, received_ptr,
    T, C, HEAD_DIM, NUM_HEADS, qk_scale,
    stride_qkv_b, stride_qkv_t,
    BLOCK_KEYS: tl.constexpr, BLOCK_QUERIES: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at large batches
    cols = tl.program_id(1) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    col_ok = cols < T
    qkv_ptr += b * stride_qkv_b
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM  # pads head sizes like 80 up to BLOCK_D = 128

    received = tl.zeros([BLOCK_KEYS], dtype=tl.float32)
    for h in range(NUM_HEADS):
        # K^T tile (BLOCK_D, BLOCK_KEYS) of this program's keys, read once per head.
        k_t = tl.load(qkv_ptr + cols[None, :] * stride_qkv_t + C + h * HEAD_DIM + dd[:, None],
                      mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        stats_ptr = (b * NUM_HEADS + h) * T
        for m0 in range(0, T, BLOCK_QUERIES):
            rows = m0 + tl.arange(0, BLOCK_QUERIES)
            row_ok = rows < T
            q = tl.load(qkv_ptr + rows[:, None] * stride_qkv_t + h * HEAD_DIM + dd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            m_i = tl.load(row_max_ptr + stats_ptr + rows, mask=row_ok, other=0.0)
            l_i = tl.load(row_sum_ptr + stats_ptr + rows, mask=row_ok, other=1.0)
            s = dot_f32(q, k_t, DOT) * qk_scale
            p = tl.exp2(s - m_i[:, None]) * (1.0 / l_i)[:, None]
            received += tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0)
    received = received / NUM_HEADS / T
    tl.store(received_ptr + b * T + cols, received, mask=col_ok)


@triton.jit
def _received_anchors_kernel(
    received_ptr, anchor_mask_ptr, anchor_idx_ptr,
    T, NUM_PREFIX, K_ANCHORS,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    received = tl.load(received_ptr + b * T + tok, mask=tok_ok, other=0.0)
    store_top_anchors(received, tok, tok_ok, tok_ok & (tok >= NUM_PREFIX), K_ANCHORS,
                      anchor_mask_ptr + b * T, anchor_idx_ptr + b * K_ANCHORS)


def received_anchors(qkv, num_heads, k_anchors, row_stats, num_prefix=0, scale=None,
                     config=None):
    """(received (B, T) float32, anchor_mask (B, T) int8, anchor_idx (B, k) int32 ascending).

    qkv: (B, T, 3C) packed [q | k | v], unit stride in the last dim. row_stats: `softmax_stats`'s
    (row_max, row_sum) for this qkv and scale. num_prefix: p >= 0, the leading tokens that are
    never anchors; 1 <= k_anchors <= T - p. scale: the attention's logit scale (d ** -0.5 when
    None). config: optional (BLOCK_KEYS, BLOCK_QUERIES, num_warps, num_stages); by default the
    online-softmax pass's `launch_config` with its two tile sizes in these roles.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    assert qkv.stride(-1) == 1, "qkv needs unit stride in its last dim"
    row_max, row_sum = row_stats
    dev = qkv.device
    received = torch.empty(B, T, device=dev, dtype=torch.float32)
    anchor_mask = torch.empty(B, T, device=dev, dtype=torch.int8)
    anchor_idx = torch.empty(B, k_anchors, device=dev, dtype=torch.int32)
    BLOCK_KEYS, BLOCK_QUERIES, num_warps, num_stages = config or launch_config(qkv.dtype)
    _received_attention_kernel[(B, triton.cdiv(T, BLOCK_KEYS))](
        qkv, row_max, row_sum, received,
        T, C, head_dim, num_heads, log2_scale(scale, head_dim),
        qkv.stride(0), qkv.stride(1),
        BLOCK_KEYS=BLOCK_KEYS, BLOCK_QUERIES=BLOCK_QUERIES,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT=dot_mode(qkv.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    BLOCK_T = triton.next_power_of_2(T)
    _received_anchors_kernel[(B,)](
        received, anchor_mask, anchor_idx,
        T, num_prefix, k_anchors,
        BLOCK_T=BLOCK_T, num_warps=8 if BLOCK_T >= 1024 else 4,
    )
    return received, anchor_mask, anchor_idx
