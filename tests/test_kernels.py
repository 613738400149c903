"""The Triton selection kernels against the PyTorch reference (SPEC.md).

On a CPU machine the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported. On a GPU machine,
`TOKENPRUNE_TEST_DEVICE=cuda pytest tests/test_kernels.py` runs the same tests compiled on the
GPU, with float16/bfloat16 added.
"""
import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")

from tokenprune.kernels.pipeline import select_and_gather, selection_scores  # noqa: E402
from tokenprune.kernels.select_topm import select_topm  # noqa: E402
from tokenprune.kernels.topk import top_count_mask  # noqa: E402
from tokenprune.reference import select_reference  # noqa: E402
from tokenprune.selection import gather_kept  # noqa: E402

LOW_PRECISION = [torch.float16, torch.bfloat16]
ALL_SCORINGS = [(alpha, norm) for norm in ("none", "minmax") for alpha in (0.0, 0.5, 1.0)]
if DEVICE == "cpu" and type(top_count_mask).__name__ != "InterpretedFunction":
    raise RuntimeError("the kernels were compiled, not interpreted: triton was imported before "
                       "tests/conftest.py set TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _kernels_can_run():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("TOKENPRUNE_TEST_DEVICE=cuda but no CUDA device")


def make_inputs(B, T, C, dtype=torch.float32, seed=0):
    """Random normal block input x (B, T, C) and packed qkv (B, T, 3C): tie-free in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    qkv = torch.randn(B, T, 3 * C, generator=g)
    return x.to(DEVICE, dtype), qkv.to(DEVICE, dtype)


def reference_scores(x, qkv, num_heads, anchors, class_token=True, scale=None):
    """SPEC steps 0-3 in float32 for given anchors (B, k), over all T tokens: the anchor scores
    (the class token's row, or without one the column means of P), I and D."""
    B, T, C = x.shape
    d = C // num_heads
    q, k, _ = qkv.float().view(B, T, 3, num_heads, d).unbind(dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * (d ** -0.5 if scale is None else scale)
    P = logits.softmax(dim=-1).mean(dim=1)
    anchors = anchors.long()
    importance = P.gather(2, anchors[:, None, :].expand(B, T, -1)).mean(dim=-1)
    xf = x.float()
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = unit @ unit.gather(1, anchors[..., None].expand(-1, -1, C)).transpose(1, 2)
    return P[:, 0] if class_token else P.mean(dim=1), importance, 1 - cos.amax(dim=-1)


def assert_same_idx(got, want):
    if not torch.equal(got, want):
        rows = (got != want).any(dim=-1).nonzero().flatten().tolist()
        b = rows[0]
        raise AssertionError(f"keep_idx differs in images {rows}; image {b}:\n"
                             f"  kernel    {got[b].tolist()}\n  reference {want[b].tolist()}")


def check_selection(x, qkv, H, k, m, alpha, norm, p=1, class_token=True, scale=None):
    """keep_idx equal to the reference; x_kept/qkv_kept exactly the p prefix + kept input rows."""
    tower = (p, class_token, scale)
    keep_idx, x_kept, qkv_kept = select_and_gather(x, qkv, H, k, m, alpha, norm, *tower)
    want = select_reference(x, qkv, H, k, m, alpha, norm, *tower)
    assert keep_idx.dtype == torch.int64 and keep_idx.shape == (x.shape[0], k + m)
    assert_same_idx(keep_idx, want)
    x_want, qkv_want = gather_kept(x, qkv, want, p)
    assert x_kept.is_contiguous() and qkv_kept.is_contiguous()
    assert x_kept.dtype == x.dtype and qkv_kept.dtype == qkv.dtype
    assert torch.equal(x_kept, x_want) and torch.equal(qkv_kept, qkv_want)
    return keep_idx


# (B, T, C, H, p, class_token, scale, k, m, alpha, score_norm): which code path each shape
# exercises. p prefix tokens; class_token=True takes the anchor scores from row 0
# (cls_anchors.py), False from the column means of P (softmax_stats.py + received_anchors.py,
# and importance.py reading the stored row normalisers); scale None is d ** -0.5.
SHAPES = [
    # OpenCLIP ViT (p=1, class token). T below every block size (BLOCK_M/N = 32 in fp32,
    # 64 CLS keys), H=1, k=1, m=0, d=64.
    (2, 17, 64, 1, 1, True, None, 1, 0, 0.5, "none"),
    # T=50 (ViT-B/32 at 224): non-power-of-two, one partial key block after a full one.
    (2, 50, 128, 2, 1, True, None, 4, 12, 0.5, "minmax"),
    # d=80 (ViT-H/14 head size): BLOCK_D=128 padded with masks; k+m = N-1; T = 64 + 1.
    (1, 65, 160, 2, 1, True, None, 3, 60, 1.0, "none"),
    # d=128, B=1, C=256 (several 64-channel chunks in the diversity pass).
    (1, 37, 256, 2, 1, True, None, 5, 10, 0.0, "minmax"),
    # T=145 (12x12+1): several query and key blocks; k=33 > BLOCK_A=32: two anchor chunks.
    (3, 145, 96, 3, 1, True, None, 33, 40, 0.5, "none"),
    # T=1025 (32x32+1): BLOCK_T=2048 rows in the per-image kernels, many key blocks.
    (1, 1025, 64, 1, 1, True, None, 8, 100, 0.5, "minmax"),
    # SigLIP-like (p=0, no class token): every token a patch; T=25 (5x5) below the blocks.
    (2, 25, 64, 1, 0, False, None, 3, 7, 0.5, "none"),
    # p=0, no class token, the block's own scale (1.0, not d ** -0.5 = 0.125), d=64, T=49 odd:
    # a full and a partial query block in the column pass, k+m = N - 1.
    (2, 49, 128, 2, 0, False, 1.0, 4, 44, 0.5, "minmax"),
    # p=1 without a class token (a prefix token that is only kept), d=80 padded to 128.
    (1, 37, 160, 2, 1, False, None, 2, 9, 0.5, "none"),
    # DeiT-like (class + distillation token, p=2), class token, non-default scale, T=51 odd.
    (2, 51, 64, 2, 2, True, 0.3, 4, 15, 0.5, "minmax"),
    # Registers without a class token (p=2), T=97: several key blocks per image in the column
    # pass and several query blocks in its loop.
    (1, 97, 64, 2, 2, False, None, 5, 20, 1.0, "none"),
    # Class token + 4 registers (p=5, DINOv2-style), d=80, T=41; the anchors' class row skips
    # the registers.
    (2, 41, 160, 2, 5, True, None, 6, 10, 0.0, "none"),
    # Registers only (p=5, no class token), H=4, scale 0.05, T=69: k+m = N (nothing pruned,
    # which the block short-circuits, but the kernels must still list every patch).
    (1, 69, 128, 4, 5, False, 0.05, 16, 48, 0.5, "minmax"),
]
TOWER = "p,class_token,scale"


@pytest.mark.parametrize("B,T,C,H," + TOWER + ",k,m,alpha,norm", SHAPES)
def test_matches_reference(B, T, C, H, p, class_token, scale, k, m, alpha, norm):
    x, qkv = make_inputs(B, T, C)
    tower = (p, class_token, scale)
    check_selection(x, qkv, H, k, m, alpha, norm, *tower)
    # Steps 4-5 for every alpha and score_norm on the same I and D (cheap: no new attention).
    s = selection_scores(x, qkv, H, k, *tower)
    for alpha, norm in ALL_SCORINGS:
        got = select_topm(s["importance"], s["diversity"], s["anchor_mask"], k, m, alpha, norm,
                          p)
        assert_same_idx(got, select_reference(x, qkv, H, k, m, alpha, norm, *tower))


def test_scale_and_anchor_rule_change_the_selection():
    """The inputs of the tower tests are not blind to the new arguments: on the same data the
    reference's keep_idx differs between the two anchor rules and between scales, so a kernel
    that ignored one of them would fail `test_matches_reference`."""
    x, qkv = make_inputs(2, 49, 128)
    keep = {tower: select_reference(x, qkv, 2, 4, 20, 0.5, "none", *tower)
            for tower in [(1, True, None), (1, False, None), (1, False, 1.0), (3, False, 1.0)]}
    assert not torch.equal(keep[1, True, None], keep[1, False, None])
    assert not torch.equal(keep[1, False, None], keep[1, False, 1.0])
    assert not torch.equal(keep[1, False, 1.0], keep[3, False, 1.0])


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("B,T,C,H,k," + TOWER, [
    (2, 50, 128, 2, 4, 1, True, None),     # OpenCLIP ViT-B/32 layout
    (1, 65, 160, 2, 3, 1, True, None),     # d=80
    (2, 51, 64, 2, 4, 2, True, 0.3),       # class + distillation token, own scale: the CLS row
    (2, 50, 128, 2, 4, 0, False, 0.3),     # no class token, own scale: the column pass
    (1, 37, 160, 2, 3, 2, False, None),    # no class token, p=2, d=80
])
def test_scores_match_reference(B, T, C, H, k, p, class_token, scale, dtype):
    """Anchor scores, I and D against SPEC's formulas on the same (possibly fp16/bf16) inputs.

    The kernels' low-precision products are exact in float32, so only the summation order and
    exp differ from the float32 reference: the same tolerance holds for every dtype.
    """
    x, qkv = make_inputs(B, T, C, dtype)
    s = selection_scores(x, qkv, H, k, p, class_token, scale)
    anchor_score, imp, div = reference_scores(x, qkv, H, s["anchor_idx"], class_token, scale)
    tol = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["anchor_score"], anchor_score, **tol)
    torch.testing.assert_close(s["importance"][:, p:], imp[:, p:], **tol)
    torch.testing.assert_close(s["diversity"][:, p:], div[:, p:], **tol)
    # The anchors are the top-k patches of the kernel's own anchor scores, in ascending order.
    want = torch.sort(s["anchor_score"][:, p:], dim=-1, descending=True,
                      stable=True).indices[:, :k] + p
    assert torch.equal(s["anchor_idx"].long(), want.sort(dim=-1).values)
    assert torch.equal(s["anchor_mask"].nonzero()[:, 1].view(B, k), want.sort(dim=-1).values)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,T,C,H," + TOWER + ",k,m,alpha,norm",
                         SHAPES if DEVICE == "cuda" else [SHAPES[1], SHAPES[6]])
def test_low_precision_selection(B, T, C, H, p, class_token, scale, k, m, alpha, norm, dtype):
    """fp16/bf16 inputs: the reference upcasts the same inputs, so a near-tie may flip only
    through float32 rounding; at most 5% of the kept indices (or one) may differ."""
    x, qkv = make_inputs(B, T, C, dtype)
    tower = (p, class_token, scale)
    keep_idx, x_kept, qkv_kept = select_and_gather(x, qkv, H, k, m, alpha, norm, *tower)
    want = select_reference(x, qkv, H, k, m, alpha, norm, *tower)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(keep_idx.tolist(), want.tolist()))
    assert want.numel() - overlap <= max(1, 0.05 * want.numel()), (keep_idx, want)
    x_want, qkv_want = gather_kept(x, qkv, keep_idx, p)
    assert torch.equal(x_kept, x_want) and torch.equal(qkv_kept, qkv_want)


