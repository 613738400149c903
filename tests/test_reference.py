"""The reference selection against SPEC.md's worked example and an independent brute force."""
import math
import re

import pytest
import torch

from tokenprune import PruneConfig, select_and_gather
from tokenprune.reference import select_reference


def worked_example_inputs():
    # SPEC.md: one head, d = 1, ln_1 and in_proj taken as identities, so Q = K = X.
    x = torch.tensor([0.0, 1.0, 2.0, 0.0, -1.0]).view(1, 5, 1)
    return x, x.repeat(1, 1, 3)


@pytest.mark.parametrize("score_norm, expected", [("none", [1, 4]), ("minmax", [1, 3])])
def test_worked_example(score_norm, expected):
    x, qkv = worked_example_inputs()
    keep = select_reference(x, qkv, num_heads=1, k_anchors=1, top_m=1, alpha=0.5, score_norm=score_norm)
    assert keep.tolist() == [expected]
    assert keep.dtype == torch.int64


def brute_force(x, qkv, H, k, m, alpha, score_norm, p=1, class_token=True, scale=None):
    """SPEC.md with plain Python loops over images, heads, rows and keys, in float64."""
    B, T, C = x.shape
    d = C // H
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = []
    for b in range(B):
        q = [[qkv[b, i, h * d:(h + 1) * d].double() for h in range(H)] for i in range(T)]
        kk = [[qkv[b, i, C + h * d:C + (h + 1) * d].double() for h in range(H)] for i in range(T)]
        P = [[0.0] * T for _ in range(T)]
        for h in range(H):
            for i in range(T):
                logits = [float(q[i][h] @ kk[j][h]) * scale for j in range(T)]
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                for j in range(T):
                    P[i][j] += e[j] / sum(e) / H
        received = [P[0][i] if class_token else sum(P[q_][i] for q_ in range(T)) / T
                    for i in range(T)]
        anchors = sorted(range(p, T), key=lambda i: (-received[i], i))[:k]
        xs = x[b].double()

        def cos(i, j):
            return float(xs[i] @ xs[j]) / (max(float(xs[i].norm()), 1e-8) * max(float(xs[j].norm()), 1e-8))

        cand = [i for i in range(p, T) if i not in anchors]
        imp = {i: sum(P[i][j] for j in anchors) / k for i in cand}
        div = {i: 1 - max(cos(i, j) for j in anchors) for i in cand}
        if score_norm == "minmax":
            for v in (imp, div):
                lo, hi = min(v.values()), max(v.values())
                for i in v:
                    v[i] = (v[i] - lo) / (hi - lo + 1e-12)
        score = {i: alpha * imp[i] + (1 - alpha) * div[i] for i in cand}
        chosen = sorted(cand, key=lambda i: (-score[i], i))[:m]
        out.append(sorted(anchors + chosen))
    return out


@pytest.mark.parametrize("B, T, H, d, k, m, alpha, score_norm", [
    (2, 17, 2, 8, 3, 5, 0.5, "none"),
    (1, 10, 1, 4, 1, 0, 0.0, "minmax"),     # m = 0: anchors only
    (3, 12, 3, 4, 4, 7, 1.0, "none"),       # k + m = N: everything kept
    (2, 26, 4, 6, 5, 9, 0.3, "minmax"),
    (1, 50, 2, 16, 10, 20, 0.7, "none"),
])
def test_matches_brute_force(B, T, H, d, k, m, alpha, score_norm):
    gen = torch.Generator().manual_seed(T * 31 + k)
    x = torch.randn(B, T, H * d, generator=gen)
    qkv = torch.randn(B, T, 3 * H * d, generator=gen)
    keep = select_reference(x, qkv, H, k, m, alpha, score_norm)
    assert keep.tolist() == brute_force(x, qkv, H, k, m, alpha, score_norm)


