"""Hugging Face transformers' SigLIP image tower: SiglipVisionModel and SiglipModel's
`vision_model`, built from SiglipEncoderLayers; no class token (SPEC's anchor rule for that
case), pooled by the attention-pool head over the kept tokens."""
from . import Family
from ._hf_encoder import EncoderLayerAdapter, LayerHooks, from_transformers, hf_tower


class SiglipLayerAdapter(EncoderLayerAdapter):
    def attention_kwargs(self, attn, kwargs):
        return {"is_causal": attn.is_causal}  # what SiglipAttention passes, and nothing else


class HFSiglipFamily(Family):
    name = "Hugging Face SigLIP"
    examples = "SiglipVisionModel, SiglipModel"
    block_description = "transformers SiglipEncoderLayer"

    def tower(self, trunk):
        if not from_transformers(trunk):
            return None
        from transformers import SiglipModel, SiglipVisionModel
        if isinstance(trunk, SiglipModel):
            trunk = trunk.vision_model
        if not isinstance(trunk, SiglipVisionModel):
            return None
        return hf_tower(trunk, self, class_token=False)

    def block_adapter(self, block):
        if not from_transformers(block):
            return None
        from transformers.models.siglip import modeling_siglip
        if type(block) is not modeling_siglip.SiglipEncoderLayer:
            return None
        return SiglipLayerAdapter(block, modeling_siglip.eager_attention_forward)

    def follow(self, pruned, later_blocks):
        return [pruned.register_forward_hook(LayerHooks(pruned))]


FAMILY = HFSiglipFamily()
