"""SPEC step 1 with a class token (index 0): its head-averaged attention row and the k patches
it attends to most (the anchors).

Two kernels:
  _cls_logits_kernel   grid (images, blocks of BLOCK_N keys): the class query's scaled logits
                       scale * q_cls,h . k_h[j] for every head, into a (B, H, T) float32 buffer.
                       A single query row is a matrix-vector product, so it is elementwise
                       products and a row sum, and the many small programs keep enough loads in
                       flight to stream K at memory bandwidth.
  _cls_anchors_kernel  grid (images,): each head's row in registers (BLOCK_T =
                       next_power_of_2(T)), an exact softmax, the mean over heads, then the k
                       largest patches p..T-1 (topk.py, ties to the lower index).
"""
import torch
import triton
import triton.language as tl

from .topk import store_top_anchors


@triton.jit
def _cls_logits_kernel(
    qkv_ptr, logits_ptr,
    T, C, HEAD_DIM, NUM_HEADS, scale,
    stride_qkv_b, stride_qkv_t,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride overflows int32 at large batches
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < T
    qkv_ptr += b * stride_qkv_b
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM  # head sizes like 80 are not powers of two
    for h in range(NUM_HEADS):
        q_cls = tl.load(qkv_ptr + h * HEAD_DIM + dd, mask=d_ok, other=0.0).to(tl.float32)
        key = tl.load(qkv_ptr + cols[:, None] * stride_qkv_t + C + h * HEAD_DIM + dd[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        logits = tl.sum(key * q_cls[None, :], axis=1) * scale
        tl.store(logits_ptr + (b * NUM_HEADS + h) * T + cols, logits, mask=col_ok)


@triton.jit
def _cls_anchors_kernel(
    logits_ptr, cls_attn_ptr, anchor_mask_ptr, anchor_idx_ptr,
    T, NUM_HEADS, NUM_PREFIX, K_ANCHORS,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    cls_attn = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h in range(NUM_HEADS):
        logits = tl.load(logits_ptr + (b * NUM_HEADS + h) * T + tok, mask=tok_ok,
                         other=float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        cls_attn += p / tl.sum(p, axis=0)
    cls_attn = cls_attn / NUM_HEADS
    tl.store(cls_attn_ptr + b * T + tok, cls_attn, mask=tok_ok)
    # Prefix tokens (the class token among them) are never anchors.
    store_top_anchors(cls_attn, tok, tok_ok, tok_ok & (tok >= NUM_PREFIX), K_ANCHORS,
                      anchor_mask_ptr + b * T, anchor_idx_ptr + b * K_ANCHORS)


def cls_anchors(qkv, num_heads, k_anchors, num_prefix=1, scale=None):
    """(cls_attn (B, T) float32, anchor_mask (B, T) int8, anchor_idx (B, k) int32 ascending).

    qkv: (B, T, 3C) packed [q | k | v], unit stride in the last dim, the class token at row 0.
    num_prefix: p >= 1, the leading tokens that are never anchors; 1 <= k_anchors <= T - p.
    scale: the attention's logit scale (d ** -0.5 when None).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    assert qkv.stride(-1) == 1, "qkv needs unit stride in its last dim"
    dev = qkv.device
    logits = torch.empty(B, num_heads, T, device=dev, dtype=torch.float32)
    cls_attn = torch.empty(B, T, device=dev, dtype=torch.float32)
    anchor_mask = torch.empty(B, T, device=dev, dtype=torch.int8)
    anchor_idx = torch.empty(B, k_anchors, device=dev, dtype=torch.int32)
    BLOCK_N = 64
    _cls_logits_kernel[(B, triton.cdiv(T, BLOCK_N))](
        qkv, logits,
        T, C, head_dim, num_heads, head_dim ** -0.5 if scale is None else scale,
        qkv.stride(0), qkv.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
    BLOCK_T = triton.next_power_of_2(T)
    _cls_anchors_kernel[(B,)](
        logits, cls_attn, anchor_mask, anchor_idx,
        T, num_heads, num_prefix, k_anchors,
        BLOCK_T=BLOCK_T, num_warps=8 if BLOCK_T >= 1024 else 4,
    )
    return cls_attn, anchor_mask, anchor_idx
