"""The public `prune_image_tokens`: its arguments checked here once, then the model handed to its
family's module (families.py says which)."""
import warnings
from typing import Any, Optional

from ..config import IMAGE_TOKEN_SELECTION, MMR_LAMBDA, image_token_config
from ..towers import UnsupportedModelError
from .base import remove_image_token_pruning
from .families import FAMILIES, NOT_YET, supported



def family_of(model):
    """(the family's ImageTokenPruning subclass, the model's inner *Model), or
    UnsupportedModelError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    because = ""
    if family is not None:
        pruning = family.pruning_class()
        inner = pruning.inner_model(model)
        if inner is not None:
            return pruning, inner
        # Another family's class loaded from this family's config (lmms-eval loads a dense
        # class for an MoE checkpoint whose name lacks its "A3B"): say which classes it needs.
        because = (f" (its config is {family.name}'s, {model_type!r}, whose classes are "
                   f"{' and '.join(pruning.model_classes)})")
    why = NOT_YET.get(model_type)
    because = f" ({why} are not supported yet)" if why else because
    raise UnsupportedModelError(f"tokenprune.prune_image_tokens cannot prune "
                                f"{type(model).__name__}{because}; it supports {supported()}: "
                                f"their *ForConditionalGeneration and *Model classes")


def prune_image_tokens(model: Any, processor: Any = None, k_anchors: int = 10,
                       top_m: Optional[int] = None, alpha: float = 0.5, score_norm: str = "none",
                       backend: str = "auto", selection: str = IMAGE_TOKEN_SELECTION,
                       mmr_lambda: float = MMR_LAMBDA, ratio: Optional[float] = None,
                       layer: Optional[int] = None) -> Any:
    """Make a vision-language model's language model receive fewer image tokens per image.

    `model`: a transformers model of a family in tokenprune.vlm.FAMILIES (LLaVA-1.5 with a CLIP
    or SigLIP tower, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
    Qwen3.5, Qwen3.5-MoE, Gemma 3, InternVL: tokenprune.vlm.FAMILIES lists them): its
    *ForConditionalGeneration or its *Model. Other models raise UnsupportedModelError, which
    names the supported families.

    How many: `ratio=None` keeps `k_anchors + top_m` per image (`top_m` is 54 when not given;
    at most all of them); `ratio` in (0, 1] keeps ceil(ratio * n) of an image's n tokens (a
    product within 1e-6 of an integer counts as that integer); an explicit `top_m` with `ratio`
    is refused. The first min(k_anchors, kept) are anchors, the rest are kept by `selection`
    ("mmr" by default, with `mmr_lambda`; "cls", "score" with `alpha` and `score_norm`, or
    "random"; PruneConfig has their meaning, SPEC.md the definitions).

    Qwen-VL (SPEC.md, "Image tokens for Qwen2-VL, ..."): the unit is the merged token; the
    selection is made at the vision tower's last block per image; every kept token keeps its
    unpruned 3D position, in a forward pass and under `generate`; video passes through whole.
    `pruned_block(model).last_keep_idx` is a list of one tensor per image of the kept unit
    indices. `layer=L` (Qwen-VL only; SPEC.md, "Pruning inside the Qwen vision tower") makes the
    selection at vision block L instead (negative counts from the end; Qwen2.5-VL: one of
    `fullatt_block_indexes`), and block L and every later block run on the kept units' patches
    only, so that the tower costs less too.

    InternVL (SPEC.md, "Image tokens for InternVL"): the unit is the pixel shuffle's 2 x 2 patch
    group; an image's count is over all its tiles, spread evenly over them (the remainder to the
    thumbnail first); the selection is made per tile at the block of `vision_feature_layer` with
    the class token's attention; every kept token keeps its unpruned position. The patched
    processor adds `image_num_patches` (each image's tile count) to its output, which the model
    needs with pixel_values: pass the processor's output whole.

    LLaVA: the selection is made at the vision block whose output is
    `config.vision_feature_layer` (the deepest one of a list; a layer that is only the
    embeddings is refused), from that block's input and its own q/k; the language model
    receives the kept rows of that layer's ordinary output, in patch order, through the
    projector. With `vision_feature_select_strategy="full"` the class token's row comes first.
    `config.image_seq_length` is set to the new count per image. Set `vision_feature_layer` /
    `vision_feature_select_strategy` in the model's config before this call.
    `pruned_block(model).last_keep_idx` is (images, kept) there.

    Gemma 3 (SPEC.md, "Image tokens for Gemma 3"): the unit is the pooled token (4 x 4 SigLIP
    patches), selected at the tower's last block; every image and pan-and-scan crop keeps the
    same count; every token keeps its unpruned position, in a forward pass and under `generate`;
    Gemma 3's own mask lets each image's kept tokens see each other. `last_keep_idx` is
    (images, kept).

    LLaVA-NeXT and LLaVA-OneVision (SPEC.md, "Image tokens for LLaVA-NeXT and LLaVA-OneVision"):
    LLaVA-1.5's selection on every tile, each keeping kept(n) of its n patches that reach the
    language model, every newline row kept; each kept row at its unpruned position, in a
    forward pass and under `generate`. `pruned_block(model).last_keep_idx` is a list of one
    tensor per image of its kept rows; `.layout(height, width).kept` an image's count.

    `processor`: the model's processor (the family's: LlavaProcessor, LlavaNextProcessor,
    LlavaOnevisionProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor (which
    Qwen3-VL-MoE and Qwen3.5 use too), Gemma3Processor, InternVLProcessor) to patch as well, so that it writes the kept number of
    placeholders per image (pass it later with the same call to patch it then). For the LLaVA
    families, Gemma 3 and InternVL, prompts with another count of image tokens per image (an
    unpatched processor's) raise ValueError, which says what to do, when the model runs.

    Calling it again replaces the earlier pruning. `tokenprune.remove_pruning(model)` undoes it
    (on the processors patched with it too). When nothing can be pruned (every token kept),
    nothing changes (with a warning). Returns `model`.
    """
    config = image_token_config(k_anchors, top_m, alpha, score_norm, backend, selection,
                                mmr_lambda, ratio)
    pruning, inner = family_of(model)
    if layer is not None and not pruning.layer_inside_tower:
        raise ValueError(f"layer={layer!r} is for the Qwen-VL models; {pruning.without_layer}")
    state = pruning.prepare(model, inner, processor, config, ratio, layer)
    if isinstance(state, str):  # nothing to prune: why
        warnings.warn(f"{state}: nothing to prune, the model is unchanged", stacklevel=2)
        remove_image_token_pruning(model)
        if processor is not None:
            remove_image_token_pruning(processor)
        return model
    state.attach(processor)
    return model
