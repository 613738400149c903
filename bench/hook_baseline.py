"""The seed's way of selecting tokens, kept as the baseline that the benchmarks compare against.

The seed registers hooks on an OpenCLIP block: one captures the block's input features (the
residual stream X, which is what `ln_1` receives), one forces `need_weights=True` on the
block's `nn.MultiheadAttention` so that it returns the head-averaged attention P
(`average_attn_weights=True`), and one captures P. The selection then runs in PyTorch on P and
X. This file is not part of the package: it exists so that the benchmarks time the approach
that tokenprune replaces.

To make the comparison fair, the selection on the captured P and X is the reference's own
(SPEC steps 1-5, `tokenprune.reference.select_from_attention`); tests/test_bench_report.py
checks that the hooks capture what the reference computes. What it cannot avoid is what the seed pays for: P comes
out of nn.MultiheadAttention's unfused path, which materialises every head's T x T attention
and also computes the attention output that the seed's block goes on to use.
"""
from tokenprune.reference import select_from_attention
from tokenprune.selection import kept_rows


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

    def __call__(self, x, k_anchors, top_m, alpha, score_norm="none", num_prefix=1,
                 class_token=True):
        """(keep_idx, x_kept) for block input x, the way the seed gets there: run the block's
        attention with the hooks on, then select on what they captured (num_prefix and
        class_token as in tokenprune.reference.select_reference)."""
        block = self.block
        block.attention(q_x=block.ln_1(x))
        keep_idx = select_from_attention(self.attn, self.x, k_anchors, top_m, alpha, score_norm,
                                         num_prefix, class_token)
        rows = kept_rows(keep_idx, num_prefix)  # the prefix tokens first
        return keep_idx, self.x.gather(1, rows[..., None].expand(-1, -1, self.x.shape[-1]))
