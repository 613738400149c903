"""Qwen3-VL: Qwen2-VL's pruning (qwen2_vl.py) plus its deepstack features, the outputs of some
vision blocks merged and added to the language model's first layers at the image tokens. Each
is cut to the same kept units as the tower's output; under `layer=L` those of blocks L and after
come from the kept patches."""
from .qwen2_vl import Qwen2VLImageTokenPruning, kept_rows_of


class Qwen3VLImageTokenPruning(Qwen2VLImageTokenPruning):
    model_type = "qwen3_vl"
    name = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    processor_classes = ("Qwen3VLProcessor",)

    def cut(self, output, keep):
        super().cut(output, keep)
        output.deepstack_features = [kept_rows_of(feature, keep)
                                     for feature in output.deepstack_features]

    def mergers_from(self, layer):
        visual = self.inner.visual
        return super().mergers_from(layer) + [
            merger for index, merger in zip(visual.deepstack_visual_indexes,
                                            visual.deepstack_merger_list) if index >= layer]
