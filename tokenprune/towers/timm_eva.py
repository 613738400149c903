"""timm's Eva of `EvaBlock`s: OpenCLIP's EVA01 / EVA02 trunks (separate q/k/v projections,
rotary positions in EVA02; EVA02-E's post-norm `EvaBlockPostNorm`) and PE-Core (packed qkv,
rotary positions, attention-pool head).

Rotary positions: Eva computes one rotary table for the patch grid and hands the same `rope`
to every block. After the pruned block, each later block gets, through a forward pre-hook,
the rows of its `rope` at the kept patches' own positions, per image, shaped (B, 1, n, d) as
timm's own patch dropout does (timm's rotary code broadcasts it over heads). In a schedule,
a later stage's pruned block is one of those blocks: it selects with the earlier stage's rows.
"""
from . import BlockAdapter, Family, UnsupportedModelError, timm_tower
from ._timm_attention import attend, check_attention, packed_qkv


class EvaBlockAdapter(BlockAdapter):
    def __init__(self, block):
        super().__init__(block)
        check_attention(block.attn)
        self.num_heads = block.attn.num_heads
        self.scale = block.attn.scale

    def tokens(self, x, rope=None, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("token pruning needs plain self-attention: attn_mask must be None "
                             "and is_causal False")
        return x, rope

    def qkv(self, x, rope):
        return packed_qkv(self.block.attn, self.block.norm1(x), rope)

    def forward_kept(self, x_kept, qkv_kept, rope, training):
        # The kept qkv rows were rotated at their own positions before the gather.
        block = self.block
        y_kept = block.norm1(x_kept) if getattr(block.attn, "gate", None) is not None else None
        out = attend(block.attn, qkv_kept, y_kept, training)
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        z = x_kept + block.drop_path1(out)
        out = block.mlp(block.norm2(z))
        if block.gamma_2 is not None:
            out = block.gamma_2 * out
        return z + block.drop_path2(out)


class EvaBlockPostNormAdapter(EvaBlockAdapter):
    """EVA02-E's post-norm block: attention reads x itself, norms follow attention and MLP."""

    def qkv(self, x, rope):
        return packed_qkv(self.block.attn, x, rope)

    def forward_kept(self, x_kept, qkv_kept, rope, training):
        block = self.block
        y_kept = x_kept if getattr(block.attn, "gate", None) is not None else None
        z = x_kept + block.drop_path1(block.norm1(attend(block.attn, qkv_kept, y_kept, training)))
        return z + block.drop_path2(block.norm2(block.mlp(z)))


def kept_rope(rope, keep_idx, num_prefix):
    """The rows of `rope` at the kept patches: (N, d) or, after timm's patch dropout, (B, 1, N, d)
    -> (B, 1, n, d). keep_idx (B, n) indexes the T tokens, so the patch row is keep_idx - p."""
    rows = keep_idx - num_prefix
    if rope.dim() == 2:
        return rope[rows].unsqueeze(1)
    if rope.dim() == 4 and rope.shape[0] == keep_idx.shape[0] and rope.shape[1] == 1:
        return rope.gather(2, rows[:, None, :, None].expand(-1, 1, -1, rope.shape[-1]))
    raise UnsupportedModelError(f"tokenprune cannot carry a rotary table of shape "
                                f"{tuple(rope.shape)} to the kept tokens; it handles (N, d) and "
                                f"(B, 1, N, d)")


class KeptPositions:
    """Forward pre-hook of a block after the pruned one: its `rope` argument (the tower's full
    table) becomes the rows at the kept patches (original numbering) of the pruned block's last
    forward (unchanged when that forward pruned nothing). In a schedule, on the blocks up to and
    including the next stage's. A plain object, so that copy.deepcopy of the model copies the
    link too."""

    def __init__(self, pruned, num_prefix):
        self.pruned = pruned
        self.num_prefix = num_prefix

    def __call__(self, module, args, kwargs):
        keep_idx = self.pruned.last_keep_idx
        if keep_idx is None:
            return None
        if "rope" in kwargs:
            if kwargs["rope"] is None:
                return None
            return args, {**kwargs, "rope": kept_rope(kwargs["rope"], keep_idx, self.num_prefix)}
        if len(args) > 1 and args[1] is not None:
            return (args[0], kept_rope(args[1], keep_idx, self.num_prefix), *args[2:]), kwargs
        return None


class EvaFamily(Family):
    name = "timm Eva"
    examples = "EVA02-B-16 and the other EVA01 / EVA02 models, PE-Core-B-16 and the PE-Core family"
    block_description = "timm EvaBlock or EvaBlockPostNorm (with EvaAttention or AttentionRope)"
    timm_modules = ("timm.models.eva",)

    def tower(self, trunk):
        from timm.models.eva import Eva
        if not isinstance(trunk, Eva):
            return None
        if getattr(trunk, "rope_mixed", False):
            raise UnsupportedModelError("tokenprune cannot prune a timm Eva with mixed (per-block, "
                                        "per-head) rotary embeddings")
        return timm_tower(trunk, self)

    def block_adapter(self, block):
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
        adapters = {EvaBlock: EvaBlockAdapter, EvaBlockPostNorm: EvaBlockPostNormAdapter}
        if type(block) not in adapters:
            return None
        if type(block.attn) not in (EvaAttention, AttentionRope):
            raise UnsupportedModelError(f"tokenprune cannot prune a {type(block).__name__} with "
                                        f"{type(block.attn).__name__}")
        return adapters[type(block)](block)

    def follow(self, pruned, later_blocks):
        hook = KeptPositions(pruned, pruned.num_prefix)
        return [block.register_forward_pre_hook(hook, with_kwargs=True) for block in later_blocks]


FAMILY = EvaFamily()
