"""Qwen2-VL (SPEC.md, "Image tokens for Qwen2-VL, Qwen2.5-VL and Qwen3-VL"), and the base of the
Qwen-VL families: qwen2_5_vl.py and qwen3_vl.py subclass it where they differ.

The Qwen-VL families share what pruning needs: a vision tower `visual` whose blocks have `norm1`
and `attn.qkv` with the rotary embedding of their module, a patch merger that turns each s x s
patch group (a unit) into one language-model token, and 3D M-RoPE positions from
`get_rope_index`. What differs is a method each: Qwen2.5-VL's window order (the tower's rows are
permuted by window; `unit_order`, `attends_whole_image`, `check_layer`) and Qwen3-VL's deepstack
features (cut at the same rows in `cut`, their mergers in `mergers_from`).

Nothing in the model's modules changes. On the one model object:
- `get_image_features` (an instance attribute wrapping the class's) runs the tower; a forward
  pre-hook on the last vision block makes the selection from its input and q/k while it runs;
  the wrapper then keeps the kept units' rows of the tower's output (and of every deepstack
  feature). `get_video_features` passes through untouched.
- `get_rope_index` (wrapping the class's) gives the pruned prompt the positions of the
  unpruned one: it re-expands each image's placeholders, asks the class's method, and takes the
  rows back; an image's slots carry the image's start position, since generate asks for the
  positions before the tower has run and the selection is known.
- The kept units travel with the image features they were cut from (`KEPT_UNITS`, each image's
  rows paired with its kept unit indices): forward gets them from its own tower run, generate
  from the features it encoded before the prefill (`mm_encoder_outputs`), and every step of a
  generate without a cache gets them again. A forward pre-hook on the *Model makes one
  `ImageSlots` per call from them and the prompt; a forward pre-hook on the language model
  writes each kept unit's own position into its slot; a forward hook on the *Model ends the
  call. With pixel_values the pre-hook runs the tower itself (the class's forward then takes
  the features as `mm_encoder_outputs`), so that one path serves forward and generate.

With `layer=L` (SPEC.md, "Pruning inside the Qwen vision tower") the selection hook sits on
block L instead and also cuts: it hands block L the kept units' patches, with their own rotary
embeddings and recounted cu_seqlens; a pre-hook on every later block swaps in the same cut
arguments (Qwen2.5-VL's window blocks get the recounted windows); a forward hook on the merger
(and on the deepstack mergers of blocks L and after) spreads the kept units' rows back over a
zero tensor of every unit, so that the tower's own reordering and splitting run unchanged and
the wrapper above keeps the kept rows as it does without `layer`.
"""
import sys
from numbers import Integral

import torch

from ..selection import select_units
from .base import CALL, KEPT_UNITS, ImageTokenPruning, attach_per_image, kept_units
from .units import image_units, unit_offsets

# The methods a patched model object holds as instance attributes.
MODEL_METHODS = ("get_image_features", "get_video_features", "get_rope_index")


