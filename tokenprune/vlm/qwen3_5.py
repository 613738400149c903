"""Qwen3.5: Qwen2-VL's pruning (qwen2_vl.py) as it is. Its vision tower is Qwen3-VL's without the
deepstack features (so neither Qwen3-VL's `cut` nor its deepstack mergers apply): every block
attends to the whole image, the merger's rows are the units in the tower's order, and the
*Model's get_rope_index is Qwen2-VL's 3D M-RoPE (with videos split per frame, which pruning
leaves alone). Its processor is Qwen3-VL's.

The language model mixes gated-delta-net (linear attention) layers, which read no positions,
with full-attention layers, which read the 3D positions through M-RoPE. The pruning hands the
language model the kept image rows and their unpruned positions, as for Qwen2-VL; the linear
layers see the pruned sequence in the pruned prompt's order, which is the same definition
(SPEC.md, "Image tokens for Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE")."""
from .qwen2_vl import Qwen2VLImageTokenPruning


class Qwen3_5ImageTokenPruning(Qwen2VLImageTokenPruning):
    model_type = "qwen3_5"
    name = "Qwen3.5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")
    processor_classes = ("Qwen3VLProcessor",)
