"""Fewer image tokens for Qwen2-VL, Qwen2.5-VL and Qwen3-VL on Hugging Face transformers (SPEC.md,
"Image tokens for Qwen2-VL, Qwen2.5-VL and Qwen3-VL").

The three families share what pruning needs: a vision tower `visual` whose blocks have `norm1`
and `attn.qkv` with the rotary embedding of their module, a patch merger that turns each s x s
patch group (a unit) into one language-model token, and 3D M-RoPE positions from
`get_rope_index`. What differs is kept in two places: Qwen2.5-VL's window order (the tower's
rows are permuted by window; `_unit_order`) and Qwen3-VL's deepstack features (cut at the same
rows in `_cut`).

Nothing in the model's modules changes. On the one model object:
- `get_image_features` (an instance attribute wrapping the class's) runs the tower; a forward
  pre-hook on the last vision block makes the selection from its input and q/k while it runs;
  the wrapper then keeps the kept units' rows of the tower's output (and of every deepstack
  feature). `get_video_features` passes through untouched.
- `get_rope_index` (wrapping the class's) gives the pruned prompt the positions of the
  unpruned one: it re-expands each image's placeholders, asks the class's method, and takes the
  rows back; an image's slots carry the image's start position until the selection is known.
- A forward pre-hook on the language model writes each kept unit's own position into its slot
  (the selection is made after generate computed the positions, so this is the first place
  where both are known).

With `layer=L` (SPEC.md, "Pruning inside the Qwen vision tower") the selection hook sits on
block L instead and also cuts: it hands block L the kept units' patches, with their own rotary
embeddings and recounted cu_seqlens; a pre-hook on every later block swaps in the same cut
arguments (Qwen2.5-VL's window blocks get the recounted windows); a forward hook on the merger
(and on the deepstack mergers of blocks L and after) spreads the kept units' rows back over a
zero tensor of every unit, so that the tower's own reordering and splitting run unchanged and
the wrapper above keeps the kept rows as it does without `layer`.
"""
import math
import sys
from numbers import Integral
from typing import Optional

import torch

from .reference import select_from_attention, top_indices
from .selection import random_keep_idx, resolve_backend

# model class name prefix -> family; both the *ForConditionalGeneration and the *Model class.
FAMILIES = {"Qwen2VL": "qwen2_vl", "Qwen2_5_VL": "qwen2_5_vl", "Qwen3VL": "qwen3_vl"}
CLASSES = tuple(f"{prefix}{suffix}" for prefix in FAMILIES
                for suffix in ("ForConditionalGeneration", "Model"))
RATIO_TOLERANCE = 1e-6
# The methods a patched model object or processor holds as instance attributes.
MODEL_METHODS = ("get_image_features", "get_video_features", "get_rope_index")


def qwen_model(model):
    """The inner *Model (with `visual` and `language_model`) of a supported Qwen-VL model, or
    None when `model` is not one."""
    name = type(model).__name__
    if name not in CLASSES or not type(model).__module__.startswith("transformers."):
        return None
    import transformers
    if type(model) is not getattr(transformers, name, None):
        return None
    return model.model if name.endswith("ForConditionalGeneration") else model


def kept_count(n, kept_patches, ratio):
    """Units an image of n units keeps: min(k + m, n), or ceil(ratio * n) with a product within
    RATIO_TOLERANCE of an integer taken as that integer, at least 1."""
    if ratio is None:
        return min(kept_patches, n)
    product = ratio * n
    nearest = round(product)
    count = nearest if abs(product - nearest) <= RATIO_TOLERANCE else math.ceil(product)
    return min(n, max(1, count))  # a ratio near 0 still keeps one


def image_units(grid_thw, merge):
    """Units per image, a list of ints, for image_grid_thw (images, 3)."""
    return [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]


