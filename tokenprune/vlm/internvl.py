"""InternVL (SPEC.md, "Image tokens for InternVL"): transformers' own
InternVLForConditionalGeneration. Its processor cuts an image into tiles (and a thumbnail when
more than one); the vision tower encodes every tile on its own, with a class token; the pixel
shuffle turns each 2 x 2 group of a tile's patches (a unit) into one language-model token.

Nothing in the model's modules changes. On the one model object:
- `get_image_features` (an instance attribute wrapping the class's) takes each image's tile
  count (`image_num_patches`, which the patched processor adds to its output), plans how many
  units every tile keeps, and runs the tower; a forward pre-hook on the vision block whose
  output is `vision_feature_layer` makes the selection per tile from that block's input and its
  own q/k while it runs; the wrapper then keeps each image's kept rows of the projector's
  output, one tensor per image, paired with the image's unit count and kept units (KEPT_UNITS).
- `generate` (on the *ForConditionalGeneration, wrapping the class's) encodes the images itself
  with the tile counts, as generate would before its prefill, and hands the features on as
  `mm_encoder_outputs`.
- A forward pre-hook on the *Model takes the tile counts out of the call, runs the tower when
  pixel_values are given, and makes one ImageCall from the kept units and the prompt: how far
  each token of the pruned prompt is from its unpruned position. A forward pre-hook on the
  language model adds that to the position ids, and a forward hook on it leaves each sample's
  total on the cache, for the decoding steps after the prefill.
"""
import copy
import dataclasses
import inspect
from contextvars import ContextVar
from numbers import Integral

import torch

from ..selection import select_units
from ..towers import UnsupportedModelError
from .base import KEPT_UNITS, ImageTokenPruning, Wrapped, attach_per_image, kept_units

# The key the patched processor adds to its output: each image's tile count, thumbnail included.
TILES = "image_num_patches"
# The attribute of a language model's cache that holds, per sample, how many image rows its
# prompt dropped: a decoding step's position is the pruned one plus that.
SHIFT = "_tokenprune_position_shift"
# The TowerRun of the get_image_features call under way, and the ImageCall of the *Model call
# under way, in this thread or task (each says whose: a deep copy has a state of its own).
TOWER = ContextVar("tokenprune_internvl_tower", default=None)
CALL = ContextVar("tokenprune_internvl_call", default=None)