@pytest.mark.parametrize("norm", ["none", "minmax"])
@pytest.mark.parametrize("p,class_token", [(1, True), (0, False), (2, False)])
def test_ties_pick_the_lower_index(norm, p, class_token):
    """Exact ties everywhere: tokens drawn from three distinct rows (so equal tokens get equal
    scores bit for bit), and one image where every token is the same."""
    B, T, C, H, k, m = 3, 50, 64, 2, 5, 11
    g = torch.Generator().manual_seed(1)
    x_rows, qkv_rows = torch.randn(B, 3, C, generator=g), torch.randn(B, 3, 3 * C, generator=g)
    which = torch.randint(0, 3, (B, T), generator=g)
    which[2] = 0
    x = x_rows.gather(1, which[..., None].expand(-1, -1, C)).to(DEVICE)
    qkv = qkv_rows.gather(1, which[..., None].expand(-1, -1, 3 * C)).to(DEVICE)
    keep_idx = check_selection(x, qkv, H, k, m, 0.5, norm, p, class_token)
    assert keep_idx[2].tolist() == list(range(p, p + k + m))


def test_worked_example():
    """SPEC.md's hand-checked example: one head, d=1, Q = K = X."""
    x = torch.tensor([0.0, 1.0, 2.0, 0.0, -1.0], device=DEVICE).view(1, 5, 1)
    qkv = x.repeat(1, 1, 3)
    assert select_and_gather(x, qkv, 1, 1, 1, 0.5, "none")[0].tolist() == [[1, 4]]
    assert select_and_gather(x, qkv, 1, 1, 1, 0.5, "minmax")[0].tolist() == [[1, 3]]