class Qwen2VLImageTokenPruning(ImageTokenPruning):
    """The pruning of one Qwen-VL model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: one 1-D int64 tensor per image
    of the last image batch, in the order of image_grid_thw, the kept unit indices ascending
    (indices into that image's units in the order `model.visual` outputs them); None before the
    first image. `kept(n)`: the units an image of n units keeps. `layer`: the vision block index
    where the selection cuts the tower (0 .. depth - 1), or None (the last block's input, no cut).
    """

    model_type = "qwen2_vl"
    name = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    processor_classes = ("Qwen2VLProcessor",)
    layer_inside_tower = True

    def __init__(self, model, inner, config, ratio, layer=None):
        super().__init__(model, inner, config, ratio)
        self.merge = inner.visual.spatial_merge_size
        self.layer = layer         # the block index where the selection cuts, or None
        self.image_token_id = inner.config.image_token_id
        self._generator = torch.Generator().manual_seed(config.seed)
        self._grid = None          # image_grid_thw of the images the tower is encoding
        self._keep = None          # their kept units, set by the selecting block's pre-hook
        self._kept_run = None      # layer=L: what blocks L.. run with (KeptPatches)
        self._in_video = False

    # --- the vision side -------------------------------------------------------------------

    def unit_order(self, grid, rows, device):
        """(order, windows): for each patch in unit order, its row in a block's input (rows,)
        int64; and the window segments (cu_window_seqlens) of a family whose tower attends in
        windows, else None. Here the tower's rows are in unit order already."""
        return torch.arange(rows, device=device), None

    def select(self, block, args, kwargs):
        """Forward pre-hook of the tower's last block (layer=None): SPEC's unit selection per
        image."""
        if self._grid is None:
            return
        x = args[0] if args else kwargs["hidden_states"]
        order, _ = self.unit_order(self._grid, x.shape[0], x.device)
        self._keep = self._select(block, x, kwargs, order)

    def _select(self, block, x, kwargs, order):
        """The kept units of every image, from the block's input x and its own q/k; `order`
        from _unit_order."""
        cu_seqlens = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        attn = block.attn
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        with torch.no_grad():
            L = x.shape[0]
            q, k, _ = attn.qkv(block.norm1(x)).reshape(L, 3, attn.num_heads, -1).unbind(1)
            q, k = rotary(q, k, cos, sin)
            segment = torch.searchsorted(cu_seqlens[1:].to(x.device),
                                         torch.arange(L, device=x.device), right=True)
            x, q, k, segment = x[order], q[order], k[order], segment[order]
            return self._select_images(x, q, k, segment, attn.scaling,
                                       self.attends_whole_image(block))

    # --- layer=L: blocks L and after on the kept units only ----------------------------------

    def select_and_cut(self, block, args, kwargs):
        """Forward pre-hook of block L: the selection, then block L's input cut to the kept
        units' patches (in the tower's row order), with the arguments that go with them."""
        if self._grid is None:
            return None
        x = args[0] if args else kwargs.pop("hidden_states")
        order, windows = self.unit_order(self._grid, x.shape[0], x.device)
        keep = self._keep = self._select(block, x, kwargs, order)
        merge2 = self.merge ** 2
        starts = [0]
        for units in image_units(self._grid, self.merge)[:-1]:
            starts.append(starts[-1] + units)
        patches = torch.cat([((start + idx.to(x.device))[:, None] * merge2
                              + torch.arange(merge2, device=x.device)).reshape(-1)
                             for start, idx in zip(starts, keep)])
        rows = order[patches].sort().values  # the tower's order (window order in Qwen2.5-VL)
        cos, sin = kwargs["position_embeddings"]
        self._kept_run = KeptPatches(rows, recount(kwargs["cu_seqlens"], rows),
                                     None if windows is None else recount(windows, rows),
                                     (cos.index_select(0, rows), sin.index_select(0, rows)))
        return self.run_on_kept(block, (x.index_select(0, rows), *args[1:]), kwargs)

    def run_on_kept(self, block, args, kwargs):
        """Forward pre-hook of the blocks after L (and used by block L's): the cut arguments;
        a Qwen2.5-VL window-attention block gets the recounted windows."""
        run = self._kept_run
        if run is None:
            return None
        cu_seqlens = (run.cu_seqlens if run.windows is None or self.attends_whole_image(block)
                      else run.windows)
        kwargs = {**kwargs, "cu_seqlens": cu_seqlens, "position_embeddings": run.rotary}
        if kwargs.get("max_seqlen") is not None:  # flash attention's, else None
            kwargs["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return args, kwargs

    def spread_units(self, merger, args, output):
        """Forward hook of a merger that ran on the kept patches: its rows spread over a zero
        tensor of every unit, in the tower's unit order (the wrapper keeps the kept rows)."""
        run = self._kept_run
        if run is None:
            return None
        merge2 = self.merge ** 2
        units = sum(image_units(self._grid, self.merge))
        spread = output.new_zeros(units, *output.shape[1:])
        spread[run.rows[::merge2] // merge2] = output
        return spread

    def attends_whole_image(self, block):
        """Whether the block's patches attend to their whole image (Qwen2.5-VL's window blocks
        do not)."""
        return True

    def _select_images(self, x, q, k, segment, scale, whole_image):
        keep, start, merge2 = [], 0, self.merge ** 2
        for units in image_units(self._grid, self.merge):
            rows = slice(start, start + units * merge2)
            start += units * merge2
            keep.append(select_units(x[rows].reshape(units, -1), q[rows], k[rows],
                                     None if whole_image else segment[rows], scale, merge2,
                                     self.kept(units), self.config, self._generator))
        return keep

    def get_image_features(self, original, pixel_values, image_grid_thw=None, **kwargs):
        if self._in_video or image_grid_thw is None:  # Qwen3-VL encodes video through here
            return original(pixel_values, image_grid_thw, **kwargs)
        self._grid, self._keep = image_grid_thw, None
        try:
            output = original(pixel_values, image_grid_thw, **kwargs)
        finally:
            self._grid = self._kept_run = None
        keep, self._keep = self._keep, None
        if keep is None:
            raise RuntimeError("the vision tower's selecting block did not run: tokenprune "
                               "cannot tell which image tokens to keep")
        self.cut(output, keep)
        # Paired with the rows themselves: generate's expansion for beams and
        # num_return_sequences repeats an image's rows object, not its index. The grid goes
        # along since generate drops image_grid_thw from the inputs once it encoded them.
        attach_per_image(output, KEPT_UNITS, image_grid_thw, keep)
        self.last_keep_idx = keep
        return output

    def cut(self, output, keep):
        """Keep the kept units' rows of every image's features, in place on the output."""
        output.pooler_output = kept_rows_of(output.pooler_output, keep)

    def get_video_features(self, original, *args, **kwargs):
        self._in_video = True
        try:
            return original(*args, **kwargs)
        finally:
            self._in_video = False

    # --- the positions ---------------------------------------------------------------------

    def get_rope_index(self, original, input_ids, mm_token_type_ids=None, image_grid_thw=None,
                       *args, attention_mask=None, **kwargs):
        """The class's get_rope_index on the unpruned prompt, its rows taken back to the pruned
        one. Each image's slots carry the image's start position in all three dimensions (the
        position of its first unit); `place_units` adds each kept unit's own offset."""
        def run(ids, types, mask):
            return original(ids, types, image_grid_thw, *args, attention_mask=mask, **kwargs)
        if image_grid_thw is None or mm_token_type_ids is None:
            return run(input_ids, mm_token_type_ids, attention_mask)
        units = image_units(image_grid_thw, self.merge)
        kept = [self.kept(n) for n in units]
        if kept == units:
            return run(input_ids, mm_token_type_ids, attention_mask)
        B, L = input_ids.shape
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        images = iter(zip(units, kept))
        rows = []       # per sample: (expanded ids, expanded types, source column of each token)
        for b in range(B):
            ids, types = input_ids[b][mask[b]], mm_token_type_ids[b][mask[b]]
            pieces_ids, pieces_types, where, length, i = [], [], [], 0, 0
            while i < len(ids):
                j = i + 1
                while j < len(ids) and (types[j] == 1) == (types[i] == 1):
                    j += 1
                if types[i] == 1:  # an image's placeholders
                    n, count = next(images, (None, None))
                    if count != j - i:
                        raise ValueError(f"the prompt has {j - i} image placeholders where "
                                         f"prune_image_tokens keeps {count} units of an image: "
                                         f"pass the processor to prune_image_tokens(model, "
                                         f"processor) so that it writes the pruned count")
                    pieces_ids.append(ids[i:i + 1].expand(n))
                    pieces_types.append(types[i:i + 1].expand(n))
                    where.append(torch.full((count,), length, device=ids.device))
                    length += n
                else:
                    pieces_ids.append(ids[i:j])
                    pieces_types.append(types[i:j])
                    where.append(torch.arange(length, length + j - i, device=ids.device))
                    length += j - i
                i = j
            rows.append((torch.cat(pieces_ids), torch.cat(pieces_types), torch.cat(where)))
        full = max(len(r[0]) for r in rows)
        ids_full = input_ids.new_zeros(B, full)
        types_full = mm_token_type_ids.new_zeros(B, full)
        mask_full = torch.zeros(B, full, dtype=torch.long, device=input_ids.device)
        for b, (ids, types, _) in enumerate(rows):  # left-padded; the mask says where
            ids_full[b, full - len(ids):], types_full[b, full - len(ids):] = ids, types
            mask_full[b, full - len(ids):] = 1
        positions_full, deltas = run(ids_full, types_full, mask_full)
        positions = positions_full.new_zeros(positions_full.shape[0], B, L)
        for b, (ids, _, where) in enumerate(rows):
            positions[:, b, mask[b]] = positions_full[:, b, full - len(ids) + where]
            # rope_deltas = largest unpruned position + 1 - the pruned prompt's length
            deltas[b] += len(ids) - int(mask[b].sum())
        return positions, deltas

    def begin_call(self, inner, args, kwargs):
        """Forward pre-hook of the *Model: with images, their features (the tower runs here when
        pixel_values are given) and the ImageSlots the language model's hook places."""
        found = self.images_of_call(args, kwargs)
        if found is None:
            return None
        kwargs, images = found
        slots = kwargs["input_ids"] == self.image_token_id
        if slots.any():
            CALL.set(ImageSlots(self, slots, *kept_units(images)))
        return (), kwargs

    def encode_images(self, kwargs):
        return self.inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"),
                                            return_dict=True)

    def place_units(self, language_model, args, kwargs):
        """Forward pre-hook of the language model: each kept unit's own 3D position, added to
        its image's start position, which get_rope_index gave every slot of the image."""
        call = self.this_call()
        position_ids = kwargs.get("position_ids")
        if call is None or position_ids is None:
            return None
        positions = position_ids.clone()
        spatial = positions[-3:].reshape(3, -1)  # (3, B * L), a view into positions
        flat = call.slots.reshape(-1).nonzero().squeeze(1).to(positions.device)
        if len(flat) != sum(len(idx) for idx in call.keep):
            raise ValueError(f"the prompt has {len(flat)} image placeholders where "
                             f"prune_image_tokens keeps {sum(len(i) for i in call.keep)} units: "
                             f"pass the processor to prune_image_tokens(model, processor) so "
                             f"that it writes the pruned count")
        start = 0
        for grid, idx in zip(call.grids, call.keep):
            columns = flat[start:start + len(idx)]
            start += len(idx)
            offsets = unit_offsets(grid, self.merge, positions.device)[:, idx.to(positions.device)]
            spatial[:, columns] = spatial[:, columns[:1]] + offsets
        return args, {**kwargs, "position_ids": positions}

    # --- install and undo -------------------------------------------------------------------

    def install_hooks(self):
        inner = self.inner
        for name in MODEL_METHODS:
            self.wrap_method(name)
        self.hook(inner, self.begin_call, with_kwargs=True)
        self.hook(inner, self.end_call, post=True, with_kwargs=True, always_call=True)
        self.hook(inner.language_model, self.place_units, with_kwargs=True)
        visual = inner.visual
        if self.layer is None:
            self.hook(visual.blocks[-1], self.select, with_kwargs=True)
            return
        self.hook(visual.blocks[self.layer], self.select_and_cut, with_kwargs=True)
        for block in visual.blocks[self.layer + 1:]:
            self.hook(block, self.run_on_kept, with_kwargs=True)
        for merger in self.mergers_from(self.layer):
            self.hook(merger, self.spread_units, post=True)

    def mergers_from(self, layer):
        """The mergers that run on the output of blocks `layer` and after."""
        return [self.inner.visual.merger]

    def placeholder_count(self, processor):
        return QwenPlaceholderCount(processor, self)

    @classmethod
    def check_layer(cls, layer, visual):
        """The block index that `layer` names in the tower, or ValueError."""
        depth = len(visual.blocks)
        # The type first: 1.0 is in the range, so a range message would hide what is wrong.
        if isinstance(layer, bool) or not isinstance(layer, Integral):
            raise ValueError(f"layer must be an int (a vision block index in [{-depth}, "
                             f"{depth - 1}]; negative counts from the end), got "
                             f"{type(layer).__name__} {layer!r}")
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be a vision block index in [{-depth}, {depth - 1}] "
                             f"(the tower has {depth} blocks; negative counts from the end), "
                             f"got {layer!r}")
        return int(layer) % depth

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        index = None if layer is None else cls.check_layer(layer, inner.visual)
        state = cls(model, inner, config, ratio, index)
        if processor is not None:
            state.check_processor(processor)
        if ratio == 1:
            return "ratio=1: every image token is kept"
        return state


