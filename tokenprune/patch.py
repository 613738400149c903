"""Patching models in place: the user-facing drop-in API.

Works on OpenCLIP CLIP/CustomTextCLIP models, their `visual` towers (OpenCLIP's
VisionTransformer, or TimmModel with a timm VisionTransformer or Eva trunk), timm
VisionTransformer / Eva models used directly, and Hugging Face CLIP / SigLIP models and vision
models; tokenprune/towers/ says what each family is. LLaVA models have their own entry point,
tokenprune.vlm.prune_image_tokens; pruned_block and remove_pruning handle them too.
"""
import dataclasses
import functools
import inspect
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .block import PrunedBlock
from .config import MMR_LAMBDA, PruneConfig
from .towers import UnsupportedModelError, block_adapter, find_tower, vision_language
from .vlm import image_token_pruning, remove_image_token_pruning

__all__ = ["PrunedVisionEncoder", "UnsupportedModelError", "apply_pruning_to_model",
           "pruned_block", "pruned_blocks", "remove_pruning", "replace_last_block"]


SETTINGS = tuple(field.name for field in dataclasses.fields(PruneConfig))


def _config_or_keywords(name):
    """Decorate an entry point that takes either `config` or PruneConfig's fields as keywords:
    a call that gives both is refused, since one of the two would be silently ignored."""
    def decorate(function):
        signature = inspect.signature(function)
        more = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]

        @functools.wraps(function)
        def checked(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments  # what the call wrote, no defaults
            for keywords in more:
                given.update(given.pop(keywords, {}))
            config = given.get("config")
            if config is not None and not isinstance(config, PruneConfig):
                raise TypeError(f"{name}: config must be a PruneConfig, got "
                                f"{type(config).__name__}")
            settings = ", ".join(f"{key}={given[key]!r}" for key in SETTINGS if key in given)
            cut = [f"{key}={given[key]!r}" for key in ("layer", "k_anchors", "top_m")
                   if key in given]
            if given.get("schedule") and cut:
                raise TypeError(f"{name}: give either schedule or {', '.join(cut)}, not both (a "
                                f"schedule's stages are (layer, k_anchors, top_m) triples)")
            if config is not None and settings:
                raise TypeError(f"{name}: give either config or the keywords {settings}, not "
                                f"both (dataclasses.replace(config, {settings}) is the config "
                                f"with those changed)")
            return function(*args, **kwargs)
        return checked
    return decorate


def _require_model(function, model, what="the model"):
    """TypeError when `model` is None. Without this, None reached the tower lookup, which
    described it as a model "with an image tower of type NoneType"."""
    if model is None:
        raise TypeError(f"{function}: a model is required ({what}), got None")


def visual_tower(model: nn.Module) -> nn.Module:
    """The image tower of an OpenCLIP model (`model.visual`), or `model` itself; raises
    UnsupportedModelError when tokenprune cannot prune it."""
    find_tower(model)
    return getattr(model, "visual", model)


def pruned_block(model: nn.Module):
    """The PrunedBlock of a patched model (or its tower), else None (for any model that is not
    pruned, one that tokenprune cannot prune included); with a schedule, its last stage (whose
    `last_keep_idx` are the patches the tower's head sees). For a vision-language model patched
    by `prune_image_tokens`, its pruning state (with `last_keep_idx` and `config` too).
    `model=None` is a TypeError."""
    _require_model("pruned_block", model)
    stages = pruned_blocks(model)
    return stages[-1] if stages else None


def pruned_blocks(model: nn.Module) -> tuple:
    """Every stage's PrunedBlock of a patched model (or its tower), in order: one for a single
    cut, none for a model that is not pruned (one tokenprune cannot prune included). Each
    `last_keep_idx` is in the original token numbering. For a vision-language model patched by
    `prune_image_tokens`, its pruning state alone. `model=None` is a TypeError."""
    _require_model("pruned_blocks", model)
    state = image_token_pruning(model)
    if state is not None:
        return (state,)
    if vision_language(model):
        return ()
    try:
        blocks = find_tower(model).blocks
    except UnsupportedModelError:
        # A question, not a request to prune: a model that cannot be pruned is not pruned, as
        # remove_pruning finds nothing to undo there.
        return ()
    return tuple(block for block in blocks if isinstance(block, PrunedBlock))


def remove_pruning(model: nn.Module) -> nn.Module:
    """Undo `replace_last_block`: put the original block back. Returns the model; a model that
    cannot be pruned (say a ResNet tower) has nothing to undo and is returned unchanged.
    Also undoes `prune_image_tokens` on a vision-language model (and the processors patched with
    it) or on one processor. `model=None` is a TypeError: returning None silently would hide a
    call made with the wrong variable."""
    _require_model("remove_pruning", model, "the model or processor to undo the pruning of")
    if remove_image_token_pruning(model):
        return model
    try:
        blocks = find_tower(model).blocks
    except UnsupportedModelError:
        return model
    for i, block in enumerate(blocks):
        if isinstance(block, PrunedBlock):
            blocks[i] = block.restore()
    return model


@_config_or_keywords("replace_last_block")
def replace_last_block(model: nn.Module, k_anchors: int = 10, top_m: int = 50,
                       alpha: float = 0.5, score_norm: str = "none", layer: int = -1,
                       backend: str = "auto", config: Optional[PruneConfig] = None,
                       selection: str = "score", mmr_lambda: float = MMR_LAMBDA,
                       schedule: Optional[Sequence[Tuple[int, int, int]]] = None) -> nn.Module:
    """Prune tokens at one block (by default the last) of a ViT image tower, in place; or, with
    `schedule=[(layer, k_anchors, top_m), ...]`, at several blocks, each stage selecting among
    the patches the stages before it kept (SPEC.md, "Pruning at several blocks").

    `model` is an OpenCLIP CLIP/CustomTextCLIP model, its `visual` tower, a timm
    VisionTransformer / Eva model, or a transformers CLIPVisionModel,
    CLIPVisionModelWithProjection, CLIPModel, SiglipVisionModel or SiglipModel. Pass either the
    keyword parameters (PruneConfig's) or a ready `PruneConfig` as `config`; both in one call is
    a TypeError that names the keywords. Patching an already
    patched model replaces the earlier pruning instead of stacking a second one. Returns `model`.
    `model=None` is a TypeError.
    """
    _require_model("replace_last_block", model, "an OpenCLIP, timm or Hugging Face model to prune")
    if config is None:
        config = PruneConfig(k_anchors=k_anchors, top_m=top_m, alpha=alpha,
                             score_norm=score_norm, layer=layer, backend=backend,
                             selection=selection, mmr_lambda=mmr_lambda, schedule=schedule)
    tower = find_tower(model)
    blocks = tower.blocks
    indices = config.block_indices(len(blocks))
    remove_pruning(model)
    for index in indices:
        try:
            block_adapter(blocks[index])
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"block {index} of {type(model).__name__}: {err}") from None
    previous = None
    for stage, index in enumerate(indices):
        previous = blocks[index] = PrunedBlock(blocks[index], config, tower.num_prefix,
                                               tower.class_token, stage, previous)
    for index, hooks in zip(indices, follow_stages(tower, indices)):
        blocks[index]._hooks = hooks
    return model