def test_received_attention_by_hand():
    """The no-class-token anchor rule on a case small enough to check by hand: one head, d=1,
    Q = K = X = [0, 0, 1], scale 1. Rows 0 and 1 have all logits 0, so each spreads 1/3 over
    the three keys; row 2 has logits (0, 0, 1): P[2] = (1, 1, e) / (2 + e).
    a = column means: a_0 = a_1 = (2/3 + 1/(2+e)) / 3, a_2 = (2/3 + e/(2+e)) / 3."""
    e = torch.e
    want = torch.tensor([(2 / 3 + 1 / (2 + e)) / 3] * 2 + [(2 / 3 + e / (2 + e)) / 3])
    x = torch.tensor([0.0, 0.0, 1.0], device=DEVICE).view(1, 3, 1)
    s = selection_scores(x, x.repeat(1, 1, 3), 1, 1, 0, False, 1.0)
    torch.testing.assert_close(s["anchor_score"][0].cpu(), want)
    assert s["anchor_idx"].tolist() == [[2]]  # the token every row attends to most
    # With p=1 token 0 stays a query (its row still counts) but is never an anchor.
    s = selection_scores(x, x.repeat(1, 1, 3), 1, 2, 1, False, 1.0)
    assert s["anchor_idx"].tolist() == [[1, 2]]


