"""OpenCLIP's own VisionTransformer of ResidualAttentionBlocks (ViT-B-32, ViT-B-16, ViT-L-14...)."""
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from . import BlockAdapter, Family, Tower, UnsupportedModelError


class ResidualAttentionBlockAdapter(BlockAdapter):
    """nn.MultiheadAttention's packed in_proj gives the qkv in one GEMM; CLS is token 0."""

    def __init__(self, block):
        super().__init__(block)
        self.num_heads = block.attn.num_heads
        self.batch_first = block.attn.batch_first

    def tokens(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("token pruning needs plain self-attention: k_x, v_x and attn_mask "
                             "must be None")
        return (q_x if self.batch_first else q_x.transpose(0, 1)), None

    def qkv(self, x, call):
        attn = self.block.attn
        return F.linear(self.block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)

    def forward_kept(self, x_kept, qkv_kept, call, training):
        block, attn = self.block, self.block.attn
        B, n, C = x_kept.shape
        q, k, v = qkv_kept.view(B, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if training else 0.0)
        out = attn.out_proj(out.transpose(1, 2).reshape(B, n, C))
        z = x_kept + block.ls_1(out)
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
        return z if self.batch_first else z.transpose(0, 1)


class OpenCLIPFamily(Family):
    name = "OpenCLIP VisionTransformer"
    examples = "ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ..."
    block_description = ("OpenCLIP ResidualAttentionBlock (self-attention, packed in_proj; "
                         "not CustomResidualAttentionBlock)")

    def tower(self, trunk):
        if not isinstance(trunk, VisionTransformer):
            return None
        return Tower(module=trunk, blocks=trunk.transformer.resblocks, num_prefix=1,
                     class_token=True, grid_size=tuple(trunk.grid_size), family=self)

    def block_adapter(self, block):
        # Exactly this class: subclasses (e.g. with cross-attention ln_1_kv) attend differently.
        if type(block) is not ResidualAttentionBlock:
            return None
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError("tokenprune cannot prune a cross-attention "
                                        "ResidualAttentionBlock; it needs self-attention")
        if not block.attn._qkv_same_embed_dim:
            raise UnsupportedModelError("tokenprune needs the packed in_proj_weight of nn.MultiheadAttention "
                            "(kdim == vdim == embed_dim)")
        return ResidualAttentionBlockAdapter(block)


FAMILY = OpenCLIPFamily()
