"""LLaVA-1.5 (SPEC.md, "Image tokens for a language model"): fewer image tokens through three
forward pre-hooks, nothing else in the model changes:
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
import torch

from ..selection import kept_rows, select_tokens
from ..towers import UnsupportedModelError, block_adapter
from .base import ImageTokenPruning, all_kept, check_placeholder_count
from .units import kept_count


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


class LlavaImageTokenPruning(ImageTokenPruning):
    """The pruning of one LLaVA model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: the kept patch indices of the
    last image batch, (images, k + m) int64, ascending, indices into the tower's T tokens
    (row 0 is CLIP's class token, so they are >= 1 there; and >= 1 for a SigLIP tower under
    "default", whose row 0 LLaVA drops); None before the first image and when nothing is pruned.
    `image_seq_length`: image tokens the language model receives per image. `config`: the
    ImageTokenConfig of the call; `selection_config`: the PruneConfig that selects, with the
    anchors and further patches that every image gets (the same count for every image).
    """

    model_type = "llava"
    name = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    processor_classes = ("LlavaProcessor",)
    without_layer = ("a LLaVA model is pruned at the block of its config.vision_feature_layer: "
                     "leave layer None")

    def __init__(self, model, inner, config, ratio, selection_config, tower, block_index,
                 num_prefix, strategy, num_tokens, image_seq_length):
        super().__init__(model, inner, config, ratio)
        self.selection_config = selection_config
        self.tower = tower
        self.class_token = tower.class_token
        self.block_index = block_index
        self.num_prefix = num_prefix
        self.strategy = strategy
        self.num_tokens = num_tokens
        self.image_seq_length = image_seq_length
        self.original_image_seq_length = None  # the model's own, read when installed
        self.adapter = None  # the feature block's adapter, once installed

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
        check_placeholder_count(written, images, self.image_seq_length,
                                self.original_image_seq_length,
                                f"pass the processor to prune_image_tokens(model, processor, "
                                f"...), or write pruned_block(model).image_seq_length = "
                                f"{self.image_seq_length} image tokens per image")

    def block_input(self, args, kwargs):
        """(x, qkv) of the feature block's call: its input (images, T, C) and the q/k/v its
        attention computes from it (the tower's block adapter), without gradients."""
        adapter = self.adapter
        x, call = adapter.tokens(*args, **kwargs)
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"the vision tower got {x.shape[1]} tokens per image, but "
                             f"prune_image_tokens was set up for {self.num_tokens} (the "
                             f"configured image size); interpolated positions are not supported")
        with torch.no_grad():
            return x, adapter.qkv(x, call)

    def select(self, block, args, kwargs):
        """Forward pre-hook of the feature block: SPEC's selection from its input and q/k."""
        x, qkv = self.block_input(args, kwargs)
        with torch.no_grad():
            self.last_keep_idx = select_tokens(x, qkv, self.adapter.num_heads,
                                               self.selection_config, self.num_prefix,
                                               self.class_token, self.adapter.scale)

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

    def install_hooks(self):
        blocks = self.tower.blocks
        self.adapter = block_adapter(blocks[self.block_index])
        self.hook(self.inner, self.check_placeholders, with_kwargs=True)
        self.hook(blocks[self.block_index], self.select, with_kwargs=True)
        self.hook(self.inner.multi_modal_projector, self.gather)
        # Read here, after attach removed an earlier pruning, which puts the model's own back.
        self.original_image_seq_length = self.model.config.image_seq_length
        self.model.config.image_seq_length = self.image_seq_length

    def restore(self):
        self.model.config.image_seq_length = self.original_image_seq_length

    def placeholder_count(self, processor):
        return PlaceholderCount(processor, self.image_seq_length)

    def check_processor(self, processor):
        if type(processor).__name__ not in self.processor_classes:
            raise UnsupportedModelError(f"prune_image_tokens can patch a "
                                        f"{' or '.join(self.processor_classes)}, got "
                                        f"{type(processor).__name__}")

    @classmethod
    def feature_block(cls, model, inner):
        """(tower, strategy, block index, num_prefix, num_tokens): the vision tower, its
        vision_feature_select_strategy, the block where the selection is made, the leading rows
        that are never candidates and the tokens per tower image; refuses a tower or block it
        cannot read q/k from."""
        tower = cls.vision_tower(inner, "a CLIP or SigLIP one")
        strategy = model.config.vision_feature_select_strategy
        block_index = _feature_block(model.config, len(tower.blocks))
        block_adapter(tower.blocks[block_index])  # refuses a block type it cannot read q/k from
        # "default" drops row 0: a class token, or for SigLIP a patch that then is never chosen.
        num_prefix = 1 if tower.class_token or strategy == "default" else 0
        return tower, strategy, block_index, num_prefix, tower.num_patches + tower.num_prefix

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        tower, strategy, block_index, num_prefix, num_tokens = cls.feature_block(model, inner)
        candidates = num_tokens - num_prefix
        # Every image has the same candidates, so one count (and one PruneConfig) holds for all:
        # the count an image of `candidates` units keeps.
        selection_config = config.selection_config(
            kept_count(candidates, config.kept_patches, ratio))
        kept = selection_config.kept_patches + (0 if strategy == "default" else num_prefix)
        state = cls(model, inner, config, ratio, selection_config, tower, block_index,
                    num_prefix, strategy, num_tokens, kept)
        if processor is not None:
            state.check_processor(processor)
        if not state.prunes:
            return all_kept(config, ratio, candidates, "patch tokens")
        return state


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