def test_strided_views():
    """The block's (T, B, C) layout transposed, and qkv as a slice of a wider buffer: the
    kernels read them through their strides."""
    B, T, C, H = 2, 50, 64, 2
    x_tbc, wide = make_inputs(T, B, C)[0], make_inputs(B, T, 4 * C, seed=1)[0]
    x, qkv = x_tbc.transpose(0, 1), wide[..., C:]
    assert not x.is_contiguous() and not qkv.is_contiguous()
    check_selection(x, qkv, H, 3, 9, 0.5, "minmax")
    check_selection(x, qkv, H, 3, 9, 0.5, "none", 0, False)  # the column pass through strides


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("bad,norm,p,class_token", [
    (float("nan"), "none", 1, True), (float("nan"), "minmax", 1, True),
    (float("inf"), "none", 1, True), (float("inf"), "minmax", 1, True),
    # Without a class token one bad key spreads NaN through every row's normaliser, so every
    # anchor score is NaN: the column pass and the prefix bookkeeping must still stay in range.
    (float("nan"), "none", 0, False), (float("inf"), "minmax", 2, False),
])
def test_non_finite_input_keeps_indices_in_range(bad, norm, p, class_token):
    B, T, C, H, k, m = 3, 50, 64, 2, 4, 20
    x, qkv = make_inputs(B, T, C)
    x[0, 7], qkv[0, 7] = bad, bad          # one bad token
    qkv[1, 0, :C] = bad                    # a bad query at token 0 (the CLS query if any)
    x[2], qkv[2] = bad, bad                # a whole bad image
    keep_idx, x_kept, qkv_kept = select_and_gather(x, qkv, H, k, m, 0.5, norm, p, class_token)
    for row in keep_idx.tolist():
        assert all(p <= i <= T - 1 for i in row), row
        assert row == sorted(set(row)) and len(row) == k + m, row  # ascending, no duplicates
    assert x_kept.shape == (B, p + k + m, C)
    x_want, _ = gather_kept(x, qkv, keep_idx, p)
    assert torch.equal(x_kept.nan_to_num(), x_want.nan_to_num())


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize(TOWER, [(1, True, None), (2, False, 0.5)])
def test_dispatch_passes_the_tower_through(grad, p, class_token, scale):
    """tokenprune.selection's dispatch with backend="triton": the prefix count, anchor rule and
    scale reach the kernels. With inputs that require grad the kernels select and the kept
    rows are differentiable gathers (the kernels' row copy has no backward); without, the
    kernels' own copy."""
    from tokenprune import PruneConfig
    from tokenprune.selection import select_and_gather as dispatch
    x, qkv = make_inputs(1, 17, 64)
    x.requires_grad_(grad)
    qkv.requires_grad_(grad)
    config = PruneConfig(k_anchors=2, top_m=3, alpha=0.5, backend="triton")
    keep_idx, x_kept, qkv_kept = dispatch(x, qkv, 1, config, p, class_token, scale)
    assert_same_idx(keep_idx, select_reference(x.detach(), qkv.detach(), 1, 2, 3, 0.5, "none",
                                               p, class_token, scale))
    rows = list(range(p)) + keep_idx[0].tolist()
    assert torch.equal(x_kept, x[:, rows]) and torch.equal(qkv_kept, qkv[:, rows])
    if grad:
        (x_kept.sum() + qkv_kept.sum()).backward()
        assert x.grad[0, rows].eq(1).all() and x.grad.sum() == len(rows) * 64
        assert qkv.grad[0, rows].eq(1).all() and qkv.grad.sum() == len(rows) * 3 * 64


