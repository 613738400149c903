"""Gemma 3 (SPEC.md, "Image tokens for Gemma 3"): fewer image tokens per image (and per
pan-and-scan crop, which Gemma 3 feeds as one more image), each kept token at its unpruned
position.

Gemma 3 encodes every image at one size with a SigLIP tower (no class token), average-pools each
k x k group of patches into one language-model token (the projector: 4096 patches into 256
tokens), and lets the image tokens of one image attend to each other both ways (token_type_ids);
its language model takes 1D rotary positions. The unit is one pooled token.

Nothing in the model's modules changes. On the one model object:
- a forward pre-hook on the tower's last block makes the selection from its input and q/k while
  `get_image_features` runs (an instance attribute wrapping the class's), which then keeps the
  kept units' rows of the projector's output, in ascending unit order;
- the kept units travel with those features (KEPT_UNITS): a forward pre-hook on the *Model (which
  runs the tower itself when pixel_values are given, so that forward and generate take one path)
  makes one PromptImages per call from them and the prompt's placeholders;
- a forward pre-hook on the language model adds to every position the image tokens dropped
  before it (and to a kept image token its own offset in its image), so that each token sits at
  its unpruned position; a forward hook writes each row's total onto the cache, from which the
  decoding steps of `generate` continue.
The attention mask needs nothing: the processor, patched with the same call, writes the kept
count of placeholders and their token_type_ids, from which Gemma 3 builds its mask as usual.
"""
import torch

from ..selection import select_units
from ..towers import UnsupportedModelError, block_adapter
from .base import CALL, ImageTokenPruning, all_kept, check_placeholder_count
from .llava import PlaceholderCount

# The attribute of an image-features output that holds (its rows, their kept units).
KEPT_UNITS = "tokenprune_kept_units"
# The attribute of a cache that holds, per row, the positions to add to the tokens after the
# prompt: the image tokens the prompts in it dropped.
SHIFT = "tokenprune_position_shift"