def unit_offsets(grid_thw_row, merge, device):
    """(3, n) int64: each unit's (temporal, height, width) offset from the image's start
    position, in the order the tower outputs the units (t, then rows, then columns)."""
    t, h, w = (int(v) for v in grid_thw_row)
    grid = torch.meshgrid(torch.arange(t, device=device), torch.arange(h // merge, device=device),
                          torch.arange(w // merge, device=device), indexing="ij")
    return torch.stack(grid).reshape(3, -1)


def unit_attention(q, k, segment, scale, units, merge2, chunk_elements=1 << 20):
    """P_U (n, n), SPEC's unit attention, for one image: q, k (N, H, d) after the rotary
    embedding, rows in unit order (the s^2 patches of unit u are rows s^2 u ..); segment (N,)
    the attention segment of each row (keys outside a query's segment get no attention), or None
    where every patch attends to the whole image.

    One head and a band of whole units' query rows at a time (about `chunk_elements` logits),
    so that no N x N map is ever alive; the keys are taken patch position first (the first
    patch of every unit, then the second, ..), so that a unit's keys are summed as s^2
    contiguous slices rather than a strided reduction. At Qwen2.5-VL-7B's 4784 patches on a
    2-core CPU this takes about 0.7 s for 16 heads, against 2.2 s for a whole map per head."""
    N, H, _ = q.shape
    P_units = torch.zeros(units, units, dtype=torch.float32, device=q.device)
    band = max(1, chunk_elements // (N * merge2)) * merge2
    by_position = torch.arange(N, device=q.device).view(units, merge2).T.reshape(-1)
    for h in range(H):
        keys = k[by_position, h].float().T.contiguous()
        for start in range(0, N, band):
            logits = q[start:start + band, h].float() @ keys
            logits.mul_(scale)
            if segment is not None:
                same = segment[start:start + band, None] == segment[by_position][None, :]
                logits.masked_fill_(~same, float("-inf"))
            rows = logits.shape[0]
            to_units = logits.softmax(dim=-1).view(rows, merge2, units).sum(dim=1)
            P_units[start // merge2:(start + rows) // merge2] += (
                to_units.view(rows // merge2, merge2, units).sum(dim=1))
    return P_units / (H * merge2 * merge2)


def select_units_triton(features, q, k, scale, merge2, anchors, top_m, config):
    """The unit selection of one image whose patches attend to each other only (a full-attention
    block), with the Triton kernels: the patch scores from the online-softmax passes (no N x N
    map), their unit means, then the kernels' anchors, mmr, or importance over the anchor units'
    patches, diversity and top-m on the units. keep (kept,) int64, ascending."""
    from .kernels.diversity import diversity
    from .kernels.importance import importance
    from .kernels.mmr import mmr
    from .kernels.received_anchors import received_anchors
    from .kernels.select_topm import select_topm
    from .kernels.softmax_stats import softmax_stats
    N, H, d = q.shape
    units = N // merge2
    packed = torch.cat([q.reshape(N, H * d), k.reshape(N, H * d),
                        torch.zeros_like(k).reshape(N, H * d)], dim=1)[None].contiguous()
    stats = softmax_stats(packed, H, scale)
    received = received_anchors(packed, H, 1, stats, 0, scale)[0]           # (1, N)
    score = received.view(1, units, merge2).mean(dim=-1)                   # (1, n)
    if config.selection == "cls":
        return top_indices(score, anchors + top_m).sort(dim=-1).values[0]
    anchor_idx = top_indices(score, anchors).sort(dim=-1).values            # (1, k)
    anchor_mask = torch.zeros(1, units, dtype=torch.int8, device=q.device)
    anchor_mask[0, anchor_idx[0]] = 1
    features = features[None].contiguous()
    if config.selection == "mmr":
        return mmr(features, score.contiguous(), anchor_mask, anchor_idx.int(), top_m,
                   config.mmr_lambda, 0)[0]
    patches = (anchor_idx[..., None] * merge2 + torch.arange(merge2, device=q.device))
    weight = importance(packed, H, patches.reshape(1, -1).int(), scale, stats)
    unit_importance = weight.view(1, units, merge2).mean(dim=-1).contiguous()
    return select_topm(unit_importance, diversity(features, anchor_idx.int()), anchor_mask,
                       anchors, top_m, config.alpha, config.score_norm, 0)[0]


class QwenImageTokenPruning:
    """The pruning of one Qwen-VL model: what `prune_image_tokens` installed and how to undo it.

    `tokenprune.pruned_block(model)` returns it. `last_keep_idx`: one 1-D int64 tensor per image
    of the last image batch, in the order of image_grid_thw, the kept unit indices ascending
    (indices into that image's units in the order `model.visual` outputs them); None before the
    first image. `kept(n)`: the units an image of n units keeps. `layer`: the vision block index
    where the selection cuts the tower (0 .. depth - 1), or None (the last block's input, no cut).
    """

    def __init__(self, model, inner, config, ratio, layer=None):
        self.model = model
        self.inner = inner
        self.config = config
        self.ratio = ratio
        self.family = FAMILIES[next(p for p in sorted(FAMILIES, key=len, reverse=True)
                                    if type(inner).__name__.startswith(p))]
        self.merge = inner.visual.spatial_merge_size
        self.layer = layer         # the block index where the selection cuts, or None
        self.image_token_id = inner.config.image_token_id
        self.last_keep_idx = None
        self.processors = []
        self._generator = torch.Generator().manual_seed(config.seed)
        self._handles = []
        self._grid = None          # image_grid_thw of the images the tower is encoding
        self._keep = None          # their kept units, set by the selecting block's pre-hook
        self._kept_run = None      # layer=L: what blocks L.. run with (KeptPatches)
        self._in_video = False
        self._slots = None         # (B, L) image placeholders of the prompt being run
        self._pending = None       # (grids, keep) whose positions the language model still needs

    def kept(self, n):
        return kept_count(n, self.config.kept_patches, self.ratio)

    # --- the vision side -------------------------------------------------------------------

    def _unit_order(self, grid, rows, device):
        """(order, windows): for each patch in unit order, its row in a block's input (rows,)
        int64; and Qwen2.5-VL's cu_window_seqlens, None in the other families. Qwen2.5-VL's
        tower holds the units in window order (the same order in every block)."""
        if self.family != "qwen2_5_vl":
            return torch.arange(rows, device=device), None
        from transformers.vision_utils import get_vision_window_index
        visual = self.inner.visual
        window_index, windows = get_vision_window_index(grid, visual.spatial_merge_size,
                                                        visual.window_size, visual.patch_size)
        merge2 = self.merge ** 2
        position = torch.argsort(window_index.to(device))  # unit -> its place in window order
        order = (position[:, None] * merge2 + torch.arange(merge2, device=device)).reshape(-1)
        return order, windows

    def select(self, block, args, kwargs):
        """Forward pre-hook of the tower's last block (layer=None): SPEC's unit selection per
        image."""
        if self._grid is None:
            return
        x = args[0] if args else kwargs["hidden_states"]
        order, _ = self._unit_order(self._grid, x.shape[0], x.device)
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
                                       self._attends_whole_image(block))

    # --- layer=L: blocks L and after on the kept units only ----------------------------------

    def select_and_cut(self, block, args, kwargs):
        """Forward pre-hook of block L: the selection, then block L's input cut to the kept
        units' patches (in the tower's row order), with the arguments that go with them."""
        if self._grid is None:
            return None
        x = args[0] if args else kwargs.pop("hidden_states")
        order, windows = self._unit_order(self._grid, x.shape[0], x.device)
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
        cu_seqlens = (run.cu_seqlens if run.windows is None or self._attends_whole_image(block)
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

    def _attends_whole_image(self, block):
        """Whether the block's patches attend to their whole image: every block but Qwen2.5-VL's
        window-attention ones (those not in fullatt_block_indexes)."""
        full = getattr(self.inner.visual, "fullatt_block_indexes", None)
        return full is None or self._block_index(block) in full

    def _block_index(self, block):
        return next(i for i, b in enumerate(self.inner.visual.blocks) if b is block)

    def _select_images(self, x, q, k, segment, scale, whole_image):
        config, merge2 = self.config, self.merge ** 2
        keep, start = [], 0
        for units in image_units(self._grid, self.merge):
            rows = slice(start, start + units * merge2)
            start += units * merge2
            kept = self.kept(units)
            if kept == units:
                keep.append(torch.arange(units, device=x.device))
                continue
            if config.selection == "random":
                keep.append(random_keep_idx(1, units, kept, 0, self._generator, x.device)[0])
                continue
            anchors = min(config.k_anchors, kept)
            features = x[rows].reshape(units, -1)
            backend = resolve_backend(config.backend, x)
            if backend == "triton" and not whole_image and config.backend == "triton":
                # The kernels read a block whose patches attend to the whole image; "auto"
                # takes the reference for a windowed one, an explicit "triton" is refused.
                raise ValueError("backend='triton' needs the selecting block to attend to the "
                                 "whole image; this one attends within windows: use "
                                 "backend='auto' or 'reference'")
            if whole_image and backend == "triton":
                keep.append(select_units_triton(features, q[rows], k[rows], scale, merge2,
                                                anchors, kept - anchors, config))
                continue
            P_units = unit_attention(q[rows], k[rows], None if whole_image else segment[rows],
                                     scale, units, merge2)
            keep.append(select_from_attention(
                P_units[None], features[None], anchors, kept - anchors, config.alpha,
                config.score_norm, num_prefix=0, class_token=False, selection=config.selection,
                mmr_lambda=config.mmr_lambda)[0])
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
        self._cut(output, keep)
        self.last_keep_idx = keep
        self._pending = (image_grid_thw, keep)
        return output

    @staticmethod
    def _cut(output, keep):
        """Keep the kept units' rows of every image's features, in place on the output."""
        def cut(per_image):
            return tuple(rows.index_select(0, idx.to(rows.device))
                         for rows, idx in zip(per_image, keep))
        output.pooler_output = cut(output.pooler_output)
        if getattr(output, "deepstack_features", None) is not None:
            output.deepstack_features = [cut(feature) for feature in output.deepstack_features]

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

    def note_prompt(self, inner, args, kwargs):
        """Forward pre-hook of the *Model: where the image placeholders of this prompt are."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and kwargs.get("pixel_values") is not None:
            self._slots = input_ids == self.image_token_id
        elif kwargs.get("pixel_values") is not None:
            raise ValueError("prune_image_tokens needs input_ids with pixel_values (it finds the "
                             "image placeholders there), got inputs_embeds only")

    def place_units(self, language_model, args, kwargs):
        """Forward pre-hook of the language model: each kept unit's own 3D position."""
        pending, slots = self._pending, self._slots
        self._pending = self._slots = None
        position_ids = kwargs.get("position_ids")
        if pending is None or slots is None or position_ids is None:
            return None
        grids, keep = pending
        positions = position_ids.clone()
        spatial = positions[-3:].reshape(3, -1)  # (3, B * L), a view into positions
        flat = slots.reshape(-1).nonzero().squeeze(1).to(positions.device)
        start = 0
        for grid, idx in zip(grids, keep):
            columns = flat[start:start + len(idx)]
            start += len(idx)
            offsets = unit_offsets(grid, self.merge, positions.device)[:, idx.to(positions.device)]
            spatial[:, columns] = spatial[:, columns[:1]] + offsets
        return args, {**kwargs, "position_ids": positions}

    # --- install and undo -------------------------------------------------------------------

    def install(self):
        inner = self.inner
        for name in MODEL_METHODS:
            original = getattr(inner, name)
            wrapper = getattr(self, name)
            setattr(inner, name, _Wrapped(wrapper, original))
        self._handles = [
            inner.register_forward_pre_hook(self.note_prompt, with_kwargs=True),
            inner.language_model.register_forward_pre_hook(self.place_units, with_kwargs=True),
        ]
        visual = inner.visual
        if self.layer is None:
            self._handles.append(
                visual.blocks[-1].register_forward_pre_hook(self.select, with_kwargs=True))
            return
        self._handles.append(visual.blocks[self.layer].register_forward_pre_hook(
            self.select_and_cut, with_kwargs=True))
        for block in visual.blocks[self.layer + 1:]:
            self._handles.append(block.register_forward_pre_hook(self.run_on_kept,
                                                                 with_kwargs=True))
        mergers = [visual.merger]
        # Qwen3-VL's deepstack features of blocks L and after come from the kept patches.
        for index, merger in zip(getattr(visual, "deepstack_visual_indexes", ()),
                                 getattr(visual, "deepstack_merger_list", ())):
            if index >= self.layer:
                mergers.append(merger)
        self._handles += [merger.register_forward_hook(self.spread_units) for merger in mergers]

    def patch_processor(self, processor):
        from .vlm import ATTRIBUTE, remove_image_token_pruning
        remove_image_token_pruning(processor)
        count = QwenPlaceholderCount(processor, self)
        setattr(processor, ATTRIBUTE, count)
        processor.replace_image_token = count.replace_image_token
        processor._get_num_multimodal_tokens = count.num_multimodal_tokens
        self.processors.append(processor)

    def remove(self):
        from .vlm import ATTRIBUTE, remove_image_token_pruning
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in MODEL_METHODS:
            self.inner.__dict__.pop(name, None)
        for processor in self.processors:
            if getattr(processor, ATTRIBUTE, None) is not None:
                remove_image_token_pruning(processor)
        self.processors = []


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


def resolve_layer(layer, inner):
    """The block index that `layer` names in the Qwen-VL tower of `inner`, or ValueError."""
    visual = inner.visual
    depth = len(visual.blocks)
    # The type first: 1.0 is in the range, so a range message would hide what is wrong with it.
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise ValueError(f"layer must be an int (a vision block index in [{-depth}, {depth - 1}]; "
                         f"negative counts from the end), got {type(layer).__name__} {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(f"layer must be a vision block index in [{-depth}, {depth - 1}] (the "
                         f"tower has {depth} blocks; negative counts from the end), got {layer!r}")
    index = int(layer) % depth
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is not None and index not in full:
        raise ValueError(f"layer={layer} is window-attention block {index} of Qwen2.5-VL's "
                         f"vision tower: layer must be one of its full-attention blocks "
                         f"{list(full)} (or {[i - depth for i in full]}), where the selection "
                         f"sees the whole image")
    return index


class _Wrapped:
    """A model method replaced on the instance: `wrapper(original, ...)`. An object holding two
    bound methods rather than a closure, so that copy.deepcopy of the model gives the copy
    wrappers of its own state and its own original methods."""

    def __init__(self, wrapper, original):
        self.wrapper = wrapper
        self.original = original
        # transformers reads a method's signature (through __wrapped__) to route its inputs.
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        return self.wrapper(self.original, *args, **kwargs)


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


def check_processor(processor, model):
    """UnsupportedModelError unless `processor` is a Qwen-VL processor."""
    from .towers import UnsupportedModelError
    name = type(processor).__name__
    if not (name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
            and hasattr(processor, "image_processor")):
        raise UnsupportedModelError(f"prune_image_tokens can patch a Qwen2VLProcessor, "
                                    f"Qwen2_5_VLProcessor or Qwen3VLProcessor for "
                                    f"{type(model).__name__}, got {name}")


def prune_qwen(model, inner, processor, config, ratio,
               layer=None) -> Optional[QwenImageTokenPruning]:
    """Install the pruning on a Qwen-VL model (tokenprune.vlm.prune_image_tokens checked the
    arguments); None when nothing can be pruned (ratio 1)."""
    from .vlm import ATTRIBUTE, remove_image_token_pruning
    index = None if layer is None else resolve_layer(layer, inner)
    if processor is not None:
        check_processor(processor, model)
    remove_image_token_pruning(model)
    state = QwenImageTokenPruning(model, inner, config, ratio, index)
    if ratio == 1:
        return None
    state.install()
    setattr(model, ATTRIBUTE, state)
    if processor is not None:
        state.patch_processor(processor)
    return state
