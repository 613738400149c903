"""Fused Triton kernels for the token selection of SPEC.md, one operation per file.

    cls_anchors   step 1     CLS attention row (head mean) and its top-k patches (2 kernels)
    importance    step 2     I: one online-softmax pass over all T keys per head
    diversity     step 3     D: cosine against the k anchor rows of X
    select_topm   steps 4-5  score, top-m candidates, ascending keep_idx
    gather_rows   the kept rows of x and qkv, CLS first

Six launches, no host synchronisation. Extra memory: O(B * T) rows, plus the CLS logits
(B, H, T) float32 (9.5 MB at B=256, T=577, H=16); never anything of size T x T.
"""
import torch

from .cls_anchors import cls_anchors
from .diversity import diversity
from .gather_rows import gather_rows
from .importance import importance
from .select_topm import select_topm

__all__ = ["select_and_gather", "select_tokens", "selection_scores"]


def _kernel_layout(t):
    """t itself when the kernels can read it through its strides, else a contiguous copy.

    The kernels need a unit channel stride, and they index the tokens of one image with int32
    offsets (the image offset is int64): (T - 1) * stride(1) + row length must fit in int32.
    Only exotic views (say (T, B, 3C) transposed at a batch in the thousands) get copied.
    """
    B, T, n = t.shape
    fits = (T - 1) * t.stride(1) + n < 2 ** 31
    return t if t.stride(-1) == 1 and fits else t.contiguous()


def selection_scores(x, qkv, num_heads, k_anchors):
    """The intermediates, for tests and debugging: a dict of float32 (B, T) rows `cls_attn`,
    `importance`, `diversity` (row 0, CLS, unused), `anchor_mask` (B, T) int8 and
    `anchor_idx` (B, k) int32 ascending."""
    x, qkv = _kernel_layout(x), _kernel_layout(qkv)
    cls_attn, anchor_mask, anchor_idx = cls_anchors(qkv, num_heads, k_anchors)
    return dict(cls_attn=cls_attn, anchor_mask=anchor_mask, anchor_idx=anchor_idx,
                importance=importance(qkv, num_heads, anchor_idx),
                diversity=diversity(x, anchor_idx))


def select_tokens(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix=1,
                  class_token=True, scale=None):
    """keep_idx (B, k+m) int64, ascending: the kept patch indices into the T tokens.

    x: block input (B, T, C); qkv: in_proj(ln_1(x)) (B, T, 3C), packed like
    nn.MultiheadAttention. Same dtype (float32/float16/bfloat16); views are fine as long as
    the last dim has unit stride. Requires 1 <= k_anchors, 0 <= top_m, k_anchors + top_m <= T - 1
    (the block never asks for more), score_norm in {"none", "minmax"}.
    """
    B, T, C = x.shape
    if qkv.shape != (B, T, 3 * C) or qkv.dtype != x.dtype or C % num_heads:
        raise ValueError(f"select_and_gather needs x (B, T, C) and qkv (B, T, 3C) of one dtype "
                         f"with C divisible by num_heads={num_heads}, got x {tuple(x.shape)} "
                         f"{x.dtype}, qkv {tuple(qkv.shape)} {qkv.dtype}")
    if not (1 <= k_anchors and 0 <= top_m and k_anchors + top_m <= T - 1):
        raise ValueError(f"need 1 <= k_anchors, 0 <= top_m, k_anchors + top_m <= {T - 1} patch "
                         f"tokens, got k_anchors={k_anchors}, top_m={top_m}")
    if score_norm not in ("none", "minmax"):
        raise ValueError(f"score_norm must be 'none' or 'minmax', got {score_norm!r}")
    if num_prefix != 1 or not class_token or scale not in (None, (C // num_heads) ** -0.5):
        raise NotImplementedError("the Triton kernels handle one class token at index 0 and the "
                                  "d ** -0.5 scale only; use backend='reference'")
    s = selection_scores(x, qkv, num_heads, k_anchors)
    return select_topm(s["importance"], s["diversity"], s["anchor_mask"], k_anchors, top_m,
                       alpha, score_norm)


def select_and_gather(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix=1,
                      class_token=True, scale=None):
    """(keep_idx, x_kept (B, 1+k+m, C), qkv_kept (B, 1+k+m, 3C)): `select_tokens`, then the
    CLS + kept rows copied contiguously. The copy has no backward: where gradients must reach
    the kept rows, gather them with torch instead (tokenprune.selection does)."""
    keep_idx = select_tokens(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix,
                             class_token, scale)
    return (keep_idx, *gather_rows(_kernel_layout(x), _kernel_layout(qkv), keep_idx))
