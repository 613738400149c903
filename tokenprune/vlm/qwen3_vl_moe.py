"""Qwen3-VL-MoE: Qwen3-VL's pruning (qwen3_vl.py) as it is. Its *Model, vision tower (deepstack
features included), get_rope_index and processor (Qwen3VLProcessor) are Qwen3-VL's; only the
language model's MLPs are mixtures of experts, which act per token and take no positions, so
nothing the pruning touches differs."""
from .qwen3_vl import Qwen3VLImageTokenPruning


class Qwen3VLMoeImageTokenPruning(Qwen3VLImageTokenPruning):
    model_type = "qwen3_vl_moe"
    name = "Qwen3-VL-MoE"
    model_classes = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel")
