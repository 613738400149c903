"""The seed's way of selecting tokens, kept as the baseline that the benchmarks compare against.

The seed registers hooks on an OpenCLIP block: one captures the block's input features (the
residual stream X, which is what `ln_1` receives), one forces `need_weights=True` on the
block's `nn.MultiheadAttention` so that it returns the head-averaged attention P
(`average_attn_weights=True`), and one captures P. The selection then runs in PyTorch on P and
X. This file is not part of the package: it exists so that the benchmarks time the approach
that tokenprune replaces.

To make the comparison fair it computes the same selection as SPEC.md (and as
`tokenprune.select_reference`; tests/test_bench_report.py checks that), ties included, reusing
the reference's tie-breaking top-k. What it cannot avoid is what the seed pays for: P comes
out of nn.MultiheadAttention's unfused path, which materialises every head's T x T attention
and also computes the attention output that the seed's block goes on to use.
"""
import torch
import torch.nn.functional as F

from tokenprune.reference import EPS_COS, minmax, top_indices


class HookSelector:
    """Hooks on one OpenCLIP `ResidualAttentionBlock` that capture X and P on every forward.

    After any forward through the block (or a whole model containing it), `self.x` is the
    block input (B, T, C) and `self.attn` the head-averaged attention (B, T, T).
    Assumes a batch_first block (OpenCLIP's default).
    """

    def __init__(self, block):
        self.block = block
        self.x = self.attn = None
        self._handles = [
            block.ln_1.register_forward_pre_hook(self._grab_input),
            block.attn.register_forward_pre_hook(self._want_weights, with_kwargs=True),
            block.attn.register_forward_hook(self._grab_weights),
        ]

    def _grab_input(self, module, args):
        self.x = args[0]

    @staticmethod
    def _want_weights(module, args, kwargs):
        # OpenCLIP calls attn(..., need_weights=False); the seed turns the weights back on.
        return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

    def _grab_weights(self, module, args, output):
        self.attn = output[1]

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def __call__(self, x, k_anchors, top_m, alpha, score_norm="none"):
        """(keep_idx, x_kept) for block input x, the way the seed gets there: run the block's
        attention with the hooks on, then select on what they captured."""
        block = self.block
        block.attention(q_x=block.ln_1(x))
        keep_idx = select_from_attention(self.attn, self.x, k_anchors, top_m, alpha, score_norm)
        rows = F.pad(keep_idx, (1, 0))  # CLS first
        return keep_idx, self.x.gather(1, rows[..., None].expand(-1, -1, self.x.shape[-1]))


def select_from_attention(attn, x, k_anchors, top_m, alpha, score_norm="none"):
    """SPEC.md steps 1-5 on the head-averaged attention attn (B, T, T) and block input x (B, T, C).

    Returns keep_idx (B, k_anchors + top_m), kept patch indices in ascending order.
    """
    P = attn.float()
    B, T, _ = P.shape
    N = T - 1
    anchors = top_indices(P[:, 0, 1:], k_anchors) + 1                                # (B, k)
    is_anchor = torch.zeros(B, T, dtype=torch.bool, device=P.device)
    is_anchor.scatter_(1, anchors, True)
    is_anchor = is_anchor[:, 1:]                                                      # (B, N)

    importance = P[:, 1:, :].gather(2, anchors[:, None, :].expand(B, N, k_anchors)).mean(-1)
    unit = F.normalize(x.float(), dim=-1, eps=EPS_COS)
    anchor_unit = unit.gather(1, anchors[..., None].expand(-1, -1, unit.shape[-1]))
    diversity = 1 - (unit[:, 1:] @ anchor_unit.transpose(1, 2)).amax(-1)              # (B, N)

    if score_norm == "minmax":
        importance = minmax(importance, ~is_anchor)
        diversity = minmax(diversity, ~is_anchor)
    score = (alpha * importance + (1 - alpha) * diversity).masked_fill(is_anchor, float("-inf"))
    chosen = top_indices(score, top_m) + 1
    return torch.cat([anchors, chosen], dim=1).sort(dim=-1).values