class Gemma3ImageTokenPruning(ImageTokenPruning):
    """The pruning of one Gemma 3 model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: the kept units of the last image
    batch, (images, kept) int64, ascending, indices into the `units` pooled tokens of an image in
    the projector's order (row-major over the pooled grid); None before the first image.
    `units`: image tokens per image unpruned (mm_tokens_per_image); `image_seq_length`: kept
    ones, the same for every image and crop.
    """

    model_type = "gemma3"
    name = "Gemma 3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    processor_classes = ("Gemma3Processor",)
    without_layer = ("a Gemma 3 model is pruned at its vision tower's last block: leave layer "
                     "None")

    def __init__(self, model, inner, config, ratio, tower, pool):
        super().__init__(model, inner, config, ratio)
        self.tower = tower
        self.pool = pool                     # patches per unit side (the projector's kernel)
        side = tower.grid_size[0] // pool    # units per side
        self.units = side * side
        self.image_seq_length = self.kept(self.units)
        self.order = unit_order(tower.grid_size[0], pool)
        self.image_token_id = model.config.image_token_id
        self._generator = torch.Generator().manual_seed(config.seed)
        self._encoding = False  # whether get_image_features is running the tower
        self._keep = None       # the kept units of the images it runs, set by select

    # --- the vision side -------------------------------------------------------------------

    def select(self, block, args, kwargs):
        """Forward pre-hook of the tower's last block: SPEC's unit selection per image."""
        if not self._encoding:
            return
        adapter = block_adapter(block)
        x, call = adapter.tokens(*args, **kwargs)
        patches = len(self.order)
        if x.shape[1] != patches:
            raise ValueError(f"the vision tower got {x.shape[1]} patches per image, but "
                             f"prune_image_tokens was set up for {patches} (the configured "
                             f"image size); interpolated positions are not supported")
        pool2 = self.pool * self.pool
        order = self.order.to(x.device)
        with torch.no_grad():
            qkv = adapter.qkv(x, call)
            B, N, C = x.shape
            q, k = (qkv[..., i * C:(i + 1) * C].reshape(B, N, adapter.num_heads, -1)[:, order]
                    for i in (0, 1))
            # A unit's feature: the mean of its patches' rows, as the projector's pool takes it.
            features = x[:, order].reshape(B, self.units, pool2, C).mean(dim=2)
            self._keep = torch.stack([
                select_units(features[b], q[b], k[b], None, adapter.scale, pool2,
                             self.image_seq_length, self.config, self._generator)
                for b in range(B)])

    def get_image_features(self, original, pixel_values, **kwargs):
        self._encoding, self._keep = True, None
        try:
            output = original(pixel_values, **kwargs)
        finally:
            self._encoding = False
        keep, self._keep = self._keep, None
        if keep is None:
            raise RuntimeError("the vision tower's last block did not run: tokenprune cannot "
                               "tell which image tokens to keep")
        rows = output.pooler_output
        output.pooler_output = rows.gather(1, keep.to(rows.device)[..., None].expand(
            -1, -1, rows.shape[-1]))
        setattr(output, KEPT_UNITS, (output.pooler_output, keep))
        self.last_keep_idx = keep
        return output

    # --- the positions ---------------------------------------------------------------------

    def begin_call(self, inner, args, kwargs):
        """Forward pre-hook of the *Model: with images, their features (the tower runs here when
        pixel_values are given), the prompt's positions when none were given (generate's rule),
        and the PromptImages the language model's hook places."""
        found = self.images_of_call(args, kwargs)
        if found is None:
            return None
        kwargs, images = found
        input_ids = kwargs["input_ids"]
        keep = kept_units(images, input_ids, self.image_token_id, self.image_seq_length)
        slots = input_ids == self.image_token_id
        check_placeholder_count(int(slots.sum()), len(keep), self.image_seq_length, self.units,
                                "pass the processor to prune_image_tokens(model, processor, ...) "
                                "so that it writes the pruned count")
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = prompt_positions(input_ids, kwargs.get("attention_mask"),
                                                      cache_of(kwargs))
        CALL.set(PromptImages(self, slots, keep))
        return (), kwargs

    def encode_images(self, kwargs):
        return self.inner.get_image_features(kwargs["pixel_values"], return_dict=True)

    def place_tokens(self, language_model, args, kwargs):
        """Forward pre-hook of the language model: each token's position plus the image tokens
        dropped before it (from this call's images, and from the prompt a cache holds)."""
        call = self.this_call()
        cache = cache_of(kwargs)
        before = getattr(cache, SHIFT, None)
        if call is None and before is None:
            return None
        embeds = kwargs["inputs_embeds"]
        B, L = embeds.shape[:2]
        positions = kwargs.get("position_ids")
        if positions is None:  # the language model's own default
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + L, device=embeds.device)[None]
        shift = torch.zeros(B, L, dtype=positions.dtype, device=positions.device)
        if before is not None:
            shift += before.to(shift.device)[:, None]
        if call is not None:
            within, dropped = self.dropped_before(call, L, shift.device)
            shift += within
            call.total = (0 if before is None else before.to(shift.device)) + dropped
        return args, {**kwargs, "position_ids": positions + shift}

    def dropped_before(self, call, length, device):
        """(shift (B, L), total (B,)): per token of the call's prompt, the image tokens its
        images dropped before it, plus for a kept image token its unit index minus its rank
        among its image's kept tokens; per row, all the image tokens its images dropped."""
        B = call.slots.shape[0]
        images, count = call.keep.shape
        flat = call.slots.reshape(-1).nonzero().squeeze(1).to(device).view(images, count)
        shift = torch.zeros(B * length, dtype=torch.long, device=device)
        shift[flat.reshape(-1)] = (call.keep.to(device)
                                   - torch.arange(count, device=device)).reshape(-1)
        # After each image's last kept token, its units - count dropped ones for the rest of
        # the row: a step at the next column, summed along the row.
        last = flat[:, -1]
        steps = torch.zeros(B, length + 1, dtype=torch.long, device=device)
        steps.index_put_((last // length, last % length + 1),
                         torch.full((images,), self.units - count, device=device),
                         accumulate=True)
        shift = shift.view(B, length) + steps.cumsum(dim=1)[:, :length]
        return shift, steps.sum(dim=1)

    def keep_shift(self, language_model, args, kwargs, output):
        """Forward hook of the language model: the rows' totals onto the cache it returns, for
        the decoding steps after this call."""
        call = self.this_call()
        if call is None or call.total is None:
            return
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)  # transformers 5.19
        if cache is not None:
            setattr(cache, SHIFT, call.total)

    # --- install and undo -------------------------------------------------------------------

    def install_hooks(self):
        inner = self.inner
        self.wrap_method("get_image_features")
        self.hook(inner, self.begin_call, with_kwargs=True)
        self.hook(inner, self.end_call, post=True, with_kwargs=True, always_call=True)
        self.hook(inner.language_model, self.place_tokens, with_kwargs=True)
        self.hook(inner.language_model, self.keep_shift, post=True, with_kwargs=True)
        self.hook(self.tower.blocks[-1], self.select, with_kwargs=True)

    def placeholder_count(self, processor):
        return Gemma3PlaceholderCount(processor, self.image_seq_length)

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        tower = cls.vision_tower(inner, "a SigLIP one")
        block_adapter(tower.blocks[-1])  # refuses a block type it cannot read q/k from
        grid = tower.grid_size[0]
        side = round(model.config.mm_tokens_per_image ** 0.5)
        if side * side != model.config.mm_tokens_per_image or grid % side:
            raise UnsupportedModelError(f"tokenprune.prune_image_tokens needs Gemma 3's image "
                                        f"tokens to pool a square grid of patches: "
                                        f"mm_tokens_per_image={model.config.mm_tokens_per_image} "
                                        f"does not tile the tower's {grid} x {grid} patches")
        state = cls(model, inner, config, ratio, tower, grid // side)
        if processor is not None:
            state.check_processor(processor)
        if state.image_seq_length == state.units:
            return all_kept(config, ratio, state.units, "image tokens per image")
        return state


def unit_order(grid, pool):
    """(grid^2,) int64: the patches in unit order, unit by unit in the projector's order (the
    pooled grid row-major), each unit's pool x pool patches row-major."""
    side = grid // pool
    patch = torch.arange(grid * grid).view(side, pool, side, pool)  # (unit row, i, unit col, j)
    return patch.permute(0, 2, 1, 3).reshape(-1)


def cache_of(kwargs):
    """The cache among a forward's keyword arguments (`past_key_values` in transformers 5.19),
    or None."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def prompt_positions(input_ids, attention_mask, cache):
    """The positions of a prompt given none, as generate computes them: the real tokens counted
    (attention_mask's cumsum, 0 on padding), else the columns after the cache's tokens."""
    length = input_ids.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.long()
        return (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)[:, -length:]
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + length, device=input_ids.device)[None].expand(
        input_ids.shape[0], -1)


def kept_units(features, input_ids, image_token_id, count):
    """(images, count) the kept units of an image-features output that the pruned tower made, in
    the order of its rows; generate's copies for num_return_sequences or beams (each prompt's
    images repeated as a group, the prompts repeated in place) get their images' units. A
    ValueError for features made elsewhere."""
    made = getattr(features, KEPT_UNITS, None)
    if made is None:
        raise ValueError("the image features given (mm_encoder_outputs) did not come from the "
                         "pruned model's own tower, so tokenprune cannot tell which units they "
                         "keep: pass pixel_values instead")
    rows, keep = made
    now = features.pooler_output
    if now is rows:
        return keep
    images, copies = len(rows), len(now) // max(len(rows), 1)
    index = []
    if copies and len(now) == copies * images and input_ids.shape[0] % copies == 0:
        per_prompt = ((input_ids == image_token_id).sum(dim=1) // count)[::copies].tolist()
        start = 0
        for n in per_prompt:
            index += list(range(start, start + n)) * copies
            start += n
    index = torch.tensor(index, dtype=torch.long)
    if len(index) != len(now) or not torch.equal(rows[index.to(rows.device)], now):
        raise ValueError("the image features given (mm_encoder_outputs) were split or rebuilt "
                         "after the pruned tower made them (as a chunked prefill does), so "
                         "tokenprune cannot tell which units they keep")
    return keep[index.to(keep.device)]


class PromptImages:
    """One *Model call's images: `owner` the Gemma3ImageTokenPruning whose model runs; `slots`
    (B, L) bool, where the prompt's image placeholders are; `keep` (images, kept) each image's
    kept units, in the order of the slots; `total` (B,) once the language model's hook has run,
    the image tokens each row dropped (with those of the prompt its cache holds)."""

    def __init__(self, owner, slots, keep):
        self.owner = owner
        self.slots = slots
        self.keep = keep
        self.total = None


class Gemma3PlaceholderCount(PlaceholderCount):
    """A patched Gemma3Processor's placeholder count: `count` image tokens between
    <start_of_image> and <end_of_image> for every image and every pan-and-scan crop (the
    processor's own text around them unchanged)."""

    def __init__(self, processor, count):
        super().__init__(processor, count)
        image = processor.tokenizer.image_token
        self.full = processor.full_image_sequence
        self.pruned = self.full.replace(image * processor.image_seq_length, image * count)
        self.original_replace_image_token = processor.replace_image_token

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        text = self.original_replace_image_token(image_inputs, image_idx, **kwargs)
        return text.replace(self.full, self.pruned)
