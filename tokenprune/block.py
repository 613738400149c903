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
    `last_keep_idx` holds the kept patch indices (B, k + m) of the last forward, or None when
    that forward pruned nothing.
    """

    def __init__(self, block, config=None, num_prefix=1, class_token=True):
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
        self.num_prefix = num_prefix
        self.class_token = class_token
        self.last_keep_idx = None
        # The random control's draws: seeded once here, so a run over the same batches repeats.
        self.generator = torch.Generator().manual_seed(self.config.seed)
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
        return f"{type(self._original_block).__name__}, {self.config!r}"

    def forward(self, *args, **kwargs):
        x, call = self.adapter.tokens(*args, **kwargs)  # x (B, T, C), batch first
        num_patches = x.shape[1] - self.num_prefix
        cfg = self.config
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
        self.last_keep_idx = keep_idx
        return self.adapter.forward_kept(x_kept, qkv_kept, call, self.training)


# The name this block has had since it wrapped OpenCLIP's ResidualAttentionBlock only.
PrunedResidualAttentionBlock = PrunedBlock
