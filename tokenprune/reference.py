"""The PyTorch reference selection: SPEC.md in code. Every backend is tested against this.

Shapes: B images, T = p + N tokens (the p prefix tokens first: p = 1, the CLS token, for
OpenCLIP's VisionTransformer), C channels, H heads of size d = C / H.
"""
from numbers import Integral
from typing import Optional

import torch

from .config import MMR_LAMBDA

EPS_COS = 1e-8
EPS_MINMAX = 1e-12


def top_indices(values, count):
    """Indices of the `count` largest entries along the last dim, ties to the lower index.

    A stable descending sort keeps equal values in index order; NaN sorts first.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]


def minmax(values, candidate):
    """Rescale `values` to [0, 1] over the entries where `candidate` is True."""
    lo = values.masked_fill(~candidate, float("inf")).amin(dim=-1, keepdim=True)
    hi = values.masked_fill(~candidate, float("-inf")).amax(dim=-1, keepdim=True)
    return (values - lo) / (hi - lo + EPS_MINMAX)


def head_mean_attention(qkv, num_heads, scale=None):
    """Step 0: P (B, T, T), the head-averaged attention; rows are queries, softmax over all T keys.

    qkv holds q and k exactly as the block's attention uses them (after any q/k norm and rotary
    embedding); `scale` is the block's own, d ** -0.5 when None."""
    B, T, C3 = qkv.shape
    d = C3 // 3 // num_heads
    q, k, _ = qkv.float().view(B, T, 3, num_heads, d).unbind(dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * (d ** -0.5 if scale is None else scale)
    return logits.softmax(dim=-1).mean(dim=1)


def anchor_scores(P, num_prefix=1, class_token=True):
    """Step 1's a_i for the patches p..T-1, (B, N): the class token's (index 0) attention row,
    or without a class token the attention each patch receives, averaged over all T queries."""
    if class_token:
        return P[:, 0, num_prefix:]
    # Each column's mean taken as a row of its own: torch sums across the rows of (B, T, N) in
    # vector lanes and a scalar tail, in different orders, so that equal patches could get
    # unequal scores and break the tie rule.
    return P[:, :, num_prefix:].transpose(1, 2).contiguous().mean(dim=-1)


def anchor_indices(P, k_anchors, num_prefix=1, class_token=True):
    """Step 1: the k patches with the largest anchor scores (prefix tokens never), (B, k) in p..T-1."""
    return top_indices(anchor_scores(P, num_prefix, class_token), k_anchors) + num_prefix


def check_inputs(x, qkv, num_heads):
    """ValueError naming the argument when x (B, T, C), qkv (B, T, 3C) and num_heads do not fit
    together; without this, the reshape into heads fails with a bare "shape ... is invalid"."""
    if x.dim() != 3:
        raise ValueError(f"x must be the block input (B, T, C), got a tensor of shape "
                         f"{tuple(x.shape)}")
    B, T, C = x.shape
    if qkv.shape != (B, T, 3 * C):
        raise ValueError(f"qkv must be (B, T, 3 * C) = {(B, T, 3 * C)} for x of shape "
                         f"{(B, T, C)} (q, k and v of width C each, packed per token), got qkv of "
                         f"shape {tuple(qkv.shape)}")
    if (isinstance(num_heads, bool) or not isinstance(num_heads, Integral) or num_heads < 1
            or C % num_heads):
        raise ValueError(f"num_heads must be a positive integer that divides the width C = {C} "
                         f"of x (each head gets C / num_heads channels), got num_heads="
                         f"{num_heads!r}")


def select_reference(x: torch.Tensor, qkv: torch.Tensor, num_heads: int, k_anchors: int,
                     top_m: int, alpha: float, score_norm: str = "none", num_prefix: int = 1,
                     class_token: bool = True, scale: Optional[float] = None,
                     selection: str = "score", mmr_lambda: float = MMR_LAMBDA) -> torch.Tensor:
    """keep_idx (B, k_anchors + top_m): kept patch indices into the T tokens, ascending, >= p.

    x: block input (B, T, C), the residual stream before the block's first norm.
    qkv: (B, T, 3C), [q | k | v] as the block's attention uses them (OpenCLIP: in_proj(ln_1(x))
    as nn.MultiheadAttention packs it).
    num_prefix: p, the leading tokens that are always kept and never chosen (class, registers).
    class_token: whether token 0 is a class token (anchor scores from its row) or not (from the
    attention each patch receives). scale: the attention's logit scale, d ** -0.5 when None.
    selection: "score" (steps 1-5, alpha and score_norm), "cls" (the k + m patches with the
    largest anchor scores) or "mmr" (maximal marginal relevance, weight mmr_lambda).
    ValueError when the shapes of x and qkv and num_heads do not fit together.
    """
    check_inputs(x, qkv, num_heads)
    return select_from_attention(head_mean_attention(qkv, num_heads, scale), x, k_anchors, top_m,
                                 alpha, score_norm, num_prefix, class_token, selection,
                                 mmr_lambda)


def select_from_attention(P, x, k_anchors, top_m, alpha, score_norm="none", num_prefix=1,
                          class_token=True, selection="score", mmr_lambda=MMR_LAMBDA):
    """The selection on the head-averaged attention P (B, T, T) of step 0 and block input x."""
    P = P.float()
    B, T, C = x.shape
    p = num_prefix
    N = T - p
    if k_anchors + top_m > N:
        raise ValueError(f"k_anchors + top_m must be <= the {N} patch tokens, "
                         f"got {k_anchors} + {top_m}")
    if selection == "cls":  # step 1 with k + m anchors
        return anchor_indices(P, k_anchors + top_m, p, class_token).sort(dim=-1).values
    if selection == "mmr":
        return select_mmr(P, x, k_anchors, top_m, mmr_lambda, p, class_token)
    if selection != "score":
        raise ValueError(f"selection must be 'score', 'cls' or 'mmr' here, got {selection!r}")
    anchors = anchor_indices(P, k_anchors, p, class_token)                 # step 1, (B, k)
    patches = torch.arange(p, T, device=x.device)
    is_anchor = (patches[None, :, None] == anchors[:, None, :]).any(dim=-1)  # (B, N)

    # Step 2: importance I_i = mean over anchors j of P[i, j], for every patch i.
    to_anchors = P[:, p:, :].gather(2, anchors[:, None, :].expand(B, N, k_anchors))
    importance = to_anchors.mean(dim=-1)                                   # (B, N)

    # Step 3: diversity D_i = 1 - max over anchors of cos(X_i, X_j), on the residual stream.
    xf = x.float()
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(EPS_COS)
    anchor_unit = unit.gather(1, anchors[:, :, None].expand(B, k_anchors, C))
    cos = unit[:, p:] @ anchor_unit.transpose(1, 2)                        # (B, N, k)
    diversity = 1 - cos.amax(dim=-1)                                       # (B, N)

    # Step 4: score the candidates R (patches that are not anchors), keep the top m.
    candidate = ~is_anchor
    if score_norm == "minmax":
        importance = minmax(importance, candidate)
        diversity = minmax(diversity, candidate)
    score = alpha * importance + (1 - alpha) * diversity
    # Anchors must never be picked again, whatever the scores (NaN and -inf included):
    # order by score, then move the anchors behind every candidate with a second stable sort.
    by_score = top_indices(score, N)
    by_score = by_score.gather(1, torch.sort(is_anchor.gather(1, by_score).to(torch.uint8),
                                             dim=-1, stable=True).indices)
    chosen = by_score[:, :top_m] + p                                       # (B, m)

    # Step 5: anchors and chosen candidates, in ascending (spatial) order.
    return torch.cat([anchors, chosen], dim=1).sort(dim=-1).values


def unit_rows(x):
    """x / max(|x|, eps) per token, in float32: cos(u, v) of SPEC step 3 is unit(u) . unit(v)."""
    xf = x.float()
    return xf / xf.norm(dim=-1, keepdim=True).clamp_min(EPS_COS)


def relevance(a):
    """a / max(a) per image, max over the finite entries; all zero where that max is not > 0."""
    top = a.masked_fill(~a.isfinite(), float("-inf")).amax(dim=-1, keepdim=True)
    return torch.where(top > 0, a / top, torch.zeros_like(a))


def select_mmr(P, x, k_anchors, top_m, mmr_lambda, num_prefix=1, class_token=True):
    """SPEC.md, "`mmr`: selection by maximal marginal relevance": the k anchors, then top_m
    greedy steps, each keeping the candidate with the largest
    g_i = lambda * a_i / max(a) - (1 - lambda) * max_{j kept} cos(X_i, X_j)."""
    B, T, C = x.shape
    p = num_prefix
    anchors = anchor_indices(P, k_anchors, p, class_token)                 # (B, k)
    rel = relevance(anchor_scores(P, p, class_token))                      # (B, N)
    unit = unit_rows(x)[:, p:]                                             # (B, N, C)
    kept = torch.zeros(B, T - p, dtype=torch.bool, device=x.device)
    kept.scatter_(1, anchors - p, True)

    def cos_to(j):
        """cos(X_i, X_j) for every patch i, (B, N), j (B, 1) patch positions. A product and a
        row sum (not a matmul), so that equal tokens get bit-equal cosines (the tie rule)."""
        return (unit * unit.gather(1, j[..., None].expand(B, 1, C))).sum(dim=-1)

    # The running max over the kept patches of cos(X_i, X_j), for every patch i; NaN stays.
    redundancy = torch.full((B, T - p), float("-inf"), device=x.device)
    for s in range(k_anchors):
        redundancy = torch.maximum(redundancy, cos_to(anchors[:, s:s + 1] - p))
    chosen = []
    for _ in range(top_m):
        gain = mmr_lambda * rel - (1 - mmr_lambda) * redundancy
        # Candidate gains are never -inf (rel is finite or NaN, cos in [-1, 1] or NaN).
        pick = top_indices(gain.masked_fill(kept, float("-inf")), 1)          # (B, 1)
        kept.scatter_(1, pick, True)
        chosen.append(pick + p)
        redundancy = torch.maximum(redundancy, cos_to(pick))
    return torch.cat([anchors, *chosen], dim=1).sort(dim=-1).values


# --- units: groups of patches that the language model receives as one token -------------------

def unit_attention(q, k, segment, scale, units, merge2, chunk_elements=1 << 20, num_prefix=0):
    """P_U (n, n), SPEC's unit attention, for one image: q, k (N, H, d) after the rotary
    embedding, rows in unit order (the s^2 patches of unit u are rows s^2 u ..); segment (N,)
    the attention segment of each row (keys outside a query's segment get no attention), or None
    where every patch attends to the whole image. num_prefix: k holds that many prefix rows
    (a class token) before the N patches, whose keys each row's softmax counts too (segment
    None then); P_U is over the patches only.

    One head and a band of whole units' query rows at a time (about `chunk_elements` logits),
    so that no N x N map is ever alive; the keys are taken patch position first (the first
    patch of every unit, then the second, ..), so that a unit's keys are summed as s^2
    contiguous slices rather than a strided reduction. At Qwen2.5-VL-7B's 4784 patches on a
    2-core CPU this takes about 0.7 s for 16 heads, against 2.2 s for a whole map per head."""
    N, H, _ = q.shape
    p = num_prefix
    P_units = torch.zeros(units, units, dtype=torch.float32, device=q.device)
    band = max(1, chunk_elements // (N * merge2)) * merge2
    by_position = torch.arange(N, device=q.device).view(units, merge2).T.reshape(-1)
    for h in range(H):
        keys = torch.cat([k[:p, h], k[p:][by_position, h]]).float().T.contiguous()
        for start in range(0, N, band):
            logits = q[start:start + band, h].float() @ keys
            logits.mul_(scale)
            if segment is not None:
                same = segment[start:start + band, None] == segment[by_position][None, :]
                logits.masked_fill_(~same, float("-inf"))
            rows = logits.shape[0]
            to_units = logits.softmax(dim=-1)[:, p:].reshape(rows, merge2, units).sum(dim=1)
            P_units[start // merge2:(start + rows) // merge2] += (
                to_units.view(rows // merge2, merge2, units).sum(dim=1))
    return P_units / (H * merge2 * merge2)


def select_units_reference(features, q, k, segment, scale, merge2, k_anchors, top_m, config,
                           class_token=False):
    """SPEC.md, "Image tokens for Qwen2-VL, ...": the kept units (kept,) int64, ascending, of
    one image whose N = n * merge2 patches are in unit order: features (n, merge2 * C) each
    unit's patches side by side, q and k (N, H, d) after the rotary embedding, segment (N,) or
    None as in unit_attention. The selection of select_from_attention on the unit attention.

    class_token (SPEC.md, "Image tokens for InternVL"): q and k hold the class token's row
    first (1 + N rows, segment None); a unit's anchor score is the mean of the class token's
    attention to its patches (softmax over all 1 + N keys), and the unit attention's rows
    count the class token's key too. The unit attention is computed for "score" only, the one
    selection that reads it there."""
    units = features.shape[0]
    if not class_token:
        P_units = unit_attention(q, k, segment, scale, units, merge2)
        return select_from_attention(
            P_units[None], features[None], k_anchors, top_m, config.alpha, config.score_norm,
            num_prefix=0, class_token=False, selection=config.selection,
            mmr_lambda=config.mmr_lambda)[0]
    # P over the class token and the units: row 0 the class token's unit scores, then P_U.
    P = torch.zeros(1 + units, 1 + units, dtype=torch.float32, device=q.device)
    to_keys = torch.einsum("hd,jhd->hj", q[0].float(), k.float()).mul_(scale).softmax(dim=-1)
    P[0, 1:] = to_keys.mean(dim=0)[1:].view(units, merge2).mean(dim=1)
    if config.selection == "score":
        P[1:, 1:] = unit_attention(q[1:], k, None, scale, units, merge2, num_prefix=1)
    features = torch.cat([features.new_zeros(1, features.shape[1]), features])
    return select_from_attention(
        P[None], features[None], k_anchors, top_m, config.alpha, config.score_norm,
        num_prefix=1, class_token=True, selection=config.selection,
        mmr_lambda=config.mmr_lambda)[0] - 1
