"""Fewer image tokens for a vision-language model on Hugging Face transformers: the public
`prune_image_tokens` (its arguments checked here once), which hands Qwen2-VL, Qwen2.5-VL and
Qwen3-VL models to tokenprune.qwen_vl, and the LLaVA pruning (SPEC.md, "Image tokens for a
language model").

For LLaVA, three forward pre-hooks, nothing else in the model changes:
- on the LlavaModel: prompts written for the unpruned count of placeholders (an unpatched
  processor) are refused in one line that says what to do, before transformers compares the
  counts (for a forward call, before the images are encoded; generate encodes them first);
- on the vision block whose output is the selected hidden state: SPEC's selection from that
  block's input and its own q/k (the tower's block adapter computes them; the block itself then
  runs as usual, on all tokens, with the model's attention implementation);
- on the multi-modal projector: its input, the selected hidden state(s) that LLaVA has already
  cut and concatenated, becomes the kept rows, in ascending patch order.
The language model therefore sees `k + m` image tokens per image; the processor, patched with
the same call, writes that many placeholders.
"""
import warnings
from typing import Any, Optional

import torch

from .config import IMAGE_TOKEN_SELECTION, MMR_LAMBDA, image_token_config
from .qwen_vl import QwenImageTokenPruning, kept_count, prune_qwen, qwen_model
from .selection import kept_rows, select_tokens
from .towers import UnsupportedModelError, block_adapter, find_tower

__all__ = ["ImageTokenPruning", "prune_image_tokens"]

SUPPORTED = ("Qwen2VL, Qwen2_5_VL and Qwen3VL ForConditionalGeneration (and their *Model), and "
             "LlavaForConditionalGeneration (and its LlavaModel) with a CLIP or SigLIP vision "
             "tower (transformers CLIPVisionModel / SiglipVisionModel), one image per <image>")
# Models that look close but are not handled yet, and why.
NOT_YET = {
    "LlavaNext": "LLaVA-NeXT's any-resolution tiles",
    "LlavaOnevision": "LLaVA-OneVision's any-resolution tiles and video",
    "Video": "video models",
    "InternVL": "InternVL's tiles",
}
# Where the state of a pruned model or processor is kept (a plain attribute).
ATTRIBUTE = "_tokenprune_image_tokens"


def _refuse(model):
    name = type(model).__name__
    why = next((what for key, what in NOT_YET.items() if key in name), None)
    because = f" ({why} are not supported yet)" if why else ""
    return UnsupportedModelError(f"tokenprune.prune_image_tokens cannot prune {name}{because}; "
                                 f"it supports {SUPPORTED}")


def _llava(model):
    """The LlavaModel of `model`, or UnsupportedModelError."""
    if not type(model).__module__.startswith("transformers."):
        raise _refuse(model)
    from transformers import LlavaForConditionalGeneration, LlavaModel
    if type(model) is LlavaForConditionalGeneration:
        return model.model
    if type(model) is LlavaModel:
        return model
    raise _refuse(model)


def _feature_block(config, depth):
    """The index of the vision block where the selection is made: the block whose output is
    the deepest hidden state that `vision_feature_layer` lists (hidden state i is the output of
    block i - 1; hidden state 0 is the embeddings)."""
    layers = config.vision_feature_layer
    listed = [layers] if isinstance(layers, int) else list(layers)
    count = depth + 1  # hidden_states: the embeddings, then each block's output
    for layer in listed:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(f"vision_feature_layer must be an index into the vision tower's "
                             f"{count} hidden states, in [{-count}, {count - 1}], got {layers!r}")
    deepest = max(layer % count for layer in listed)
    if deepest == 0:
        raise ValueError(f"vision_feature_layer {layers!r} selects only hidden state 0, the "
                         f"embeddings, which no block outputs: tokenprune selects tokens at the "
                         f"block whose output LLaVA uses, so it needs a layer in [1, {depth}] "
                         f"(or [{-depth}, -1])")
    return deepest - 1


