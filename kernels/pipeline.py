"""Fused Triton kernels for the token selection of SPEC.md, one operation per file.

    cls_anchors       step 1     with a class token: its attention row (head mean), top-k
    softmax_stats     step 1     without one: each row's softmax max and sum over all T keys
    received_anchors  step 1     without one: the attention each patch receives (column means
                                 of P, from softmax_stats's normalisers), top-k
    importance        step 2     I: each row's normaliser (its own online-softmax pass over all
                                 T keys, or softmax_stats's), then the k anchor columns
    diversity         step 3     D: cosine against the k anchor rows of X
    select_topm       steps 4-5  score, top-m candidates, ascending keep_idx
    mmr               -          the mmr selection: m greedy steps after the anchors, one
                                 program per image (SPEC.md, maximal marginal relevance)
    gather_rows       -          the p prefix rows, then the kept rows, of x and qkv
    (dot.py and topk.py hold the tile product and the exact top-k that the kernels share.)

The kernels know nothing of model families: the prefix count p, the anchor rule (class token
or not) and the logit scale are plain arguments. No host synchronisation. Launches:
    with a class token  6: cls_anchors (2), importance, diversity, select_topm, gather_rows;
                        the T x T logits are computed once (importance).
    without one         7: softmax_stats, received_anchors (2), importance, diversity,
                        select_topm, gather_rows; the T x T logits are computed twice
                        (softmax_stats, then the column sums), and importance, reading the
                        stored normalisers, only the k anchor columns.
The other selections reuse step 1: "cls" is the anchor pass with k + m anchors (2 launches
with a class token, 3 without, then gather_rows); "mmr" is the anchor pass with k anchors, then
mmr (3 or 4, then gather_rows). select_tokens launches one fewer (no gather_rows). Extra memory: O(B * T) rows, plus with a
class token its logits (B, H, T) float32 (9.5 MB at B=256, T=577, H=16), without one the row
max and sum, (B, H, T) float32 each (23.9 MB at B=256, T=729, H=16); never anything T x T.
"""
import torch

from .cls_anchors import cls_anchors
from .diversity import diversity
from .gather_rows import gather_rows
from .importance import importance
from .mmr import mmr
from .received_anchors import received_anchors
from .select_topm import select_topm
from .softmax_stats import softmax_stats

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


def selection_scores(x, qkv, num_heads, k_anchors, num_prefix=1, class_token=True, scale=None):
    """The intermediates, for tests and debugging: a dict of float32 (B, T) rows
    `anchor_score` (a_i: the class token's attention row, or without a class token the
    attention each token receives), `importance`, `diversity` (the prefix entries of all three
    unused), `anchor_mask` (B, T) int8 and `anchor_idx` (B, k) int32 ascending."""
    x, qkv = _kernel_layout(x), _kernel_layout(qkv)
    anchor_score, anchor_mask, anchor_idx, row_stats = _anchors(qkv, num_heads, k_anchors,
                                                                num_prefix, class_token, scale)
    return dict(anchor_score=anchor_score, anchor_mask=anchor_mask, anchor_idx=anchor_idx,
                importance=importance(qkv, num_heads, anchor_idx, scale, row_stats),
                diversity=diversity(x, anchor_idx))


def _anchors(qkv, num_heads, count, num_prefix, class_token, scale):
    """Step 1 with `count` anchors: (anchor_score (B, T), anchor_mask, anchor_idx, row_stats);
    row_stats is softmax_stats's output without a class token, else None (importance then
    computes each row's normaliser in its own pass)."""
    if class_token:
        return (*cls_anchors(qkv, num_heads, count, num_prefix, scale), None)
    row_stats = softmax_stats(qkv, num_heads, scale)
    return (*received_anchors(qkv, num_heads, count, row_stats, num_prefix, scale), row_stats)


def _check_arguments(x, qkv, num_heads, k_anchors, top_m, score_norm, num_prefix, class_token,
                     scale, selection="score", mmr_lambda=None):
    """ValueError for arguments the kernels cannot take; returns scale as a float (None stays)."""
    B, T, C = x.shape
    if qkv.shape != (B, T, 3 * C) or qkv.dtype != x.dtype or C % num_heads:
        raise ValueError(f"select_and_gather needs x (B, T, C) and qkv (B, T, 3C) of one dtype "
                         f"with C divisible by num_heads={num_heads}, got x {tuple(x.shape)} "
                         f"{x.dtype}, qkv {tuple(qkv.shape)} {qkv.dtype}")
    if not (isinstance(num_prefix, int) and (1 if class_token else 0) <= num_prefix < T):
        raise ValueError(f"num_prefix must be an integer in [{1 if class_token else 0}, {T - 1}] "
                         f"(T={T} tokens; class_token={class_token} needs the class token among "
                         f"the prefix), got {num_prefix!r}")
    patches = T - num_prefix
    if not (1 <= k_anchors and 0 <= top_m and k_anchors + top_m <= patches):
        raise ValueError(f"need 1 <= k_anchors, 0 <= top_m, k_anchors + top_m <= {patches} patch "
                         f"tokens, got k_anchors={k_anchors}, top_m={top_m}")
    if score_norm not in ("none", "minmax"):
        raise ValueError(f"score_norm must be 'none' or 'minmax', got {score_norm!r}")
    if selection not in ("score", "cls", "mmr"):
        raise ValueError(f"selection must be 'score', 'cls' or 'mmr', got {selection!r}")
    if selection == "mmr" and not (isinstance(mmr_lambda, (int, float))
                                   and 0.0 <= mmr_lambda <= 1.0):
        raise ValueError(f"mmr_lambda must be a number in [0, 1] for selection='mmr', "
                         f"got {mmr_lambda!r}")
    if scale is None:
        return None
    try:
        value = float(scale)  # a Python number, or a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"scale must be a positive finite number or None (d ** -0.5), "
                         f"got {scale!r}")
    return value