def test_rejects_bad_arguments():
    x, qkv = make_inputs(1, 17, 64)
    with pytest.raises(ValueError, match="k_anchors"):
        select_and_gather(x, qkv, 1, 10, 7, 0.5, "none")  # k + m = 17 > N = 16
    with pytest.raises(ValueError, match="k_anchors"):
        select_and_gather(x, qkv, 1, 10, 4, 0.5, "none", 4)  # k + m = 14 > N = 13
    with pytest.raises(ValueError, match="score_norm"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "zscore")
    with pytest.raises(ValueError, match=r"num_prefix .*\[1, 16\].*class_token=True"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", 0, True)  # no token to be the class
    with pytest.raises(ValueError, match=r"num_prefix .*\[0, 16\]"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", 17, False)
    for scale in (0.0, -1.0, float("nan"), "big"):
        with pytest.raises(ValueError, match="scale"):
            select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", 1, True, scale)


def test_block_matches_reference_backend():
    """The pruned OpenCLIP block gives the same output with backend='triton' as 'reference'."""
    open_clip = pytest.importorskip("open_clip")
    from tokenprune import PruneConfig, PrunedResidualAttentionBlock

    torch.manual_seed(0)
    vit = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=4, width=128, layers=2, heads=2, mlp_ratio=2,
        output_dim=64).to(DEVICE).eval()
    block = vit.transformer.resblocks[-1]
    x = torch.randn(2, 65, 128, device=DEVICE)
    if not block.attn.batch_first:
        x = x.transpose(0, 1)
    outs = {}
    for backend in ("reference", "triton"):
        pruned = PrunedResidualAttentionBlock(block, PruneConfig(k_anchors=4, top_m=12,
                                                                 backend=backend))
        with torch.no_grad():
            outs[backend] = pruned(x)
        outs[backend + "_idx"] = pruned.last_keep_idx
    assert torch.equal(outs["triton_idx"], outs["reference_idx"])
    # Same kept rows, so the same computation after the selection: bit-identical on the CPU;
    # on the GPU leave room for cuBLAS/SDPA picking other algorithms between the two calls.
    exact = dict(rtol=0, atol=0) if DEVICE == "cpu" else {}
    torch.testing.assert_close(outs["triton"], outs["reference"], **exact)


# ----- the other selections: cls (the anchor pass with k + m anchors) and mmr (mmr.py) ------

def check_rule(x, qkv, H, k, m, p=1, class_token=True, scale=None, selection="mmr", lam=0.5):
    """keep_idx of the kernels equal to the reference's for `selection`; the kept rows copied."""
    tower = (p, class_token, scale)
    rule = dict(selection=selection, mmr_lambda=lam)
    keep_idx, x_kept, qkv_kept = select_and_gather(x, qkv, H, k, m, 0.5, "none", *tower, **rule)
    want = select_reference(x, qkv, H, k, m, 0.5, "none", *tower, **rule)
    assert keep_idx.dtype == torch.int64 and keep_idx.shape == (x.shape[0], k + m)
    assert_same_idx(keep_idx, want)
    x_want, qkv_want = gather_kept(x, qkv, want, p)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x_kept, x_want, **exact)
    torch.testing.assert_close(qkv_kept, qkv_want, **exact)
    return keep_idx


