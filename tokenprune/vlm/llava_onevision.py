"""LLaVA-OneVision: LLaVA-NeXT's pruning (llava_next.py) where its model differs.
- An image in a prompt of several is its base tile alone and one newline row
  (`batch_num_images`): `layouts`, and the processor's count.
- A crop grid larger than `vision_aspect_ratio` allows ("anyres_max_9": 9 tiles' worth of
  patches, and 10 % a side more) is downsampled by transformers, bilinearly, before the newline
  rows: each row it gives (a cell) blends up to four patches. A cell's unit is the patch its
  blend weighs most, the nearer of the two it reads in each direction (`cells`); the tiles then
  select among those patches as among the patches of an undownsampled grid.
- Video (`pixel_values_videos`) passes through whole: the feature block's hook selects only
  within get_image_features.
"""
import math

import torch

from .llava_next import LlavaNextImageTokenPruning, NextPlaceholderCount


class LlavaOnevisionImageTokenPruning(LlavaNextImageTokenPruning):
    """The pruning of one LLaVA-OneVision model: LLaVA-NeXT's (`last_keep_idx`, `layout`), with
    the differences above."""

    model_type = "llava_onevision"
    name = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    processor_classes = ("LlavaOnevisionProcessor",)

    def cells(self, grid_h, grid_w):
        # transformers' rule and arithmetic: "anyres_max_9" allows 9 tiles' worth of patches;
        # more than 1.1 times that a side is downsampled to int(size // ratio) a side.
        most = int(self.model.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(grid_h * grid_w / (most * self.side ** 2))
        if ratio <= 1.1:
            return super().cells(grid_h, grid_w)
        return (nearest_sources(grid_h, int(grid_h // ratio)),
                nearest_sources(grid_w, int(grid_w // ratio)))

    def layouts(self, image_sizes, options):
        counts = options.get("batch_num_images")
        sizes = image_sizes.tolist()
        patched = ([True] * len(sizes) if counts is None else
                   [n == 1 for n in counts.tolist() for _ in range(n)])
        return [self.layout(int(h), int(w), tiles) for (h, w), tiles in zip(sizes, patched)]

    def image_options(self, kwargs):
        return {"batch_num_images": kwargs.get("batch_num_images")}

    def encode(self, inner, kwargs):
        super().encode(inner, kwargs)
        # The class's forward refuses pixels beside mm_encoder_outputs: the videos too, unpruned.
        if kwargs.get("pixel_values_videos") is not None:
            kwargs["mm_encoder_outputs"]["video"] = inner.get_video_features(
                kwargs["pixel_values_videos"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True)
            kwargs["pixel_values_videos"] = None

    def placeholder_count(self, processor):
        return OnevisionPlaceholderCount(processor, self)


class OnevisionPlaceholderCount(NextPlaceholderCount):
    def patched(self, image_inputs, image_idx):
        """An image is cut into tiles when its prompt holds it alone, as the processor says."""
        start = 0
        for count in image_inputs["batch_num_images"]:
            if image_idx < start + count:
                return count == 1
            start += count
        return True


def nearest_sources(size, out):
    """(out,) int64: for each of the `out` samples that bilinear interpolation (align_corners
    False) takes of `size` values (out < size), the index its blend weighs most. Sample i reads
    the two values around (i + 1/2) size / out - 1/2; the nearer one, the lower on a tie,
    computed exactly: the source is ((2i + 1) size - out) / (2 out)."""
    numerator = (2 * torch.arange(out) + 1) * size - out
    low = numerator // (2 * out)
    return torch.where(numerator - low * 2 * out > out, low + 1, low).clamp(max=size - 1)
