"""Patching OpenCLIP models in place: the user-facing drop-in API."""
import warnings

import torch.nn as nn
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .block import PrunedResidualAttentionBlock
from .config import PruneConfig


class UnsupportedModelError(TypeError):
    """The model's visual tower is not an OpenCLIP VisionTransformer of ResidualAttentionBlocks."""


SUPPORTED = ("OpenCLIP models whose visual tower is a VisionTransformer (CLS token at index 0) "
             "built from ResidualAttentionBlocks, e.g. ViT-B-32, ViT-B-16, ViT-L-14")


def visual_tower(model):
    """The VisionTransformer of an OpenCLIP CLIP/CustomTextCLIP model, or `model` if it is one."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(f"{type(model).__name__} has a visual tower of type "
                                    f"{type(visual).__name__}; tokenprune supports {SUPPORTED}")
    return visual


def pruned_block(model):
    """The PrunedResidualAttentionBlock of a patched model (or its tower), else None."""
    for block in visual_tower(model).transformer.resblocks:
        if isinstance(block, PrunedResidualAttentionBlock):
            return block
    return None


def remove_pruning(model):
    """Undo `replace_last_block`: put the original block back. Returns the model; a model that
    cannot be pruned (a ResNet or timm tower) has nothing to undo and is returned unchanged."""
    if not isinstance(getattr(model, "visual", model), VisionTransformer):
        return model
    blocks = visual_tower(model).transformer.resblocks
    for i, block in enumerate(blocks):
        if isinstance(block, PrunedResidualAttentionBlock):
            blocks[i] = block.restore()
    return model


def replace_last_block(model, k_anchors=10, top_m=50, alpha=0.5, score_norm="none", layer=-1,
                       backend="auto", config=None):
    """Prune tokens at one block (by default the last) of an OpenCLIP ViT, in place.

    `model` is an OpenCLIP CLIP/CustomTextCLIP model or its `visual` tower. Pass either the
    keyword parameters or a ready `PruneConfig` as `config`. Patching an already patched
    model replaces the earlier pruning instead of stacking a second one. Returns `model`.
    """
    if config is None:
        config = PruneConfig(k_anchors=k_anchors, top_m=top_m, alpha=alpha,
                             score_norm=score_norm, layer=layer, backend=backend)
    blocks = visual_tower(model).transformer.resblocks
    depth = len(blocks)
    if not -depth <= config.layer < depth:
        raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for this {depth}-block "
                         f"tower, got {config.layer}")
    remove_pruning(model)
    index = config.layer % depth
    if type(blocks[index]) is not ResidualAttentionBlock:
        raise UnsupportedModelError(f"block {index} of {type(model).__name__} is a "
                                    f"{type(blocks[index]).__name__}; tokenprune supports {SUPPORTED}")
    blocks[index] = PrunedResidualAttentionBlock(blocks[index], config)
    return model


def apply_pruning_to_model(model, k_anchors=10, top_m=50, alpha=0.5, strict=True, **kwargs):
    """The seed's entry point: `replace_last_block`, except that with `strict=False` an
    unsupported model is returned unchanged with a warning instead of raising.
    Bad pruning values raise `ValueError` either way."""
    config = PruneConfig(k_anchors=k_anchors, top_m=top_m, alpha=alpha, **kwargs)
    try:
        return replace_last_block(model, config=config)
    except UnsupportedModelError as err:
        if strict:
            raise
        warnings.warn(f"token pruning not applied, the model is unchanged: {err}", stacklevel=2)
        return model


class PrunedVisionEncoder(nn.Module):
    """The seed's wrapper: an OpenCLIP visual tower with pruning applied, called on images.

    The tower is patched in place (it stays shared with the model it came from).
    """

    def __init__(self, model, config=None, **kwargs):
        super().__init__()
        self.visual = replace_last_block(visual_tower(model), config=config, **kwargs)

    @property
    def config(self):
        return pruned_block(self.visual).config

    @property
    def keep_idx(self):
        """Kept patch indices (B, k + m) of the last forward (None if nothing was pruned)."""
        return pruned_block(self.visual).last_keep_idx

    def forward(self, images):
        return self.visual(images)