# (B, T, C, H, p, class_token, scale, k, m, lambda): the mmr kernel holds one image's T tokens
# in a BLOCK_T = next_power_of_2(T) row and reads X in BLOCK_C = min(64, C, 8192 / BLOCK_T)
# channel chunks; the anchors come from cls_anchors.py (class token) or received_anchors.py.
RULE_SHAPES = [
    # T=17 (BLOCK_T 32), one 64-channel chunk, k=1, m=0: the anchors alone, no greedy step.
    (2, 17, 64, 1, 1, True, None, 1, 0, 0.5),
    # T=50 (ViT-B/32): C=80 is a full and a partial 64-channel chunk; several anchors.
    (2, 50, 80, 2, 1, True, None, 4, 12, 0.5),
    # k + m = N: the greedy steps take every candidate, the last one with a single candidate.
    (1, 33, 64, 2, 1, True, None, 3, 29, 0.3),
    # T=145: BLOCK_T 256, BLOCK_C 32 (two chunks of C=64); k=33 anchors seed the running max.
    (1, 145, 64, 2, 1, True, None, 33, 16, 0.7),
    # T=1025: BLOCK_T 2048, BLOCK_C 4: sixteen chunks per cosine pass.
    (1, 1025, 64, 1, 1, True, None, 8, 12, 0.5),
    # No class token, p=0 (SigLIP): anchors and relevance from the attention received.
    (2, 25, 64, 1, 0, False, None, 3, 7, 0.5),
    # No class token, p=2 registers, the block's own scale, T odd.
    (2, 49, 128, 2, 2, False, 1.0, 4, 20, 0.6),
    # Class token + 4 registers (p=5): prefix tokens never candidates nor in the running max.
    (2, 41, 160, 2, 5, True, None, 6, 10, 0.5),
    # Class + distillation token (p=2), non-default scale; lambda 0: redundancy alone.
    (2, 51, 64, 2, 2, True, 0.3, 4, 15, 0.0),
    # lambda 1: relevance alone (the cls order up to rounding).
    (2, 50, 64, 2, 1, True, None, 4, 12, 1.0),
]


@pytest.mark.parametrize("B,T,C,H," + TOWER + ",k,m,lam", RULE_SHAPES)
def test_mmr_and_cls_match_reference(B, T, C, H, p, class_token, scale, k, m, lam):
    x, qkv = make_inputs(B, T, C)
    tower = (p, class_token, scale)
    check_rule(x, qkv, H, k, m, *tower, "mmr", lam)
    cls = check_rule(x, qkv, H, k, m, *tower, "cls")
    # FasterVLM's rule is the score selection with every kept patch an anchor, on the kernels
    # (not at T=1025, where the score path's importance pass is slow under the interpreter).
    if T < 1000:
        assert_same_idx(cls, select_and_gather(x, qkv, H, k + m, 0, 0.5, "none", *tower)[0])


def test_mmr_lambda_changes_the_selection():
    """The shapes above are not blind to lambda: on the same data the reference keeps other
    patches at 0, 0.5 and 1, so a kernel that ignored lambda would fail them."""
    x, qkv = make_inputs(2, 50, 80)
    keep = [select_reference(x, qkv, 2, 4, 12, 0.5, "none", selection="mmr", mmr_lambda=lam)
            for lam in (0.0, 0.5, 1.0)]
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[1], keep[2])


def test_mmr_worked_example():
    """SPEC.md's mmr example: one head, d = 2, scale 1, Q = K = X."""
    import math
    x = torch.tensor([[math.log(2), 0], [2, 0], [2, 2], [1, 0], [0, 1], [1, -1]],
                     device=DEVICE).view(1, 6, 2)
    qkv = x.repeat(1, 1, 3)
    for selection, lam, expected in (("mmr", 0.5, [1, 2, 5]), ("mmr", 1.0, [1, 2, 3]),
                                     ("cls", 0.5, [1, 2, 3])):
        keep = select_and_gather(x, qkv, 1, 1, 2, 0.5, "none", 1, True, 1.0, selection, lam)[0]
        assert keep.tolist() == [expected], (selection, lam)


