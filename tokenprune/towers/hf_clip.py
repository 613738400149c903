"""Hugging Face transformers' CLIP image tower: CLIPVisionModel, CLIPVisionModelWithProjection
and CLIPModel's `vision_model`, built from CLIPEncoderLayers (class token at index 0)."""
from . import Family
from ._hf_encoder import EncoderLayerAdapter, LayerHooks, from_transformers, hf_tower


class HFCLIPFamily(Family):
    name = "Hugging Face CLIP"
    examples = "CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel"
    block_description = "transformers CLIPEncoderLayer"

    def tower(self, trunk):
        if not from_transformers(trunk):
            return None
        from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
        if isinstance(trunk, (CLIPModel, CLIPVisionModelWithProjection)):
            trunk = trunk.vision_model
        if not isinstance(trunk, CLIPVisionModel):
            return None
        return hf_tower(trunk, self, class_token=True)

    def block_adapter(self, block):
        if not from_transformers(block):
            return None
        from transformers.models.clip import modeling_clip
        if type(block) is not modeling_clip.CLIPEncoderLayer:
            return None
        return EncoderLayerAdapter(block, modeling_clip.eager_attention_forward)

    def follow(self, pruned, later_blocks):
        return [pruned.register_forward_hook(LayerHooks(pruned))]


FAMILY = HFCLIPFamily()