@pytest.mark.parametrize("B, T, H, d, k, m, p, class_token, scale", [
    (2, 17, 2, 8, 3, 5, 1, False, None),    # no class token (SigLIP): anchors by attention received
    (2, 21, 2, 4, 4, 6, 5, True, None),     # class token + 4 registers (DINOv2-style)
    (1, 14, 1, 8, 2, 3, 2, True, 0.2),      # class + distillation token (DeiT), own scale
    (2, 12, 2, 4, 3, 3, 0, False, None),    # no prefix token at all
    (1, 16, 2, 4, 2, 4, 3, False, 0.7),     # registers without a class token
])
def test_prefix_tokens_and_anchor_rule_match_brute_force(B, T, H, d, k, m, p, class_token, scale):
    gen = torch.Generator().manual_seed(T * 7 + p)
    x = torch.randn(B, T, H * d, generator=gen)
    qkv = torch.randn(B, T, 3 * H * d, generator=gen)
    for score_norm, alpha in (("none", 0.5), ("minmax", 0.3)):
        keep = select_reference(x, qkv, H, k, m, alpha, score_norm, num_prefix=p,
                                class_token=class_token, scale=scale)
        assert keep.tolist() == brute_force(x, qkv, H, k, m, alpha, score_norm, p, class_token, scale)
        assert (keep >= p).all()


def test_anchor_rule_without_class_token_differs_from_the_class_row():
    # The two rules must not silently agree: on random data they pick different anchors.
    gen = torch.Generator().manual_seed(5)
    x, qkv = torch.randn(4, 30, 8, generator=gen), torch.randn(4, 30, 24, generator=gen)
    with_cls = select_reference(x, qkv, 2, 3, 0, 0.5, num_prefix=1, class_token=True)
    without = select_reference(x, qkv, 2, 3, 0, 0.5, num_prefix=1, class_token=False)
    assert with_cls.tolist() != without.tolist()


def test_ties_go_to_the_lower_index():
    # Identical tokens: every attention and every score ties, so the lowest indices win.
    x = torch.ones(2, 9, 4)
    qkv = torch.ones(2, 9, 12)
    assert select_reference(x, qkv, 2, 2, 3, 0.5).tolist() == [[1, 2, 3, 4, 5]] * 2


def test_half_precision_input_accumulates_in_float32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=gen)
    qkv = torch.randn(2, 30, 48, generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        low = select_reference(x.to(dtype), qkv.to(dtype), 2, 4, 8, 0.5)
        assert low.tolist() == select_reference(x.to(dtype).float(), qkv.to(dtype).float(), 2, 4, 8, 0.5).tolist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_valid_distinct_indices(bad):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 8, generator=gen)
    qkv = torch.randn(2, 20, 24, generator=gen)
    x[0, 3] = bad
    qkv[1, :5] = bad
    keep = select_reference(x, qkv, 2, 3, 6, 0.5, "minmax")
    assert keep.shape == (2, 9)
    assert ((keep >= 1) & (keep <= 19)).all()
    assert all(len(set(row)) == 9 for row in keep.tolist())


def test_more_kept_than_patches_is_an_error():
    with pytest.raises(ValueError, match="k_anchors \\+ top_m"):
        select_reference(torch.randn(1, 5, 4), torch.randn(1, 5, 12), 1, 2, 3, 0.5)



@pytest.mark.parametrize("num_heads", [3, 0, -2, 2.0, True])
def test_a_head_count_that_does_not_divide_the_width_is_named(num_heads):
    """Width 8 splits into heads of 8 / num_heads channels: 3 does not divide it (issue 28: a
    bare reshape RuntimeError), and the others are no head count at all."""
    x, qkv = torch.randn(1, 5, 8), torch.randn(1, 5, 24)
    message = (rf"^num_heads must be a positive integer that divides the width C = 8 of x .*, "
               rf"got num_heads={num_heads!r}$")
    with pytest.raises(ValueError, match=message):
        select_reference(x, qkv, num_heads, 1, 1, 0.5)
    with pytest.raises(ValueError, match=message):
        select_and_gather(x, qkv, num_heads, PruneConfig(k_anchors=1, top_m=1))


@pytest.mark.parametrize("qkv_shape", [(1, 5, 20), (1, 5, 8), (1, 4, 24), (2, 5, 24), (5, 24)])
def test_a_qkv_that_is_not_three_times_the_width_is_named(qkv_shape):
    """qkv packs q, k and v of x's width C = 8 per token: (1, 5, 24) for x (1, 5, 8); a wrong
    width gave a bare reshape RuntimeError (issue 28)."""
    x = torch.randn(1, 5, 8)
    message = (r"^qkv must be \(B, T, 3 \* C\) = \(1, 5, 24\) for x of shape \(1, 5, 8\) "
               rf".*got qkv of shape {re.escape(str(qkv_shape))}$")
    with pytest.raises(ValueError, match=message):
        select_reference(x, torch.randn(qkv_shape), 2, 1, 1, 0.5)
    with pytest.raises(ValueError, match=message):
        select_and_gather(x, torch.randn(qkv_shape), 2, PruneConfig(k_anchors=1, top_m=1))


