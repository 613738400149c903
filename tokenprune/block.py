"""The pruned block: select tokens, then run the original block on the kept ones.

One class for every supported block type; what differs between OpenCLIP's and timm's blocks
(projections, norms, rotary positions, residual wiring) is in the block's adapter
(tokenprune/towers/).
"""
import warnings

import torch
import torch.nn as nn

from .config import PruneConfig
from .selection import select_and_gather
from .towers import block_adapter


class PrunedBlock(nn.Module):
    """Replaces one block, sharing its submodules and parameters (same state_dict keys).

    Blocks: OpenCLIP `ResidualAttentionBlock`, timm `Block`, timm `EvaBlock`, transformers'
    `CLIPEncoderLayer` and `SiglipEncoderLayer`. `num_prefix` and
    `class_token` describe the tower (SPEC.md, "Towers beyond OpenCLIP's ResidualAttentionBlock");
    the defaults are OpenCLIP's VisionTransformer (one class token at index 0);
    `replace_last_block` fills them in from the tower.

    Output: the original block applied to the p prefix tokens + the kept patches,
    (B, p + k + m, C) (or (p + k + m, B, C) for a block that is not batch_first).
    `last_keep_idx` holds the kept patch indices (B, k + m) of the last forward, in the
    original token numbering (the tower's T tokens), or None when that forward pruned nothing.

    In a schedule (`config.schedule`), each stage is one PrunedBlock: `stage` is its position
    and `previous` the stage before it (None for the first), whose kept patches are the ones
    this block's input holds; `stage_config` is the single cut it makes. `config` is the whole
    configuration, the same for every stage.
    """

    def __init__(self, block, config=None, num_prefix=1, class_token=True, stage=0,
                 previous=None):
        super().__init__()
        self.adapter = block_adapter(block)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):  # e.g. EvaBlock's gamma_1
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in block._non_persistent_buffers_set)
        # Kept outside the module tree (no duplicate state_dict keys) so that it can be put back.
        object.__setattr__(self, "_original_block", block)
        self.config = config if config is not None else PruneConfig()
        self.stage = stage
        self.stage_config = self.config.stage_configs()[stage]
        # Outside the module tree too: the previous stage is a block of the same tower.
        object.__setattr__(self, "previous", previous)
        self.num_prefix = num_prefix
        self.class_token = class_token
        self.last_keep_idx = None
        # The random control's draws: seeded once, when the first stage is made, and shared by
        # the later stages, so that a run over the same batches repeats.
        self.generator = (previous.generator if previous is not None
                          else torch.Generator().manual_seed(self.config.seed))
        self._warned_noop = False
        self._hooks = []  # set by replace_last_block: what carries positions to later blocks
        self.train(block.training)  # a new Module starts in training mode; keep the block's

    def restore(self):
        """The original block, in this block's train/eval mode; later blocks' hooks removed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return self._original_block.train(self.training)

    def extra_repr(self):
        return f"{type(self._original_block).__name__}, {self.stage_config!r}"

    def forward(self, *args, **kwargs):
        x, call = self.adapter.tokens(*args, **kwargs)  # x (B, T, C), batch first
        num_patches = x.shape[1] - self.num_prefix
        cfg = self.stage_config
        if cfg.kept_patches >= num_patches:
            if not self._warned_noop:
                warnings.warn(f"k_anchors + top_m = {cfg.kept_patches} >= {num_patches} patch "
                              f"tokens: nothing to prune, the block runs on all tokens",
                              stacklevel=2)
                self._warned_noop = True
            self.last_keep_idx = None
            return self._original_block(*args, **kwargs)

        qkv = self.adapter.qkv(x, call)
        keep_idx, x_kept, qkv_kept = select_and_gather(
            x, qkv, self.adapter.num_heads, cfg, num_prefix=self.num_prefix,
            class_token=self.class_token, scale=self.adapter.scale, generator=self.generator)
        del qkv  # the full (B, T, 3C) projection must not stay alive through the MLP
        # keep_idx numbers the tokens that reached this block: patch p + i is the i-th patch the
        # stage before kept. (A stage before this one pruned nothing only if every stage before
        # it did: each keeps fewer patches than the one before it, so fewer than reach it.)
        kept_before = self.previous.last_keep_idx if self.previous is not None else None
        if kept_before is not None:
            keep_idx = kept_before.gather(1, keep_idx - self.num_prefix)
        self.last_keep_idx = keep_idx
        return self.adapter.forward_kept(x_kept, qkv_kept, call, self.training)


# The name this block has had since it wrapped OpenCLIP's ResidualAttentionBlock only.
PrunedResidualAttentionBlock = PrunedBlock
