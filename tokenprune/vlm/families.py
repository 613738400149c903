"""The vision-language families tokenprune prunes, one row each: the one list that
`prune_image_tokens` and its error message, `tokenprune generate`, the lmms-eval models and the
docs take their families from. Adding a family is a module in this folder and a row here.

Nothing heavy is imported here: the command line reads the table before it loads anything.
"""
import importlib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    model_type: str          # config.model_type
    name: str                # for people
    model_class: str         # the transformers *ForConditionalGeneration class
    module: str              # tokenprune.vlm.<module> holds its ImageTokenPruning subclass
    pruning: str             # that class's name
    example: str             # a hub id, for help texts
    # lmms-eval: the model that tokenprune_<lmms_model> wraps, our subclass of it, and whether
    # that is lmms-eval's chat implementation (else its simple one).
    lmms_model: Optional[str] = None
    lmms_class: Optional[str] = None
    lmms_chat: bool = True

    def pruning_class(self):
        return getattr(importlib.import_module(f"tokenprune.vlm.{self.module}"), self.pruning)


FAMILIES = {family.model_type: family for family in (
    Family("llava", "LLaVA-1.5", "LlavaForConditionalGeneration", "llava",
           "LlavaImageTokenPruning", "llava-hf/llava-1.5-7b-hf",
           "llava_hf", "tokenprune.lmms.llava_hf.TokenpruneLlavaHf"),
    # lmms-eval runs its simple implementation for qwen2_vl (it has no chat one).
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "qwen2_vl",
           "Qwen2VLImageTokenPruning", "Qwen/Qwen2-VL-2B-Instruct",
           "qwen2_vl", "tokenprune.lmms.qwen_vl.TokenpruneQwen2_VL", lmms_chat=False),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl",
           "Qwen2_5_VLImageTokenPruning", "Qwen/Qwen2.5-VL-7B-Instruct",
           "qwen2_5_vl", "tokenprune.lmms.qwen_vl.TokenpruneQwen2_5_VL"),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "qwen3_vl",
           "Qwen3VLImageTokenPruning", "Qwen/Qwen3-VL-2B-Instruct",
           "qwen3_vl", "tokenprune.lmms.qwen_vl.TokenpruneQwen3_VL"),
    # lmms-eval's qwen3_vl and qwen3_5 load the MoE class when the pretrained name has a size
    # like "A3B" (its own rule), so one tokenprune model serves the dense and the MoE family.
    Family("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe",
           "Qwen3VLMoeImageTokenPruning", "Qwen/Qwen3-VL-30B-A3B-Instruct",
           "qwen3_vl", "tokenprune.lmms.qwen_vl.TokenpruneQwen3_VL"),
    Family("qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "qwen3_5",
           "Qwen3_5ImageTokenPruning", "Qwen/Qwen3.5-9B",
           "qwen3_5", "tokenprune.lmms.qwen_vl.TokenpruneQwen3_5"),
    Family("qwen3_5_moe", "Qwen3.5-MoE", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe",
           "Qwen3_5MoeImageTokenPruning", "Qwen/Qwen3.5-35B-A3B",
           "qwen3_5", "tokenprune.lmms.qwen_vl.TokenpruneQwen3_5"),
    # lmms-eval 0.7.3 has a simple implementation for gemma3 only.
    Family("gemma3", "Gemma 3", "Gemma3ForConditionalGeneration", "gemma3",
           "Gemma3ImageTokenPruning", "google/gemma-3-4b-it",
           "gemma3", "tokenprune.lmms.gemma3.TokenpruneGemma3", lmms_chat=False),
    Family("internvl", "InternVL", "InternVLForConditionalGeneration", "internvl",
           "InternVLImageTokenPruning", "OpenGVLab/InternVL3-8B-hf",
           "internvl_hf", "tokenprune.lmms.internvl_hf.TokenpruneInternVLHf"),
    # lmms-eval's llava_hf loads the transformers LLaVA, LLaVA-NeXT and LLaVA-OneVision models
    # (its llava_onevision runs the original LLaVA-NeXT code instead, not transformers').
    Family("llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", "llava_next",
           "LlavaNextImageTokenPruning", "llava-hf/llava-v1.6-mistral-7b-hf",
           "llava_hf", "tokenprune.lmms.llava_hf.TokenpruneLlavaHf"),
    Family("llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
           "llava_onevision", "LlavaOnevisionImageTokenPruning",
           "llava-hf/llava-onevision-qwen2-7b-ov-hf",
           "llava_hf", "tokenprune.lmms.llava_hf.TokenpruneLlavaHf"),
)}

# Families that look close but are not handled yet (config.model_type), and why.
NOT_YET = {
    "llava_next_video": "video models",
    "video_llava": "video models",
    "gemma4": "Gemma 4's variable-resolution images, whose image token count follows each "
              "image's size, and its video and audio inputs",
}


def supported():
    """The families, for messages: "LLaVA-1.5 (llava), Qwen2-VL (qwen2_vl), ..."."""
    return ", ".join(f"{family.name} ({family.model_type})" for family in FAMILIES.values())