# ----- the other selections: cls and mmr (SPEC.md, "Other selections") ------------------------

def mmr_example_inputs():
    # SPEC.md's mmr example: one head, d = 2, scale 1, Q = K = X; X_0 is the CLS token.
    x = torch.tensor([[math.log(2), 0], [2, 0], [2, 2], [1, 0], [0, 1], [1, -1]]).view(1, 6, 2)
    return x, x.repeat(1, 1, 3)


@pytest.mark.parametrize("selection, mmr_lambda, expected", [
    ("mmr", 0.5, [1, 2, 5]),    # the worked example
    ("mmr", 1.0, [1, 2, 3]),    # g = r: patches 3 and 5 tie, the lower index wins
    ("cls", 0.5, [1, 2, 3]),    # the k + m = 3 largest a: 1 and 2 tie, then 3 and 5 tie
    ("score", 0.5, [1, 4, 5]),  # the seed's diversity against the anchor alone drops patch 2
])
def test_mmr_worked_example(selection, mmr_lambda, expected):
    x, qkv = mmr_example_inputs()
    keep = select_reference(x, qkv, 1, 1, 2, 0.5, scale=1.0, selection=selection,
                            mmr_lambda=mmr_lambda)
    assert keep.tolist() == [expected]


def mmr_brute_force(x, qkv, H, k, m, lam, p=1, class_token=True, scale=None):
    """SPEC.md's mmr with plain Python loops in float64: the anchor scores from the same
    attention as `brute_force`, then m greedy steps over explicit sets."""
    B, T, C = x.shape
    d = C // H
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = []
    for b in range(B):
        P = [[0.0] * T for _ in range(T)]
        for h in range(H):
            q = qkv[b, :, h * d:(h + 1) * d].double()
            kk = qkv[b, :, C + h * d:C + (h + 1) * d].double()
            for i in range(T):
                logits = [float(q[i] @ kk[j]) * scale for j in range(T)]
                e = [math.exp(v - max(logits)) for v in logits]
                for j in range(T):
                    P[i][j] += e[j] / sum(e) / H
        a = {i: P[0][i] if class_token else sum(P[r][i] for r in range(T)) / T
             for i in range(p, T)}
        kept = sorted(a, key=lambda i: (-a[i], i))[:k]
        top = max(a.values())
        xs = x[b].double()

        def cos(i, j):
            return float(xs[i] @ xs[j]) / (max(float(xs[i].norm()), 1e-8)
                                           * max(float(xs[j].norm()), 1e-8))

        for _ in range(m):
            gain = {i: lam * a[i] / top - (1 - lam) * max(cos(i, j) for j in kept)
                    for i in a if i not in kept}
            kept.append(max(gain, key=lambda i: (gain[i], -i)))
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("B, T, H, d, k, m, lam, p, class_token, scale", [
    (2, 17, 2, 8, 3, 5, 0.5, 1, True, None),
    (1, 10, 1, 4, 1, 8, 0.3, 1, True, None),     # k + m = N: every patch, in the greedy order
    (2, 26, 4, 6, 5, 9, 0.8, 1, True, None),
    (2, 21, 2, 4, 4, 6, 0.5, 5, True, None),     # class token + 4 registers
    (2, 17, 2, 8, 3, 5, 0.6, 1, False, None),    # no class token: anchors by attention received
    (2, 12, 2, 4, 3, 3, 0.2, 0, False, 0.7),     # no prefix token at all, own scale
    (1, 30, 2, 8, 4, 0, 0.5, 1, True, None),     # m = 0: the anchors alone
    (1, 30, 2, 8, 2, 10, 0.0, 1, True, None),    # lambda 0: redundancy alone after the anchors
])
def test_mmr_matches_brute_force(B, T, H, d, k, m, lam, p, class_token, scale):
    gen = torch.Generator().manual_seed(T * 13 + k)
    x = torch.randn(B, T, H * d, generator=gen)
    qkv = torch.randn(B, T, 3 * H * d, generator=gen)
    keep = select_reference(x, qkv, H, k, m, 0.5, num_prefix=p, class_token=class_token,
                            scale=scale, selection="mmr", mmr_lambda=lam)
    assert keep.tolist() == mmr_brute_force(x, qkv, H, k, m, lam, p, class_token, scale)