class ImageTokenPruning:
    """The pruning of one LLaVA model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: the kept patch indices of the
    last image batch, (images, k + m) int64, ascending, indices into the tower's T tokens
    (row 0 is CLIP's class token, so they are >= 1 there; and >= 1 for a SigLIP tower under
    "default", whose row 0 LLaVA drops); None before the first image and when nothing is pruned.
    `image_seq_length`: image tokens the language model receives per image. `config`: the
    ImageTokenConfig of the call; `selection_config`: the PruneConfig that selects, with the
    anchors and further patches that every image gets (the same count for every image).
    """

    def __init__(self, model, config, selection_config, block_index, num_prefix, class_token,
                 strategy, num_tokens, image_seq_length):
        self.model = model
        self.config = config
        self.selection_config = selection_config
        self.block_index = block_index
        self.num_prefix = num_prefix
        self.class_token = class_token
        self.strategy = strategy
        self.num_tokens = num_tokens
        self.image_seq_length = image_seq_length
        self.original_image_seq_length = model.config.image_seq_length
        self.last_keep_idx = None
        self.adapter = None  # the feature block's adapter, once installed
        self.processors = []
        self._handles = []

    @property
    def prunes(self):
        return self.selection_config.kept_patches < self.num_tokens - self.num_prefix

    def check_placeholders(self, llava, args, kwargs):
        """Forward pre-hook of the LlavaModel: the prompts hold `image_seq_length` image tokens
        per image, else say what to do now, instead of transformers' count mismatch later."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        # generate encodes the images first and passes their features (one entry per image).
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is not None:
            images = pixel_values.shape[0]
        elif encoded is not None:
            images = len(encoded.pooler_output)
        else:
            return  # a decoding step: no images to place
        if input_ids is None:
            return  # embeddings given: transformers checks the count
        written = int((input_ids == self.model.config.image_token_id).sum())
        if written == images * self.image_seq_length:
            return
        unpatched = (" (the unpruned count: was the processor patched?)"
                     if written == images * self.original_image_seq_length else "")
        raise ValueError(f"the prompts hold {written} image tokens for {images} images, "
                         f"{written / images:g} per image{unpatched}, but the pruned model gives "
                         f"{self.image_seq_length} per image: pass the processor to "
                         f"prune_image_tokens(model, processor, ...), or write "
                         f"pruned_block(model).image_seq_length = {self.image_seq_length} image "
                         f"tokens per image")

    def select(self, block, args, kwargs):
        """Forward pre-hook of the feature block: SPEC's selection from its input and q/k."""
        adapter = self.adapter
        x, call = adapter.tokens(*args, **kwargs)
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"the vision tower got {x.shape[1]} tokens per image, but "
                             f"prune_image_tokens was set up for {self.num_tokens} (the "
                             f"configured image size); interpolated positions are not supported")
        with torch.no_grad():
            qkv = adapter.qkv(x, call)
            self.last_keep_idx = select_tokens(x, qkv, adapter.num_heads, self.selection_config,
                                               self.num_prefix, self.class_token, adapter.scale)

    def gather(self, projector, args):
        """Forward pre-hook of the projector: its input becomes the kept rows."""
        features = args[0]
        keep = self.last_keep_idx
        if keep is None:
            raise RuntimeError("the multi-modal projector ran before the vision tower's feature "
                               "block: tokenprune cannot tell which image tokens to keep")
        if self.strategy == "default":
            expected, rows = self.num_tokens - 1, keep - 1  # LLaVA has dropped row 0
        else:
            expected, rows = self.num_tokens, kept_rows(keep, self.num_prefix)
        if features.shape[:2] != (keep.shape[0], expected):
            raise ValueError(f"the projector got image features of shape {tuple(features.shape)}, "
                             f"expected ({keep.shape[0]}, {expected}, ...) for "
                             f"vision_feature_select_strategy={self.strategy!r}: set "
                             f"vision_feature_layer and vision_feature_select_strategy in the "
                             f"model's config before prune_image_tokens, not per call")
        kept = features.gather(1, rows[..., None].expand(-1, -1, features.shape[-1]))
        return (kept, *args[1:])

    def install(self, llava, blocks, projector):
        self.adapter = block_adapter(blocks[self.block_index])
        # Bound methods, so that copy.deepcopy of the model gives the copy's hooks its own state.
        self._handles = [
            llava.register_forward_pre_hook(self.check_placeholders, with_kwargs=True),
            blocks[self.block_index].register_forward_pre_hook(self.select, with_kwargs=True),
            projector.register_forward_pre_hook(self.gather),
        ]
        self.model.config.image_seq_length = self.image_seq_length

    def patch_processor(self, processor):
        remove_image_token_pruning(processor)
        setattr(processor, ATTRIBUTE, PlaceholderCount(processor, self.image_seq_length))
        processor.replace_image_token = getattr(processor, ATTRIBUTE).replace_image_token
        processor._get_num_multimodal_tokens = getattr(processor, ATTRIBUTE).num_multimodal_tokens
        self.processors.append(processor)

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.model.config.image_seq_length = self.original_image_seq_length
        for processor in self.processors:
            if getattr(processor, ATTRIBUTE, None) is not None:
                remove_image_token_pruning(processor)
        self.processors = []