def kept_rows_of(per_image, keep):
    """Each image's rows (a tuple of (n, C) tensors) cut to its kept units."""
    return tuple(rows.index_select(0, idx.to(rows.device)) for rows, idx in zip(per_image, keep))


class ImageSlots:
    """One *Model call's images: `owner` the Qwen2VLImageTokenPruning whose model runs; `slots`
    (B, L) bool, where the prompt's image placeholders are; `grids` each image's (t, h, w);
    `keep` each image's kept units, in the same order."""

    def __init__(self, owner, slots, grids, keep):
        self.owner = owner
        self.slots = slots
        self.grids = grids
        self.keep = keep


class KeptPatches:
    """What blocks L and after run with under layer=L: `rows` the kept patches' rows in the
    tower's input (ascending), `cu_seqlens` the full-attention segments and `windows` (Qwen2.5-VL,
    else None) the window segments recounted over those rows, `rotary` their (cos, sin)."""

    def __init__(self, rows, cu_seqlens, windows, rotary):
        self.rows = rows
        self.cu_seqlens = cu_seqlens
        self.windows = windows
        self.rotary = rotary


def recount(cu_seqlens, rows):
    """Segment boundaries over the kept rows: each boundary b of the tower's segments becomes
    the count of kept rows below b; a segment with no kept row disappears."""
    counted = torch.searchsorted(rows, cu_seqlens.to(rows.device, torch.int64))
    return torch.unique_consecutive(counted).to(cu_seqlens.dtype)


class QwenPlaceholderCount:
    """A patched Qwen processor's placeholder count: kept(n) <|image_pad|> per image of n units
    (its mm_token_type_ids follow, as the processor derives them from the ids it writes)."""

    def __init__(self, processor, state):
        self.state = state
        self.image_token = processor.image_token
        self.merge = processor.image_processor.merge_size
        self.original_num_multimodal_tokens = processor._get_num_multimodal_tokens

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        t, h, w = (int(v) for v in image_inputs["image_grid_thw"][image_idx])
        return self.image_token * self.state.kept(t * h * w // self.merge ** 2)

    def num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = self.original_num_multimodal_tokens(image_sizes, video_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.state.kept(n) for n in data.num_image_tokens]
        return data
