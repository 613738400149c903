"""The pruned OpenCLIP block: select tokens, then run the original block on the kept ones."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from .config import PruneConfig
from .selection import select_and_gather


class PrunedResidualAttentionBlock(nn.Module):
    """Replaces one `ResidualAttentionBlock`, sharing its submodules (same state_dict keys).

    Output: the original block applied to CLS + the kept patches, (B, 1 + k + m, C)
    (or (1 + k + m, B, C) when the block is not batch_first). `last_keep_idx` holds the kept
    patch indices (B, k + m) of the last forward, or None when that forward pruned nothing.
    """

    def __init__(self, block, config=None):
        super().__init__()
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise TypeError(f"PrunedResidualAttentionBlock wraps an OpenCLIP self-attention "
                            f"ResidualAttentionBlock, got {type(block).__name__}")
        if not block.attn._qkv_same_embed_dim:
            raise TypeError("PrunedResidualAttentionBlock needs the packed in_proj_weight of "
                            "nn.MultiheadAttention (kdim == vdim == embed_dim)")
        for name, child in block.named_children():
            self.add_module(name, child)
        # Kept outside the module tree (no duplicate state_dict keys) so that it can be put back.
        object.__setattr__(self, "_original_block", block)
        self.config = config if config is not None else PruneConfig()
        self.last_keep_idx = None
        # The random control's draws: seeded once here, so a run over the same batches repeats.
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._warned_noop = False
        self.train(block.training)  # a new Module starts in training mode; keep the block's

    def restore(self):
        """The original block, in this block's train/eval mode."""
        return self._original_block.train(self.training)

    def extra_repr(self):
        return repr(self.config)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("token pruning needs plain self-attention: k_x, v_x and attn_mask "
                             "must be None")
        batch_first = self.attn.batch_first
        num_patches = q_x.shape[1 if batch_first else 0] - 1
        cfg = self.config
        if cfg.kept_patches >= num_patches:
            if not self._warned_noop:
                warnings.warn(f"k_anchors + top_m = {cfg.kept_patches} >= {num_patches} patch "
                              f"tokens: nothing to prune, the block runs on all tokens",
                              stacklevel=2)
                self._warned_noop = True
            self.last_keep_idx = None
            return self._original_block(q_x)

        x = q_x if batch_first else q_x.transpose(0, 1)
        attn = self.attn
        qkv = F.linear(self.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        keep_idx, x_kept, qkv_kept = select_and_gather(x, qkv, attn.num_heads, cfg,
                                                       generator=self.generator)
        del qkv  # the full (B, T, 3C) projection must not stay alive through the MLP
        self.last_keep_idx = keep_idx

        B, n, C = x_kept.shape
        q, k, v = qkv_kept.view(B, n, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        out = attn.out_proj(out.transpose(1, 2).reshape(B, n, C))
        z = x_kept + self.ls_1(out)
        z = z + self.ls_2(self.mlp(self.ln_2(z)))
        return z if batch_first else z.transpose(0, 1)
