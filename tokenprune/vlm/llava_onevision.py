"""LLaVA-OneVision: LLaVA-NeXT's pruning (llava_next.py) where its model differs.
- An image in a prompt of several is its base tile alone and one newline row
  (`batch_num_images`): `layouts`, and the processor's count.
- A crop grid larger than `vision_aspect_ratio` allows ("anyres_max_9": 1.1 x sqrt(9) tiles a
  side) is downsampled by transformers, bilinearly: each of its rows blends up to four patches,
  so no patch's selection says which rows to keep. Its crop rows pass whole, with a warning, and
  only the base tile is pruned (`passed_whole`).
- Video (`pixel_values_videos`) passes through whole: the feature block's hook selects only
  within get_image_features.
"""
import math
import warnings

from .llava_next import LlavaNextImageTokenPruning, NextPlaceholderCount


class LlavaOnevisionImageTokenPruning(LlavaNextImageTokenPruning):
    model_type = "llava_onevision"
    name = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    processor_classes = ("LlavaOnevisionProcessor",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warned = False

    def passed_whole(self, grid_h, grid_w):
        # transformers' rule: "anyres_max_9" allows 9 tiles' worth of patches, and 10 % more.
        most = int(self.model.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(grid_h * grid_w / (most * self.side ** 2))
        if ratio <= 1.1:
            return None
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.name}: an image's crop grid of {grid_h} x {grid_w} patches is "
                          f"downsampled by transformers (vision_aspect_ratio "
                          f"{self.model.config.vision_aspect_ratio!r}), each row blending up to "
                          f"four patches: the crop rows of such images are passed whole and "
                          f"only their base tile is pruned (docs/vlm.md)", stacklevel=2)
        height, width = int(grid_h // ratio), int(grid_w // ratio)
        return height * (width + 1)

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
