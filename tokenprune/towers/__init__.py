"""Tower families: where a model's blocks live and how to prune one of them.

One file per family, each with one `Family` (the tower: its blocks, prefix tokens, patch grid,
and anything that must follow the kept tokens into later blocks) and one block adapter (how a
block computes its packed qkv, and how it runs attention and MLP on the kept rows). The
selection (tokenprune.selection) never learns which family called it. A new family is a new
file and a line in FAMILY_MODULES.
"""
import importlib
from dataclasses import dataclass
from typing import Tuple

import torch.nn as nn


class UnsupportedModelError(TypeError):
    """The model's image tower, or the block asked for, is not one tokenprune can prune."""


@dataclass(frozen=True)
class Tower:
    """The part of a model that pruning needs to know.

    module: the module whose forward runs the blocks (OpenCLIP VisionTransformer, timm trunk,
        transformers CLIPVisionModel / SiglipVisionModel).
    blocks: its sequence of blocks (nn.ModuleList / nn.Sequential), replaced in place.
    num_prefix: p, the leading non-patch tokens (class, registers, distillation).
    class_token: whether token 0 is a class token (SPEC: the anchor rule depends on it).
    grid_size: the patch grid (rows, cols) at the tower's image size.
    family: the Family that found it.
    """

    module: nn.Module
    blocks: nn.Module
    num_prefix: int
    class_token: bool
    grid_size: Tuple[int, int]
    family: "Family"

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]


class Family:
    """One tower family. Subclasses set the names and override `tower` and `block_adapter`."""

    name = ""               # e.g. "timm Eva"
    examples = ""           # e.g. "EVA02-B-16, PE-Core-B-16"
    block_description = ""  # the block type(s) its adapter handles
    timm_modules = ()       # the timm.models modules whose models may be this family's

    def tower(self, trunk):
        """The Tower if `trunk` is this family's kind of tower, else None."""
        raise NotImplementedError

    def block_adapter(self, block):
        """An adapter bound to `block` if this family knows the block type, else None."""
        raise NotImplementedError

    def follow(self, pruned, later_blocks):
        """Make whatever travels with the tokens (rotary positions) follow the kept tokens into
        `later_blocks`; returns handles with .remove(). Nothing to do for most towers."""
        return []


class BlockAdapter:
    """How one block computes its attention's qkv and runs on the kept rows.

    `tokens(*args, **kwargs)` takes the block's own call arguments and returns (x, call):
    x (B, T, C) batch first, and `call`, whatever else the block was called with that the other
    methods need (rotary positions). `qkv(x, call)` is (B, T, 3C), [q | k | v] per token with
    heads packed as (3, H, d), q and k exactly as the attention uses them. `forward_kept(x_kept,
    qkv_kept, call, training)` is the block's output on the kept rows, in the caller's layout.
    """

    num_heads = None
    scale = None  # the attention's logit scale; None means d ** -0.5

    def __init__(self, block):
        self.block = block

    def tokens(self, *args, **kwargs):
        raise NotImplementedError

    def qkv(self, x, call):
        raise NotImplementedError

    def forward_kept(self, x_kept, qkv_kept, call, training):
        raise NotImplementedError


# The registry: one module per family, each with a FAMILY, tried in this order.
FAMILY_MODULES = ("openclip", "timm_vit", "timm_eva", "hf_clip", "hf_siglip")


def timm_tower(trunk, family):
    """The Tower of a timm VisionTransformer or Eva trunk (they keep the same attributes)."""
    if getattr(trunk.attn_pool, "pos_embed", None) is not None:
        # A position embedding of the full token count inside the pooling head.
        raise UnsupportedModelError(f"tokenprune cannot prune a timm {type(trunk).__name__} "
                                    "whose attention-pool head has its own position embedding")
    return Tower(module=trunk, blocks=trunk.blocks, num_prefix=trunk.num_prefix_tokens,
                 class_token=trunk.cls_token is not None,
                 grid_size=tuple(trunk.patch_embed.grid_size), family=family)


def _families():
    return tuple(importlib.import_module(f".{name}", __name__).FAMILY for name in FAMILY_MODULES)


def supported():
    """One line listing what can be pruned, for error messages."""
    return "; ".join(f"{family.name} ({family.examples})" for family in _families())


def supported_blocks():
    return ", ".join(family.block_description for family in _families())


def _trunk(visual):
    """OpenCLIP's TimmModel wraps a timm model as `.trunk`; every other tower is itself."""
    from open_clip.timm_model import TimmModel
    return visual.trunk if isinstance(visual, TimmModel) else visual


def describe(visual):
    trunk = _trunk(visual)
    if trunk is visual:
        return type(visual).__name__
    return f"{type(visual).__name__} with a timm {type(trunk).__name__} trunk"


def vision_language(model):
    """Whether `model` is a vision-language model as transformers builds them (LLaVA keeps its
    image tower in `model.model.vision_tower`, Qwen-VL in `model.model.visual` beside its
    `language_model`): tokenprune.prune_image_tokens' kind of model."""
    return any(hasattr(m, "vision_tower") or (hasattr(m, "visual") and hasattr(m, "language_model"))
               for m in (model, getattr(model, "model", None)))


def find_tower(model):
    """The Tower of an OpenCLIP CLIP/CustomTextCLIP model, its `visual`, OpenCLIP's TimmModel,
    a timm model used directly, or a Hugging Face CLIP / SigLIP model or vision model.
    UnsupportedModelError names the tower type otherwise."""
    visual = getattr(model, "visual", model)
    trunk = _trunk(visual)
    for family in _families():
        tower = family.tower(trunk)
        if tower is not None:
            return tower
    hint = ""
    if vision_language(model):
        hint = " (for a LLaVA, Qwen-VL or InternVL model, use tokenprune.prune_image_tokens)"
    raise UnsupportedModelError(f"{type(model).__name__} has an image tower of type "
                                f"{describe(visual)}; tokenprune supports OpenCLIP, timm and "
                                f"Hugging Face models whose image tower is one of: "
                                f"{supported()}{hint}")


def refused_by_config(vision_cfg):
    """What an OpenCLIP model config's image tower is, when it is certainly one tokenprune cannot
    prune (checked before anything is built or downloaded), else None. Towers that pass are
    checked again, fully, once built."""
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        return "a ResNet image tower"
    name = vision_cfg.get("timm_model_name")
    if name:
        import timm.models
        if not timm.models.is_model(name):
            return None  # not in this timm: let OpenCLIP say so
        module = timm.models.model_entrypoint(name).__module__
        if not any(module in family.timm_modules for family in _families()):
            return f"a timm {name} image tower (from {module})"
    return None


def block_adapter(block):
    """The adapter for one block; UnsupportedModelError when no family knows the block."""
    for family in _families():
        adapter = family.block_adapter(block)
        if adapter is not None:
            return adapter
    raise UnsupportedModelError(f"tokenprune cannot prune a {type(block).__name__}; tokenprune "
                                f"supports OpenCLIP, timm and Hugging Face models built from these "
                                f"blocks: {supported_blocks()}")