def select_tokens(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix=1,
                  class_token=True, scale=None, selection="score", mmr_lambda=None):
    """keep_idx (B, k+m) int64, ascending: the kept patch indices into the T tokens (all >= p).

    x: block input (B, T, C); qkv: (B, T, 3C), [q | k | v] as the block's attention uses them.
    Same dtype (float32/float16/bfloat16); views are fine as long as the last dim has unit
    stride. num_prefix: p, the leading tokens that are always kept and never chosen (1 <= p
    with a class token, which is token 0; 0 <= p without). class_token: anchor scores from the
    class token's row, or else from the attention each patch receives (SPEC.md). scale: the
    attention's logit scale, d ** -0.5 when None. Requires 1 <= k_anchors, 0 <= top_m,
    k_anchors + top_m <= T - p (the block never asks for more), score_norm in
    {"none", "minmax"}. selection: "score" (SPEC steps 1-5, alpha and score_norm), "cls" (the
    k + m patches with the largest anchor scores) or "mmr" (maximal marginal relevance with
    weight mmr_lambda in [0, 1], required then).
    """
    scale = _check_arguments(x, qkv, num_heads, k_anchors, top_m, score_norm, num_prefix,
                             class_token, scale, selection, mmr_lambda)
    if selection == "cls":
        anchor_idx = _anchors(_kernel_layout(qkv), num_heads, k_anchors + top_m, num_prefix,
                              class_token, scale)[2]
        return anchor_idx.long()
    if selection == "mmr":
        anchor_score, anchor_mask, anchor_idx, _ = _anchors(_kernel_layout(qkv), num_heads,
                                                            k_anchors, num_prefix, class_token,
                                                            scale)
        return mmr(_kernel_layout(x), anchor_score, anchor_mask, anchor_idx, top_m, mmr_lambda,
                   num_prefix)
    s = selection_scores(x, qkv, num_heads, k_anchors, num_prefix, class_token, scale)
    return select_topm(s["importance"], s["diversity"], s["anchor_mask"], k_anchors, top_m,
                       alpha, score_norm, num_prefix)


def select_and_gather(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix=1,
                      class_token=True, scale=None, selection="score", mmr_lambda=None):
    """(keep_idx, x_kept (B, p+k+m, C), qkv_kept (B, p+k+m, 3C)): `select_tokens`, then the p
    prefix rows and the kept rows copied contiguously. The copy has no backward: where gradients
    must reach the kept rows, gather them with torch instead (tokenprune.selection does)."""
    keep_idx = select_tokens(x, qkv, num_heads, k_anchors, top_m, alpha, score_norm, num_prefix,
                             class_token, scale, selection, mmr_lambda)
    return (keep_idx, *gather_rows(_kernel_layout(x), _kernel_layout(qkv), keep_idx, num_prefix))


def select_units(features, q, k, scale, merge2, k_anchors, top_m, selection, alpha, score_norm,
                 mmr_lambda, class_token=False):
    """The unit selection of one image whose patches attend to each other only (a full-attention
    block), with the Triton kernels: the patch scores from the online-softmax passes (no N x N
    map), their unit means, then the kernels' anchors, mmr, or importance over the anchor units'
    patches, diversity and top-m on the units. keep (kept,) int64, ascending. class_token: q and
    k hold a class token's row first, whose attention row (cls_anchors) gives the patch scores;
    every row's softmax counts its key."""
    T, H, d = q.shape
    p = 1 if class_token else 0
    units = (T - p) // merge2
    packed = torch.cat([q.reshape(T, H * d), k.reshape(T, H * d),
                        torch.zeros_like(k).reshape(T, H * d)], dim=1)[None].contiguous()
    if class_token:  # importance then normalises each row in its own pass
        stats = None
        received = cls_anchors(packed, H, 1, 1, scale)[0][:, 1:]           # (1, N)
    else:
        stats = softmax_stats(packed, H, scale)
        received = received_anchors(packed, H, 1, stats, 0, scale)[0]       # (1, N)
    score = received.reshape(1, units, merge2).mean(dim=-1)                # (1, n)
    # The unit scores are n means (n at most a few thousand): a stable sort ranks them, ties to
    # the lower unit as in the kernels' top-k.
    ranked = torch.sort(score, dim=-1, descending=True, stable=True).indices
    if selection == "cls":
        return ranked[:, :k_anchors + top_m].sort(dim=-1).values[0]
    anchor_idx = ranked[:, :k_anchors].sort(dim=-1).values                   # (1, k)
    anchor_mask = torch.zeros(1, units, dtype=torch.int8, device=q.device)
    anchor_mask[0, anchor_idx[0]] = 1
    features = features[None].contiguous()
    if selection == "mmr":
        return mmr(features, score.contiguous(), anchor_mask, anchor_idx.int(), top_m,
                   mmr_lambda, 0)[0]
    patches = (anchor_idx[..., None] * merge2 + torch.arange(merge2, device=q.device)) + p
    weight = importance(packed, H, patches.reshape(1, -1).int(), scale, stats)[:, p:]
    unit_importance = weight.reshape(1, units, merge2).mean(dim=-1).contiguous()
    return select_topm(unit_importance, diversity(features, anchor_idx.int()), anchor_mask,
                       k_anchors, top_m, alpha, score_norm, 0)[0]