def follow_stages(tower, indices):
    """For each stage's pruned block, in place at `indices` of the tower's blocks, the hooks
    (from tower.family.follow) that carry its kept tokens' positions (rotary) up to and
    including the next stage, which selects among them and takes over from there."""
    blocks = list(tower.blocks)
    ends = [index + 1 for index in indices[1:]] + [len(blocks)]
    return [tower.family.follow(blocks[index], blocks[index + 1:end])
            for index, end in zip(indices, ends)]


@_config_or_keywords("apply_pruning_to_model")
def apply_pruning_to_model(model: nn.Module, k_anchors: int = 10, top_m: int = 50,
                           alpha: float = 0.5, strict: bool = True,
                           config: Optional[PruneConfig] = None, **kwargs) -> nn.Module:
    """The seed's entry point: `replace_last_block`, except that with `strict=False` an
    unsupported model is returned unchanged with a warning instead of raising.
    Bad pruning values raise `ValueError` either way; `model=None` is a TypeError either way (a
    missing model is a mistake in the call, not an unsupported model)."""
    _require_model("apply_pruning_to_model", model, "an OpenCLIP, timm or Hugging Face model to "
                   "prune")
    if config is None:
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

    @_config_or_keywords("PrunedVisionEncoder")
    def __init__(self, model: nn.Module, config: Optional[PruneConfig] = None, **kwargs):
        super().__init__()
        _require_model("PrunedVisionEncoder", model, "an OpenCLIP, timm or Hugging Face model to "
                       "prune")
        self.visual = replace_last_block(visual_tower(model), config=config, **kwargs)

    @property
    def config(self) -> PruneConfig:
        return pruned_block(self.visual).config

    @property
    def keep_idx(self) -> Optional[torch.Tensor]:
        """Kept patch indices (B, k + m) of the last forward (None if nothing was pruned); with a
        schedule, the last stage's, in the original token numbering."""
        return pruned_block(self.visual).last_keep_idx

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)