@pytest.mark.parametrize("p,class_token", [(1, True), (0, False), (2, False), (5, True)])
def test_mmr_ties_pick_the_lower_index(p, class_token):
    """Tokens drawn from three distinct rows (equal tokens get bit-equal scores and cosines in
    each backend) and one image where every token is the same."""
    B, T, C, H, k, m = 3, 50, 64, 2, 5, 11
    g = torch.Generator().manual_seed(1)
    x_rows, qkv_rows = torch.randn(B, 3, C, generator=g), torch.randn(B, 3, 3 * C, generator=g)
    which = torch.randint(0, 3, (B, T), generator=g)
    which[2] = 0
    x = x_rows.gather(1, which[..., None].expand(-1, -1, C)).to(DEVICE)
    qkv = qkv_rows.gather(1, which[..., None].expand(-1, -1, 3 * C)).to(DEVICE)
    for lam in (0.5, 1.0):
        keep_idx = check_rule(x, qkv, H, k, m, p, class_token, None, "mmr", lam)
        assert keep_idx[2].tolist() == list(range(p, p + k + m))
    check_rule(x, qkv, H, k, m, p, class_token, None, "cls")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("p,class_token", [(1, True), (0, False), (2, False)])
def test_mmr_nan_rows_follow_the_reference(p, class_token):
    """SPEC's NaN rules, the same picks as the reference: a NaN block input (NaN cosines), a
    NaN attention (no finite anchor score: relevance 0), an infinite token, a whole bad image."""
    B, T, C, H, k, m = 4, 40, 64, 2, 4, 12
    x, qkv = make_inputs(B, T, C)
    x[0, 9] = float("nan")            # one token's cosines are NaN: its gain ranks first
    qkv[1, 3] = float("nan")          # a NaN key (and query): NaN attention rows
    x[2, 20] = float("inf")           # inf / inf: NaN cosines too
    x[3], qkv[3] = float("nan"), float("nan")
    keep_idx = check_rule(x, qkv, H, k, m, p, class_token, None, "mmr", 0.5)
    for row in keep_idx.tolist():
        assert all(p <= i <= T - 1 for i in row) and row == sorted(set(row)), row
    check_rule(x, qkv, H, k, m, p, class_token, None, "cls")


def test_mmr_strided_views():
    B, T, C, H = 2, 50, 64, 2
    x_tbc, wide = make_inputs(T, B, C)[0], make_inputs(B, T, 4 * C, seed=1)[0]
    x, qkv = x_tbc.transpose(0, 1), wide[..., C:]
    check_rule(x, qkv, H, 3, 9, 1, True, None, "mmr", 0.5)
    check_rule(x, qkv, H, 3, 9, 0, False, None, "mmr", 0.5)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_mmr_low_precision(dtype):
    """fp16/bf16 inputs: a near-tie may flip only through float32 rounding."""
    x, qkv = make_inputs(2, 50, 128, dtype)
    keep_idx = select_and_gather(x, qkv, 2, 4, 12, 0.5, "none", selection="mmr",
                                 mmr_lambda=0.5)[0]
    want = select_reference(x, qkv, 2, 4, 12, 0.5, "none", selection="mmr", mmr_lambda=0.5)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(keep_idx.tolist(), want.tolist()))
    assert want.numel() - overlap <= max(1, 0.05 * want.numel()), (keep_idx, want)


@pytest.mark.parametrize("selection", ["cls", "mmr"])
@pytest.mark.parametrize(TOWER, [(1, True, None), (2, False, 0.5)])
def test_dispatch_passes_the_selection_through(selection, p, class_token, scale):
    from tokenprune import PruneConfig
    from tokenprune.selection import select_and_gather as dispatch
    x, qkv = make_inputs(2, 33, 64)
    config = PruneConfig(k_anchors=2, top_m=6, selection=selection, mmr_lambda=0.7,
                         backend="triton")
    keep_idx = dispatch(x, qkv, 2, config, p, class_token, scale)[0]
    assert_same_idx(keep_idx, select_reference(x, qkv, 2, 2, 6, 0.5, "none", p, class_token,
                                               scale, selection=selection, mmr_lambda=0.7))


def test_rejects_bad_selection_arguments():
    x, qkv = make_inputs(1, 17, 64)
    with pytest.raises(ValueError, match="selection must be 'score', 'cls' or 'mmr', got 'random'"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", selection="random")
    with pytest.raises(ValueError, match=r"mmr_lambda must be a number in \[0, 1\].*got None"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", selection="mmr")
    with pytest.raises(ValueError, match=r"mmr_lambda .*got 1.5"):
        select_and_gather(x, qkv, 1, 1, 1, 0.5, "none", selection="mmr", mmr_lambda=1.5)