@pytest.mark.parametrize("p, class_token", [(1, True), (0, False), (3, False), (5, True)])
def test_cls_is_the_score_selection_with_every_patch_an_anchor(p, class_token):
    gen = torch.Generator().manual_seed(p)
    x, qkv = torch.randn(3, 40, 16, generator=gen), torch.randn(3, 40, 48, generator=gen)
    for k, m in ((1, 0), (3, 9), (5, 20)):
        cls = select_reference(x, qkv, 2, k, m, 0.5, num_prefix=p, class_token=class_token,
                               selection="cls")
        assert torch.equal(cls, select_reference(x, qkv, 2, k + m, 0, 0.5, num_prefix=p,
                                                 class_token=class_token))
        # And it is not blind to the rule: the seed's score keeps other patches.
        if m:
            assert not torch.equal(cls, select_reference(x, qkv, 2, k, m, 0.5, num_prefix=p,
                                                         class_token=class_token))


def test_mmr_differs_from_cls_and_from_the_seed():
    gen = torch.Generator().manual_seed(3)
    x, qkv = torch.randn(2, 50, 16, generator=gen), torch.randn(2, 50, 48, generator=gen)
    keep = {sel: select_reference(x, qkv, 2, 4, 12, 0.5, selection=sel)
            for sel in ("score", "cls", "mmr")}
    assert not torch.equal(keep["mmr"], keep["cls"])
    assert not torch.equal(keep["mmr"], keep["score"])


def test_mmr_ties_and_identical_tokens():
    # Every token the same: every a, r and cosine ties, so the lowest indices are kept.
    x, qkv = torch.ones(2, 9, 4), torch.ones(2, 9, 12)
    assert select_reference(x, qkv, 2, 2, 3, 0.5, selection="mmr").tolist() == \
        [[1, 2, 3, 4, 5]] * 2


def test_mmr_nan_rules():
    """SPEC: a NaN gain ranks above every number; once a token with NaN cosines is kept every
    candidate's redundancy is NaN, so the rest follow in index order."""
    gen = torch.Generator().manual_seed(4)
    x, qkv = torch.randn(1, 20, 8, generator=gen), torch.randn(1, 20, 24, generator=gen)
    clean = select_reference(x, qkv, 2, 3, 4, 0.5, selection="mmr")[0].tolist()
    candidates = [i for i in range(1, 20) if i not in clean]
    bad = candidates[-1]                         # a patch the clean run does not keep
    x[0, bad] = float("nan")
    keep = select_reference(x, qkv, 2, 3, 4, 0.5, selection="mmr")[0].tolist()
    anchors = select_reference(x, qkv, 2, 3, 0, 0.5)[0].tolist()
    # Its cosines to the anchors are NaN, so its gain is NaN: picked first; then every
    # candidate's redundancy is NaN: the three lowest-index candidates follow.
    rest = [i for i in range(1, 20) if i not in anchors and i != bad][:3]
    assert keep == sorted(anchors + [bad] + rest)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mmr_non_finite_attention_gives_valid_distinct_indices(bad):
    gen = torch.Generator().manual_seed(1)
    x, qkv = torch.randn(3, 20, 8, generator=gen), torch.randn(3, 20, 24, generator=gen)
    qkv[0, 0] = bad      # the CLS query: every a is NaN, so A has no finite entry: r = 0
    qkv[1, 5] = bad      # one bad key
    x[2] = bad           # a whole bad image
    for p, class_token in ((1, True), (2, False)):
        keep = select_reference(x, qkv, 2, 3, 6, 0.5, num_prefix=p, class_token=class_token,
                                selection="mmr")
        assert keep.shape == (3, 9)
        assert ((keep >= p) & (keep <= 19)).all()
        assert all(row == sorted(set(row)) and len(row) == 9 for row in keep.tolist())
