"""Qwen3.5-MoE: Qwen3.5's pruning (qwen3_5.py) as it is: the same vision tower, *Model methods
and processor; only the language model's MLPs are mixtures of experts, which act per token."""
from .qwen3_5 import Qwen3_5ImageTokenPruning


class Qwen3_5MoeImageTokenPruning(Qwen3_5ImageTokenPruning):
    model_type = "qwen3_5_moe"
    name = "Qwen3.5-MoE"
    model_classes = ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel")
