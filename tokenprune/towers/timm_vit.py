"""timm's VisionTransformer of `Block`s: OpenCLIP's SigLIP / SigLIP2 trunks (no class token,
attention-pool head) and ViTamin trunks (a convolutional stem, then plain blocks, no class
token, mean pooling), timm ViTs used directly, DeiT (class + distillation token),
register-token ViTs."""
from . import BlockAdapter, Family, UnsupportedModelError, timm_tower
from ._timm_attention import attend, check_attention, packed_qkv


class BlockAdapterTimm(BlockAdapter):
    def __init__(self, block):
        super().__init__(block)
        check_attention(block.attn)
        self.num_heads = block.attn.num_heads
        self.scale = block.attn.scale

    def tokens(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("token pruning needs plain self-attention: attn_mask must be None "
                             "and is_causal False")
        return x, None

    def qkv(self, x, call):
        return packed_qkv(self.block.attn, self.block.norm1(x))

    def forward_kept(self, x_kept, qkv_kept, call, training):
        block = self.block
        y_kept = block.norm1(x_kept) if getattr(block.attn, "gate", None) is not None else None
        z = x_kept + block.drop_path1(block.ls1(attend(block.attn, qkv_kept, y_kept, training)))
        return z + block.drop_path2(block.ls2(block.mlp(block.norm2(z))))


class TimmViTFamily(Family):
    name = "timm VisionTransformer"
    examples = ("ViT-B-16-SigLIP2 and the other SigLIP / SigLIP2 models, ViTamin, timm ViTs, "
                "DeiT, register-token ViTs")
    block_description = "timm Block (with timm's Attention)"
    timm_modules = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.vitamin")

    def tower(self, trunk):
        from timm.models.vision_transformer import VisionTransformer
        if not isinstance(trunk, VisionTransformer):
            return None
        return timm_tower(trunk, self)

    def block_adapter(self, block):
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
        if type(block) is not Block:
            return None
        if type(block.attn) is not Attention:
            raise UnsupportedModelError(f"tokenprune cannot prune a timm Block with "
                                        f"{type(block.attn).__name__}; it needs timm's Attention")
        return BlockAdapterTimm(block)


FAMILY = TimmViTFamily()