def shuffle_order(side):
    """(side * side,) int64: the patches of a side x side tile in unit order. Unit u = (r, c), in
    raster order over the (side / 2) x (side / 2) units, holds the patches (2r, 2c), (2r, 2c + 1),
    (2r + 1, 2c), (2r + 1, 2c + 1) (raster indices into the tile), in the order the pixel shuffle
    lays them side by side in the unit's row."""
    half = torch.arange(side // 2)
    corner = (2 * half[:, None] * side + 2 * half[None, :]).reshape(-1)
    return (corner[:, None] + torch.tensor([0, 1, side, side + 1])).reshape(-1)


def tile_shares(total, tiles):
    """`total` spread over an image's tiles: equal shares, the remainder one each to the
    thumbnail (the last tile, when there are several) first, then to the tiles in order."""
    base, extra = divmod(total, tiles)
    shares = [base] * tiles
    for tile in ([tiles - 1] + list(range(tiles - 1)) if tiles > 1 else [0])[:extra]:
        shares[tile] += 1
    return shares


class InternVLImageTokenPruning(ImageTokenPruning):
    """The pruning of one InternVL model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: one 1-D int64 tensor per image
    of the last image batch, the kept unit indices ascending, numbered over the image's tiles in
    their order (unit v of tile j is j * units_per_tile + v); None before the first image.
    `kept(n)`: the units an image of n units keeps; `tile_plan(tiles)`: (kept, anchors) per tile.
    `block_index`: the vision block where the selection is made.
    """

    model_type = "internvl"
    name = "InternVL"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    processor_classes = ("InternVLProcessor",)
    without_layer = ("an InternVL model is pruned at the vision block of its "
                     "config.vision_feature_layer: leave layer None")

    def __init__(self, model, inner, config, ratio, block_index, units_per_tile):
        super().__init__(model, inner, config, ratio)
        self.block_index = block_index
        self.units_per_tile = units_per_tile
        self.image_token_id = inner.config.image_token_id
        self._generator = torch.Generator().manual_seed(config.seed)
        self._configs = {}  # anchors -> the config a tile with that many anchors selects with

    # --- how many ---------------------------------------------------------------------------

    def tile_plan(self, tiles):
        """(kept, anchors) for each tile of an image of `tiles` tiles: the image keeps
        kept(n) of its n units, min(k_anchors, that) of them anchors, both spread by tile_shares;
        a tile that keeps a unit has at least one anchor. (units, 0) for every tile of an image
        that keeps all its units."""
        n = self.units_per_tile * tiles
        total = self.kept(n)
        if total == n:
            return [(self.units_per_tile, 0)] * tiles
        anchors = tile_shares(min(self.config.k_anchors, total), tiles)
        return [(kept, min(kept, max(1, anchor)) if kept else 0)
                for kept, anchor in zip(tile_shares(total, tiles), anchors)]

    def tile_counts(self, image_num_patches, pixel_values):
        """Each image's tile count, checked against pixel_values' tiles."""
        if image_num_patches is None:
            raise ValueError(f"prune_image_tokens needs each image's tile count to prune "
                             f"InternVL: pass {TILES} (the patched processor's output holds it; "
                             f"give the processor to prune_image_tokens(model, processor) and "
                             f"pass its whole output)")
        tiles = (image_num_patches.tolist() if isinstance(image_num_patches, torch.Tensor)
                 else list(image_num_patches))
        if not all(isinstance(t, Integral) and t >= 1 for t in tiles):
            raise ValueError(f"{TILES} must hold each image's tile count (integers >= 1), "
                             f"got {tiles!r}")
        if sum(tiles) != len(pixel_values):
            raise ValueError(f"{TILES} counts {sum(tiles)} tiles for {len(tiles)} images, but "
                             f"pixel_values holds {len(pixel_values)}: each tile of every image "
                             f"once (videos, whose frames InternVL's processor puts into "
                             f"pixel_values too, are not supported with prune_image_tokens)")
        return [int(t) for t in tiles]

    # --- the vision side --------------------------------------------------------------------

    def check_feature_arguments(self, layer, strategy):
        """Per-call feature settings other than the config's (the selection block follows the
        config) are refused."""
        config = self.model.config
        for name, value, own in (("vision_feature_layer", layer, config.vision_feature_layer),
                                 ("vision_feature_select_strategy", strategy,
                                  config.vision_feature_select_strategy)):
            if value is not None and value != own:
                raise ValueError(f"{name}={value!r} in the call, but prune_image_tokens was set "
                                 f"up for the config's {own!r}: set it in the model's config "
                                 f"before prune_image_tokens, not per call")

    def get_image_features(self, original, pixel_values, vision_feature_layer=None,
                           vision_feature_select_strategy=None, image_num_patches=None,
                           return_dict=None, **kwargs):
        self.check_feature_arguments(vision_feature_layer, vision_feature_select_strategy)
        tiles = self.tile_counts(image_num_patches, pixel_values)
        run = TowerRun(self, [plan for t in tiles for plan in self.tile_plan(t)])
        token = TOWER.set(run)
        try:
            output = original(pixel_values, vision_feature_layer=vision_feature_layer,
                              vision_feature_select_strategy=vision_feature_select_strategy,
                              return_dict=True, **kwargs)
        finally:
            TOWER.reset(token)
        if run.keep is None:
            raise RuntimeError("the vision tower's selecting block did not run: tokenprune "
                               "cannot tell which image tokens to keep")
        rows, keep, units, start = [], [], [], 0
        features = output.pooler_output  # (tiles, units_per_tile, D)
        for t in tiles:
            # Unit v of the image's tile j is its unit j * units_per_tile + v.
            idx = torch.cat([j * self.units_per_tile + tile_keep.to(features.device)
                             for j, tile_keep in enumerate(run.keep[start:start + t])])
            rows.append(features[start:start + t].flatten(0, 1).index_select(0, idx))
            keep.append(idx)
            units.append(t * self.units_per_tile)
            start += t
        output.pooler_output = tuple(rows)
        # Paired with the rows themselves, as generate's expansion for beams repeats them.
        attach_per_image(output, KEPT_UNITS, units, keep)
        self.last_keep_idx = keep
        return output if return_dict is not False else output.to_tuple()

    def select(self, block, args, kwargs):
        """Forward pre-hook of the feature block: each tile's kept units (TowerRun.keep), from the
        block's input and its own q/k."""
        run = TOWER.get()
        if run is None or run.owner is not self:
            return  # the tower runs outside get_image_features: nothing to select
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] != len(run.plan):
            raise ValueError(f"the vision tower got {x.shape[0]} tiles, but {TILES} counts "
                             f"{len(run.plan)}")
        units = self.units_per_tile
        side = int(round((x.shape[1] - 1) ** 0.5))
        if 4 * units != x.shape[1] - 1 or side * side != x.shape[1] - 1:
            raise ValueError(f"the vision tower got {x.shape[1]} tokens per tile, but "
                             f"prune_image_tokens was set up for a class token and "
                             f"{4 * units} patches (the configured image size)")
        keep = [torch.arange(units, device=x.device) if kept == units
                else torch.zeros(0, dtype=torch.long, device=x.device) for kept, _ in run.plan]
        selected = [i for i, (kept, _) in enumerate(run.plan) if 0 < kept < units]
        if selected:
            attn = block.attention
            rows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + shuffle_order(side)])
            with torch.no_grad():
                x = x[selected][:, rows.to(x.device)]   # the class token, then unit order
                y = block.layernorm_before(x)
                q = attn.q_norm(attn.q_proj(y)).unflatten(-1, (attn.num_heads, -1))
                k = attn.k_norm(attn.k_proj(y)).unflatten(-1, (attn.num_heads, -1))
                features = x[:, 1:].reshape(len(selected), units, -1)
                for i, tile in enumerate(selected):
                    kept, anchors = run.plan[tile]
                    keep[tile] = select_units(features[i], q[i], k[i], None, attn.scale, 4, kept,
                                              self.anchor_config(anchors), self._generator,
                                              class_token=True)
        run.keep = keep

    def anchor_config(self, anchors):
        """The config with k_anchors = `anchors` (select_units takes min(k_anchors, kept))."""
        if anchors not in self._configs:
            self._configs[anchors] = dataclasses.replace(self.config, k_anchors=anchors)
        return self._configs[anchors]

    # --- the language model's side ---------------------------------------------------------

    def generate(self, original, *args, **kwargs):
        """The *ForConditionalGeneration's generate: the images encoded here with their tile
        counts (generate would encode them with pixel_values alone), then generate on the
        features."""
        tiles = kwargs.pop(TILES, None)
        chunk = kwargs.get("prefill_chunk_size",
                           getattr(kwargs.get("generation_config"), "prefill_chunk_size", None))
        if chunk:
            raise ValueError(f"prefill_chunk_size={chunk!r}: a chunked prefill splits the image "
                             f"features, which then no longer say which units they keep; "
                             f"prune_image_tokens does not support it")
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is not None:
            encoded = dict(kwargs.get("mm_encoder_outputs") or {})
            if encoded.get("image") is not None:
                raise ValueError("You cannot pass both pixel_values and image features "
                                 "(mm_encoder_outputs)")
            with torch.no_grad():
                encoded["image"] = self.inner.get_image_features(
                    pixel_values, vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    image_num_patches=tiles, return_dict=True)
            kwargs["mm_encoder_outputs"] = encoded
        return original(*args, **kwargs)

    def begin_call(self, inner, args, kwargs):
        """Forward pre-hook of the *Model: the tile counts taken out of the call (they would
        reach the language model), the tower run when pixel_values are given, and with images
        the call's ImageCall."""
        kwargs = {**dict(zip(self._forward_parameters(), args)), **kwargs}
        tiles = kwargs.pop(TILES, None)
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        if kwargs.get("pixel_values") is not None:
            encoded["image"] = inner.get_image_features(
                kwargs["pixel_values"], vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_num_patches=tiles, return_dict=True)
            kwargs["pixel_values"] = None
        features = encoded.get("image")
        if features is None:
            return (), kwargs
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("prune_image_tokens needs input_ids with images (it finds the image "
                             "placeholders there), got inputs_embeds only")
        units, keep = kept_units(features)
        CALL.set(ImageCall(self, *self.position_shift(input_ids, units, keep)))
        # transformers' forward takes the image rows as one tensor: a copy of the features
        # with theirs concatenated (generate keeps the per-image ones for its next steps).
        joined = copy.copy(features)
        joined.pooler_output = torch.cat(features.pooler_output)
        kwargs["mm_encoder_outputs"] = {**encoded, "image": joined}
        return (), kwargs

    def position_shift(self, input_ids, units, keep):
        """((B, L) int64, (B,) int64): what each token's position in the pruned prompt lacks of
        its unpruned one, and each sample's image rows dropped in all. An image's placeholders
        are a run of image tokens; its kept row r, unit keep[r], sits at the image's unpruned
        start + keep[r]; every token after it is `units - kept` further on."""
        B, L = input_ids.shape
        shift = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
        total = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        images = iter(zip(units, keep))
        image = (input_ids == self.image_token_id).cpu()
        for b in range(B):
            columns = image[b].nonzero().squeeze(1)
            # Runs of consecutive placeholders: one per image.
            for run in torch.tensor_split(columns, (torch.diff(columns) > 1).nonzero()
                                          .squeeze(1) + 1) if len(columns) else ():
                n, idx = next(images, (None, None))
                if idx is None:
                    raise ValueError(f"the prompts hold more images than the {len(keep)} "
                                     f"images given")
                if len(idx) != len(run):
                    raise ValueError(f"the prompt has {len(run)} image placeholders for an image "
                                     f"of which prune_image_tokens keeps {len(idx)}: pass the "
                                     f"processor to prune_image_tokens(model, processor) so that "
                                     f"it writes the pruned count")
                run = run.to(shift.device)
                shift[b, run] = total[b] + idx.to(shift.device) - torch.arange(
                    len(idx), device=shift.device)
                total[b] += n - len(idx)
                shift[b, int(run[-1]) + 1:] = total[b]
        if next(images, None) is not None:
            raise ValueError(f"the prompts hold fewer images than the {len(keep)} images given")
        return shift, total

    def place_units(self, language_model, args, kwargs):
        """Forward pre-hook of the language model: each token at its unpruned position, from the
        call's ImageCall and, after the prefill, from what the cache says the prompt dropped."""
        call = CALL.get()
        call = call if call is not None and call.owner is self else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        before = getattr(cache, SHIFT, None)
        if call is None and before is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        B, L = embeds.shape[:2]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self.real_token_positions(kwargs.get("attention_mask"), cache, B, L,
                                                  embeds.device)
        shift = torch.zeros(B, L, dtype=torch.long, device=positions.device)
        if before is not None:
            shift += before.to(positions.device)[:, None]
        if call is not None:
            shift += call.shift.to(positions.device)
        return args, {**kwargs, "position_ids": positions + shift}

    @staticmethod
    def real_token_positions(mask, cache, batch, length, device):
        """Position ids as generate makes them: the real tokens counted (attention_mask), the
        padding at 0; without a mask, the cache's length onwards."""
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            positions = mask.long().cumsum(-1) - 1
            return positions.masked_fill(mask == 0, 0)[:, -length:]
        past = cache.get_seq_length() if cache is not None else 0
        return torch.arange(past, past + length, device=device).expand(batch, -1)

    def leave_shift(self, language_model, args, kwargs, output):
        """Forward hook of the language model: each sample's dropped rows in all, on the cache
        that the decoding steps get."""
        call = CALL.get()
        if call is None or call.owner is not self:
            return
        # transformers 5.25 names it cache (and warns on the old name), 5.19 past_key_values.
        fields = getattr(output, "__dataclass_fields__", {})
        cache = output.get("cache" if "cache" in fields else "past_key_values")
        if cache is not None:
            before = getattr(cache, SHIFT, None)
            total = call.total if before is None else before.to(call.total.device) + call.total
            setattr(cache, SHIFT, total)

    def end_call(self, inner, args, kwargs, output):
        """Forward hook of the *Model (also when it raised): the call's ImageCall is done."""
        if getattr(CALL.get(), "owner", None) is self:
            CALL.set(None)

    def _forward_parameters(self):
        return list(inspect.signature(type(self.inner).forward).parameters)[1:]

    # --- install and undo -------------------------------------------------------------------

    def install_hooks(self):
        inner = self.inner
        self.wrap_method("get_image_features")
        if self.model is not inner:  # the *ForConditionalGeneration: its generate too
            self.model.generate = Wrapped(self.generate, self.model.generate)
        self.hook(inner, self.begin_call, with_kwargs=True)
        self.hook(inner, self.end_call, post=True, with_kwargs=True, always_call=True)
        self.hook(inner.language_model, self.place_units, with_kwargs=True)
        self.hook(inner.language_model, self.leave_shift, post=True, with_kwargs=True)
        self.hook(inner.vision_tower.encoder.layer[self.block_index], self.select,
                  with_kwargs=True)

    def restore(self):
        wrapped = self.model.__dict__.get("generate")
        if isinstance(wrapped, Wrapped) and wrapped.wrapper == self.generate:
            del self.model.__dict__["generate"]

    def placeholder_count(self, processor):
        return InternVLPlaceholderCount(processor, self)

    def check_processor(self, processor):
        super().check_processor(processor)
        if processor.image_seq_length != self.units_per_tile:
            raise ValueError(f"the processor writes image_seq_length="
                             f"{processor.image_seq_length} image tokens per tile, but the model "
                             f"gives {self.units_per_tile}: not this model's processor")

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        model_config = inner.config
        strategy = model_config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: prune_image_tokens "
                             f"prunes InternVL under 'default' (the class token's row dropped), "
                             f"the only one InternVL's pixel shuffle runs with")
        if model_config.downsample_ratio != 0.5:
            raise UnsupportedModelError(f"InternVL with downsample_ratio="
                                        f"{model_config.downsample_ratio}: prune_image_tokens "
                                        f"takes 0.5 (2 x 2 patches per image token)")
        depth = len(inner.vision_tower.encoder.layer)
        feature = model_config.vision_feature_layer
        if (isinstance(feature, bool) or not isinstance(feature, Integral)
                or not -depth - 1 <= feature <= depth or feature % (depth + 1) == 0):
            raise ValueError(f"vision_feature_layer must be one vision block's output, an index "
                             f"into the tower's {depth + 1} hidden states in [1, {depth}] (or "
                             f"[{-depth}, -1]; 0 is the embeddings), got {feature!r}")
        vision = model_config.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (
            vision.image_size[1] // vision.patch_size[1])
        state = cls(model, inner, config, ratio, feature % (depth + 1) - 1, patches // 4)
        if processor is not None:
            state.check_processor(processor)
        if ratio == 1:
            return "ratio=1: every image token is kept"
        return state


class TowerRun:
    """One get_image_features call: `plan` (kept, anchors) per tile of every image, in
    pixel_values' order; `keep` each tile's kept units, set by the feature block's pre-hook."""

    def __init__(self, owner, plan):
        self.owner = owner
        self.plan = plan
        self.keep = None


class ImageCall:
    """One *Model call with images: `shift` (B, L), what each token's pruned position lacks of
    its unpruned one; `total` (B,), each sample's dropped image rows."""

    def __init__(self, owner, shift, total):
        self.owner = owner
        self.shift = shift
        self.total = total


class InternVLPlaceholderCount:
    """A patched InternVLProcessor's placeholder count: <img>, kept(n) <IMG_CONTEXT>, </img> for
    an image of t tiles and n = t * image_seq_length units. It also adds each image's tile count
    to the processor's output (TILES), which the pruned model reads."""

    def __init__(self, processor, state):
        self.state = state
        self.units = processor.image_seq_length
        self.text = (processor.start_image_token, processor.image_token,
                     processor.end_image_token)
        self.original_num_multimodal_tokens = processor._get_num_multimodal_tokens

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        tiles = [int(t) for t in image_inputs["num_patches"]]
        # The image processor's output is the processor's output: the processor pops
        # num_patches from it, and keeps this.
        image_inputs[TILES] = tiles
        start, token, end = self.text
        return start + token * self.state.kept(self.units * tiles[image_idx]) + end

    def num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = self.original_num_multimodal_tokens(image_sizes, **kwargs)
        if image_sizes is not None:  # the pruned count in place of the unpruned one
            data.num_image_tokens = [count - self.units * t + self.state.kept(self.units * t)
                                     for count, t in zip(data.num_image_tokens,
                                                         data.num_image_patches)]
        return data
