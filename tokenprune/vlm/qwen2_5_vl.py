"""Qwen2.5-VL: Qwen2-VL's pruning (qwen2_vl.py) where its tower differs. The tower holds the units
in window order (the same order in every block), and only the blocks in `fullatt_block_indexes`
attend to the whole image; the others attend within windows, so a cut inside the tower must be
at a full-attention block, and the window blocks after it get their windows recounted."""
import torch

from .qwen2_vl import Qwen2VLImageTokenPruning


class Qwen2_5_VLImageTokenPruning(Qwen2VLImageTokenPruning):
    model_type = "qwen2_5_vl"
    name = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    processor_classes = ("Qwen2_5_VLProcessor",)

    def unit_order(self, grid, rows, device):
        from transformers.vision_utils import get_vision_window_index
        visual = self.inner.visual
        window_index, windows = get_vision_window_index(grid, visual.spatial_merge_size,
                                                        visual.window_size, visual.patch_size)
        merge2 = self.merge ** 2
        position = torch.argsort(window_index.to(device))  # unit -> its place in window order
        order = (position[:, None] * merge2 + torch.arange(merge2, device=device)).reshape(-1)
        return order, windows

    def attends_whole_image(self, block):
        blocks = self.inner.visual.blocks
        index = next(i for i, b in enumerate(blocks) if b is block)
        return index in self.inner.visual.fullatt_block_indexes

    @classmethod
    def check_layer(cls, layer, visual):
        index = super().check_layer(layer, visual)
        full = visual.fullatt_block_indexes
        depth = len(visual.blocks)
        if index not in full:
            raise ValueError(f"layer={layer} is window-attention block {index} of Qwen2.5-VL's "
                             f"vision tower: layer must be one of its full-attention blocks "
                             f"{list(full)} (or {[i - depth for i in full]}), where the "
                             f"selection sees the whole image")
        return index