class PlaceholderCount:
    """A patched LlavaProcessor's placeholder count: `count` <image> tokens per image, whatever
    its size (LlavaProcessor's own count is patches per side squared, +1 for a class token,
    -1 under "default")."""

    def __init__(self, processor, count):
        self.count = count
        self.image_token = processor.image_token
        # The processor's own method, bound; its class attribute is what comes back on removal.
        self.original_num_multimodal_tokens = processor._get_num_multimodal_tokens

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        return self.image_token * self.count

    def num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = self.original_num_multimodal_tokens(image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.count] * len(image_sizes)  # a MultiModalData
        return data


def _check_processor(processor):
    from transformers import LlavaProcessor
    if type(processor) is not LlavaProcessor:
        raise UnsupportedModelError(f"prune_image_tokens can patch a LlavaProcessor, got "
                                    f"{type(processor).__name__}")


def image_token_pruning(obj) -> Optional[ImageTokenPruning]:
    """The ImageTokenPruning of a model patched by prune_image_tokens, else None."""
    state = getattr(obj, ATTRIBUTE, None)
    return state if isinstance(state, (ImageTokenPruning, QwenImageTokenPruning)) else None


def remove_image_token_pruning(obj) -> bool:
    """Undo prune_image_tokens on a model (and the processors patched with it) or on one
    processor; False when `obj` was not patched."""
    state = getattr(obj, ATTRIBUTE, None)
    if state is None:
        return False
    if isinstance(state, (ImageTokenPruning, QwenImageTokenPruning)):
        state.remove()
    else:  # a processor: back to its class's methods
        for name in ("replace_image_token", "_get_num_multimodal_tokens"):
            obj.__dict__.pop(name, None)
    delattr(obj, ATTRIBUTE)
    return True


