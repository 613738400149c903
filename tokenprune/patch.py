"""Patching models in place: the user-facing drop-in API.

Works on OpenCLIP CLIP/CustomTextCLIP models, their `visual` towers (OpenCLIP's
VisionTransformer, or TimmModel with a timm VisionTransformer or Eva trunk) and timm
VisionTransformer / Eva models used directly; tokenprune/towers/ says what each family is.
"""
import warnings

import torch.nn as nn

from .block import PrunedBlock
from .config import MMR_LAMBDA, PruneConfig
from .towers import UnsupportedModelError, block_adapter, find_tower

__all__ = ["PrunedVisionEncoder", "UnsupportedModelError", "apply_pruning_to_model",
           "pruned_block", "remove_pruning", "replace_last_block"]


def visual_tower(model):
    """The image tower of an OpenCLIP model (`model.visual`), or `model` itself; raises
    UnsupportedModelError when tokenprune cannot prune it."""
    find_tower(model)
    return getattr(model, "visual", model)


def pruned_block(model):
    """The PrunedBlock of a patched model (or its tower), else None."""
    for block in find_tower(model).blocks:
        if isinstance(block, PrunedBlock):
            return block
    return None


def remove_pruning(model):
    """Undo `replace_last_block`: put the original block back. Returns the model; a model that
    cannot be pruned (say a ResNet tower) has nothing to undo and is returned unchanged."""
    try:
        blocks = find_tower(model).blocks
    except UnsupportedModelError:
        return model
    for i, block in enumerate(blocks):
        if isinstance(block, PrunedBlock):
            blocks[i] = block.restore()
    return model


def replace_last_block(model, k_anchors=10, top_m=50, alpha=0.5, score_norm="none", layer=-1,
                       backend="auto", config=None, selection="score", mmr_lambda=MMR_LAMBDA):
    """Prune tokens at one block (by default the last) of a ViT image tower, in place.

    `model` is an OpenCLIP CLIP/CustomTextCLIP model, its `visual` tower, or a timm
    VisionTransformer / Eva model. Pass either the keyword parameters (PruneConfig's) or a
    ready `PruneConfig` as `config`. Patching an already patched model replaces the earlier
    pruning instead of stacking a second one. Returns `model`.
    """
    if config is None:
        config = PruneConfig(k_anchors=k_anchors, top_m=top_m, alpha=alpha,
                             score_norm=score_norm, layer=layer, backend=backend,
                             selection=selection, mmr_lambda=mmr_lambda)
    tower = find_tower(model)
    blocks = tower.blocks
    depth = len(blocks)
    if not -depth <= config.layer < depth:
        raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for this {depth}-block "
                         f"tower, got {config.layer}")
    remove_pruning(model)
    index = config.layer % depth
    try:
        block_adapter(blocks[index])
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"block {index} of {type(model).__name__}: {err}") from None
    pruned = PrunedBlock(blocks[index], config, num_prefix=tower.num_prefix,
                         class_token=tower.class_token)
    pruned._hooks = tower.family.follow(pruned, list(blocks)[index + 1:])
    blocks[index] = pruned
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
    """The seed's wrapper: an image tower with pruning applied, called on images.

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