def prune_image_tokens(model: Any, processor: Any = None, k_anchors: int = 10,
                       top_m: Optional[int] = None, alpha: float = 0.5, score_norm: str = "none",
                       backend: str = "auto", selection: str = IMAGE_TOKEN_SELECTION,
                       mmr_lambda: float = MMR_LAMBDA, ratio: Optional[float] = None,
                       layer: Optional[int] = None) -> Any:
    """Make a vision-language model's language model receive fewer image tokens per image.

    `model`: a transformers Qwen2VL-, Qwen2_5_VL- or Qwen3VLForConditionalGeneration (or its
    *Model), or a LlavaForConditionalGeneration (or LlavaModel) whose vision tower is a
    CLIPVisionModel or SiglipVisionModel. Other models raise UnsupportedModelError.

    How many: `ratio=None` keeps `k_anchors + top_m` per image (`top_m` is 54 when not given;
    at most all of them); `ratio` in (0, 1] keeps ceil(ratio * n) of an image's n tokens (a
    product within 1e-6 of an integer counts as that integer); an explicit `top_m` with `ratio`
    is refused. The first min(k_anchors, kept) are anchors, the rest are kept by `selection`
    ("mmr" by default, with `mmr_lambda`; "cls", "score" with `alpha` and `score_norm`, or
    "random"; PruneConfig has their meaning, SPEC.md the definitions).

    Qwen-VL (SPEC.md, "Image tokens for Qwen2-VL, ..."): the unit is the merged token; the
    selection is made at the vision tower's last block per image; every kept token keeps its
    unpruned 3D position; video passes through whole. `pruned_block(model).last_keep_idx` is a
    list of one tensor per image of the kept unit indices. `layer=L` (Qwen-VL only; SPEC.md,
    "Pruning inside the Qwen vision tower") makes the selection at vision block L instead
    (negative counts from the end; Qwen2.5-VL: one of `fullatt_block_indexes`), and block L and
    every later block run on the kept units' patches only, so that the tower costs less too.

    LLaVA: the selection is made at the vision block whose output is
    `config.vision_feature_layer` (the deepest one of a list; a layer that is only the
    embeddings is refused), from that block's input and its own q/k; the language model
    receives the kept rows of that layer's ordinary output, in patch order, through the
    projector. With `vision_feature_select_strategy="full"` the class token's row comes first.
    `config.image_seq_length` is set to the new count per image. Set `vision_feature_layer` /
    `vision_feature_select_strategy` in the model's config before this call.
    `pruned_block(model).last_keep_idx` is (images, kept) there.

    `processor`: the model's processor (LlavaProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor,
    Qwen3VLProcessor) to patch as well, so that it writes the kept number of placeholders per
    image (pass it later with the same call to patch it then). For LLaVA, prompts with another
    count of image tokens per image (an unpatched processor's) raise ValueError, which says
    what to do, when the model runs.

    Calling it again replaces the earlier pruning. `tokenprune.remove_pruning(model)` undoes it
    (on the processors patched with it too). When nothing can be pruned (every token kept),
    nothing changes (with a warning). Returns `model`.
    """
    config = image_token_config(k_anchors, top_m, alpha, score_norm, backend, selection,
                                mmr_lambda, ratio)
    inner = qwen_model(model)
    if inner is not None:
        if prune_qwen(model, inner, processor, config, ratio, layer) is None:
            warnings.warn("ratio=1: every image token is kept, nothing to prune: the model is "
                          "unchanged", stacklevel=2)
            if processor is not None:
                remove_image_token_pruning(processor)
        return model
    llava = _llava(model)
    if layer is not None:
        raise ValueError(f"layer={layer!r} is for the Qwen-VL models; a LLaVA model is pruned at "
                         f"the block of its config.vision_feature_layer: leave layer None")
    try:
        tower = find_tower(llava.vision_tower)
    except UnsupportedModelError:
        raise UnsupportedModelError(f"tokenprune.prune_image_tokens cannot prune a LLaVA model "
                                    f"with a {type(llava.vision_tower).__name__} vision tower; "
                                    f"it supports {SUPPORTED}") from None
    strategy = model.config.vision_feature_select_strategy
    block_index = _feature_block(model.config, len(tower.blocks))
    block_adapter(tower.blocks[block_index])  # refuses a block type it cannot read q/k from
    if processor is not None:
        _check_processor(processor)
    # "default" drops row 0: a class token, or for SigLIP a patch that then is never chosen.
    num_prefix = 1 if tower.class_token or strategy == "default" else 0
    num_tokens = tower.num_patches + tower.num_prefix
    candidates = num_tokens - num_prefix
    # Every image has the same candidates, so one count (and one PruneConfig) holds for all:
    # the count an image of `candidates` units keeps.
    selection_config = config.selection_config(kept_count(candidates, config.kept_patches, ratio))
    kept = selection_config.kept_patches + (0 if strategy == "default" else num_prefix)

    remove_image_token_pruning(model)
    state = ImageTokenPruning(model, config, selection_config, block_index, num_prefix,
                              tower.class_token, strategy, num_tokens, kept)
    if not state.prunes:
        how = (f"k_anchors + top_m = {config.kept_patches} >=" if ratio is None
               else f"ratio={ratio} keeps all")
        warnings.warn(f"{how} {candidates} patch tokens: nothing to prune, the model is "
                      f"unchanged", stacklevel=2)
        if processor is not None:
            remove_image_token_pruning(processor)
        return model
    state.install(llava, tower.blocks, llava.multi_modal_projector)
    setattr(model, ATTRIBUTE, state)
    if processor is not None:
        state.patch_processor(processor)
    return model
