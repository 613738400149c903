"""LLaVA-NeXT (SPEC.md, "Image tokens for LLaVA-NeXT and LLaVA-OneVision"): LLaVA-1.5's selection
(llava.py) made on every tile of an any-resolution image, and the language model's image rows cut
to the kept patches, every newline row kept, each kept row at its unpruned position.

An image reaches the vision tower as tiles: the whole image resized (the base tile), then the
crops of its tile grid. transformers packs the feature layer's rows per image: the base tile's
patches, then the crop grid without its padding (unpadded), row by row, each row followed by the
`image_newline` row. What tokenprune adds, on the one model object:
- `get_image_features` (an instance attribute wrapping the class's) works out each image's rows
  from its size alone (ImageLayout: which patches of which tile reach the language model, and at
  which row), runs the tower, during which a forward pre-hook on the feature block selects each
  tile's kept patches from its input and q/k, and then cuts each image's packed rows to the kept
  patches and the newline rows. The kept rows travel with the features (KEPT_ROWS), so that a
  generate, which encodes the images before the prefill, finds them again.
- A forward pre-hook on the *Model runs the tower on pixel_values itself (the class's forward
  then takes the features as `mm_encoder_outputs`, as generate passes them), refuses prompts
  with another count of placeholders in one line, and makes the call's ImagePositions; a forward
  pre-hook on the language model adds to every token's position the image rows dropped before
  it, so that it receives the position it has without pruning; each prompt's whole shift is
  kept on the cache, for the decoding steps.
llava_onevision.py subclasses this for LLaVA-OneVision (images of several-image prompts as one
tile, crop grids that transformers downsamples, video).
"""
import inspect
from contextvars import ContextVar

import torch

from ..selection import select_tokens
from ..towers import UnsupportedModelError, block_adapter
from .base import attach_per_image, per_image
from .llava import LlavaImageTokenPruning

# The attribute of an image-features output that pairs each image's rows with its kept rows.
KEPT_ROWS = "tokenprune_kept_rows"
# The attribute of a language model's cache that holds, per batch row, the image rows dropped
# from its prompt (the position shift of every token after the prompt).
SHIFT = "_tokenprune_position_shift"
# The tiles the tower is encoding in this thread or task (set by get_image_features for its
# call), and the *Model call under way (set and ended by that model's hooks).
TILES = ContextVar("tokenprune_llava_next_tiles", default=None)
CALL = ContextVar("tokenprune_llava_next_call", default=None)


class Tile:
    """One tower image: `candidates` the tower rows (token indices) of its patches that are
    units (each reaches the language model as a row of its own), ascending; `rows` the image's
    language-model rows they are; `kept` how many of them the selection keeps."""

    def __init__(self, candidates, rows, kept):
        self.candidates = candidates
        self.rows = rows
        self.kept = kept


class ImageLayout:
    """One image's language-model rows, from its size alone: `rows` of them without pruning,
    `tiles` its tower images in the tower's order, `always` the rows kept whatever the
    selection (the newline rows)."""

    def __init__(self, rows, tiles, always):
        self.rows = rows
        self.tiles = tiles
        self.always = always

    @property
    def kept(self):
        """The rows the language model receives: the image's placeholder count."""
        return sum(tile.kept for tile in self.tiles) + len(self.always)

    def kept_rows(self, keeps):
        """The kept rows, ascending, (kept,) int64, given each tile's kept tower rows."""
        rows = [self.always]
        for tile, keep in zip(self.tiles, keeps):
            rows.append(tile.rows[torch.searchsorted(tile.candidates, keep.cpu())])
        return torch.cat(rows).sort().values


def unpadded(height, width, grid_h, grid_w):
    """(top, bottom, left, right): the patches of a grid_h x grid_w crop grid that hold the
    image of `height` x `width` px, as transformers' unpad_image keeps them."""
    if width / height > grid_w / grid_h:
        pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        return pad, grid_h - pad, 0, grid_w
    pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
    return 0, grid_h, pad, grid_w - pad


class LlavaNextImageTokenPruning(LlavaImageTokenPruning):
    """The pruning of one LLaVA-NeXT model: what `prune_image_tokens` installed and how to undo
    it. `tokenprune.pruned_block(model)` returns it.

    `last_keep_idx`: per image of the last image batch, a 1-D int64 tensor of the language-model
    rows it kept (indices into the image's rows without pruning, ascending: the base tile's
    patches, then the unpadded crop grid row by row with its newline rows); None before the
    first image. `layout(height, width)`: an image's ImageLayout, whose `kept` is its
    placeholder count. `selection_config` and `image_seq_length` are None: the counts differ
    per tile and per image.
    """

    model_type = "llava_next"
    name = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    processor_classes = ("LlavaNextProcessor",)

    def __init__(self, model, inner, config, ratio, tower, block_index, num_prefix, strategy,
                 num_tokens):
        super().__init__(model, inner, config, ratio, None, tower, block_index, num_prefix,
                         strategy, num_tokens, None)
        vision = model.config.vision_config
        self.tile_px = vision.image_size
        self.side = vision.image_size // vision.patch_size  # patches per tile side
        self.pinpoints = model.config.image_grid_pinpoints
        self.image_token_id = model.config.image_token_id
        self._generator = torch.Generator().manual_seed(config.seed)

    @property
    def prunes(self):
        patches = self.side * self.side
        return self.kept(patches) < patches

    # --- the rows of an image ---------------------------------------------------------------

    def layout(self, height, width, patched=True):
        """The ImageLayout of an image of `height` x `width` px; `patched` False: the image is
        its base tile alone (LLaVA-OneVision's images in a prompt of several)."""
        side, prefix = self.side, self.num_prefix
        patches = side * side
        base = Tile(prefix + torch.arange(patches), torch.arange(patches), self.kept(patches))
        if not patched:
            return ImageLayout(patches + 1, [base], torch.tensor([patches]))
        from transformers.image_processing_utils import select_best_resolution
        best_h, best_w = select_best_resolution([height, width], self.pinpoints)
        tiles_h, tiles_w = best_h // self.tile_px, best_w // self.tile_px
        top, bottom, left, right = unpadded(height, width, tiles_h * side, tiles_w * side)
        # Each row of the crop grid that the language model receives (a cell), by the patch
        # it comes from: its row and column in the unpadded grid.
        ys, xs = self.cells(bottom - top, right - left)
        r, c = top + ys[:, None].expand(-1, len(xs)), left + xs[None, :].expand(len(ys), -1)
        tile = (r // side) * tiles_w + c // side
        token = prefix + (r % side) * side + c % side
        width = len(xs) + 1  # a row of cells and its newline row
        row = patches + torch.arange(len(ys))[:, None] * width + torch.arange(len(xs))[None, :]
        tiles = [base]
        for t in range(tiles_h * tiles_w):  # raster order: each tile's tokens ascend
            at = tile == t
            tiles.append(Tile(token[at], row[at], self.kept(int(at.sum()))))
        newlines = patches + torch.arange(len(ys)) * width + len(xs)
        return ImageLayout(patches + len(ys) * width, tiles, newlines)

    def cells(self, grid_h, grid_w):
        """((rows,), (columns,)) int64: for each row and each column of cells the language model
        receives from a grid_h x grid_w unpadded crop grid, the row and the column of the patch
        each comes from; LLaVA-NeXT: every patch is a cell."""
        return torch.arange(grid_h), torch.arange(grid_w)

    def layouts(self, image_sizes, options):
        """The ImageLayout of each image of a call, from image_sizes (images, 2) and the call's
        other arguments (`options`, the keywords of get_image_features)."""
        return [self.layout(int(h), int(w)) for h, w in image_sizes.tolist()]

    # --- the vision side --------------------------------------------------------------------

    def check_call(self, options):
        """A feature layer, strategy or aspect rule given per call, other than the config's
        that prune_image_tokens was set up for, is refused."""
        for name in ("vision_feature_layer", "vision_feature_select_strategy",
                     "vision_aspect_ratio"):
            given = options.get(name)
            configured = getattr(self.model.config, name, None)
            if given is not None and given != configured:
                raise ValueError(f"{name}={given!r} was given per call, but prune_image_tokens "
                                 f"was set up for the config's {configured!r}: set it in the "
                                 f"model's config before prune_image_tokens, not per call")

    def get_image_features(self, original, pixel_values, image_sizes, *args, **kwargs):
        self.check_call(kwargs)
        layouts = self.layouts(image_sizes, kwargs)
        call = TileSelection(self, [tile for layout in layouts for tile in layout.tiles])
        as_tuple = kwargs.get("return_dict") is False
        token = TILES.set(call)
        try:
            output = original(pixel_values, image_sizes, *args, **{**kwargs, "return_dict": True})
        finally:
            TILES.reset(token)
        if call.keep is None:
            raise RuntimeError("the vision tower's feature block did not run: tokenprune cannot "
                               "tell which image tokens to keep")
        keeps, kept = iter(call.keep), []
        for layout in layouts:
            kept.append(layout.kept_rows([next(keeps) for _ in layout.tiles]))
        output.pooler_output = [rows.index_select(0, idx.to(rows.device))
                                for rows, idx in zip(output.pooler_output, kept)]
        attach_per_image(output, KEPT_ROWS, kept, [layout.rows for layout in layouts])
        self.last_keep_idx = kept
        return output.to_tuple() if as_tuple else output

    def select(self, block, args, kwargs):
        """Forward pre-hook of the feature block: each tile's kept patches, by SPEC's selection
        on the tile's prefix rows and candidate patches (their rows of the block input and of
        its q/k), as LLaVA-1.5 selects on a whole image."""
        call = TILES.get()
        if call is None or call.owner is not self:  # OneVision's video frames, say
            return
        x, qkv = self.block_input(args, kwargs)
        if x.shape[0] != len(call.tiles):
            raise ValueError(f"the vision tower got {x.shape[0]} tiles where the image sizes "
                             f"give {len(call.tiles)}")
        keep = [tile.candidates[:tile.kept] for tile in call.tiles]  # all, or none
        groups = {}
        for index, tile in enumerate(call.tiles):
            if 0 < tile.kept < len(tile.candidates):
                groups.setdefault(tuple(tile.candidates.tolist()), []).append(index)
        prefix = torch.arange(self.num_prefix)
        with torch.no_grad():
            for candidates, indices in groups.items():
                tile = call.tiles[indices[0]]
                rows = torch.cat([prefix, tile.candidates]).to(x.device)
                at = torch.tensor(indices, device=x.device)
                chosen = select_tokens(x[at][:, rows], qkv[at][:, rows], self.adapter.num_heads,
                                       self.config.selection_config(tile.kept), self.num_prefix,
                                       self.class_token, self.adapter.scale, self._generator)
                for index, local in zip(indices, chosen.cpu()):
                    keep[index] = tile.candidates[local - self.num_prefix]
        call.keep = keep

    # --- the language model's side -----------------------------------------------------------

    def encode(self, inner, kwargs):
        """The forward's images encoded as its class would (kwargs: the forward's arguments by
        name), into kwargs' mm_encoder_outputs; pixel_values then None."""
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        encoded["image"] = inner.get_image_features(
            kwargs["pixel_values"], kwargs.get("image_sizes"),
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            return_dict=True, **self.image_options(kwargs))
        kwargs.update(pixel_values=None, mm_encoder_outputs=encoded)

    def image_options(self, kwargs):
        """get_image_features' family keywords from the forward's arguments."""
        return {}

    def begin_call(self, inner, args, kwargs):
        """Forward pre-hook of the *Model: with images, their features (the tower runs here when
        pixel_values are given), the placeholder count checked, and the call's ImagePositions."""
        names = list(inspect.signature(type(inner).forward).parameters)[1:]  # after self
        kwargs = {**dict(zip(names, args)), **kwargs}
        input_ids = kwargs.get("input_ids")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None and encoded is None:
            return None  # text alone, or a decoding step with a cache
        if input_ids is None:
            raise ValueError("prune_image_tokens needs input_ids with pixel_values (it finds the "
                             "image placeholders there), got inputs_embeds only")
        slots = input_ids == self.image_token_id
        if encoded is None:  # refused before the tower runs
            layouts = self.layouts(kwargs["image_sizes"], kwargs)
            self.check_placeholders_written(slots, [layout.kept for layout in layouts],
                                            [layout.rows for layout in layouts])
            self.encode(inner, kwargs)
            encoded = kwargs["mm_encoder_outputs"]["image"]
        images = per_image(encoded, KEPT_ROWS, "rows")
        self.check_placeholders_written(slots, [len(rows) for rows, _ in images],
                                        [n for _, n in images])
        CALL.set(ImagePositions(self, slots, images))
        return (), kwargs

    def check_placeholders_written(self, slots, counts, unpruned):
        written = int(slots.sum())
        if written == sum(counts):
            return
        hint = (" (the unpruned count: was the processor patched?)"
                if written == sum(unpruned) else "")
        raise ValueError(f"the prompts hold {written} image tokens for {len(counts)} images"
                         f"{hint}, but the pruned model gives {sum(counts)} ({counts} per image, "
                         f"from their sizes): pass the processor to prune_image_tokens(model, "
                         f"processor, ...) so that it writes the pruned count")

    def end_call(self, inner, args, kwargs, output):
        """Forward hook of the *Model (also when it raised): the call's positions are done."""
        if getattr(CALL.get(), "owner", None) is self:
            CALL.set(None)

    def place(self, language_model, args, kwargs):
        """Forward pre-hook of the language model: every token's position plus the image rows
        dropped before it in its prompt (with a cache, the later steps' from the cache)."""
        call = CALL.get()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        B, L = embeds.shape[:2]
        device = embeds.device
        if call is not None and call.owner is self:
            shift, total = call.shifts()
            call.total = total
            if cache is not None:
                setattr(cache, SHIFT, total)
        elif getattr(cache, SHIFT, None) is not None:
            shift = getattr(cache, SHIFT)[:, None].expand(-1, L)
        else:
            return None
        positions = kwargs.get("position_ids")
        if positions is None:  # what the language model would count
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + L, device=device)[None]
        kwargs = {**kwargs, "position_ids": positions + shift.to(device)}
        if kwargs.get("attention_mask") is None and cache is None:
            # Positions with gaps and no mask would read as packed sequences.
            kwargs["attention_mask"] = torch.ones(B, L, dtype=torch.long, device=device)
        return args, kwargs

    def keep_shift(self, language_model, args, kwargs, output):
        """Forward hook of the language model: a cache it made itself gets the call's shift."""
        call = CALL.get()
        if call is None or call.owner is not self:
            return
        # transformers 5.19 calls it past_key_values (5.25 warns when that name is read).
        name = next((name for name in ("cache", "past_key_values") if name in output.keys()),
                    None)
        if name is not None and output[name] is not None:
            setattr(output[name], SHIFT, call.total)

    # --- install and undo ---------------------------------------------------------------------

    def install_hooks(self):
        inner = self.inner
        self.adapter = block_adapter(self.tower.blocks[self.block_index])
        self.wrap_method("get_image_features")
        self.hook(inner, self.begin_call, with_kwargs=True)
        self.hook(inner, self.end_call, post=True, with_kwargs=True, always_call=True)
        self.hook(self.tower.blocks[self.block_index], self.select, with_kwargs=True)
        self.hook(inner.language_model, self.place, with_kwargs=True)
        self.hook(inner.language_model, self.keep_shift, post=True, with_kwargs=True)

    def restore(self):
        pass  # nothing in the config changed

    def placeholder_count(self, processor):
        return NextPlaceholderCount(processor, self)

    def check_processor(self, processor):
        super().check_processor(processor)
        given = processor.image_processor.image_grid_pinpoints
        if [list(p) for p in given] != [list(p) for p in self.pinpoints]:
            raise ValueError(f"the processor's image_grid_pinpoints {given} are not the model's "
                             f"{self.pinpoints}: the placeholder counts would not match")

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        tower, strategy, block_index, num_prefix, num_tokens = cls.feature_block(model, inner)
        if tower.class_token != (strategy == "default"):
            raise UnsupportedModelError(
                f"{cls.name}'s tiles need vision_feature_select_strategy='default' with a tower "
                f"that has a class token (CLIP) or 'full' with one that has none (SigLIP), so "
                f"that a tile's rows are its patches; got {strategy!r} with a "
                f"{type(inner.vision_tower).__name__}")
        state = cls(model, inner, config, ratio, tower, block_index, num_prefix, strategy,
                    num_tokens)
        if processor is not None:
            state.check_processor(processor)
        if not state.prunes:
            patches = state.side ** 2
            how = (f"k_anchors + top_m = {config.kept_patches} >=" if ratio is None
                   else f"ratio={ratio} keeps all")
            return f"{how} {patches} patch tokens of a tile"
        return state


class TileSelection:
    """One get_image_features call's tiles, in the tower's order (`owner` the pruning whose
    model runs), and `keep`, each tile's kept tower rows, once the feature block has run."""

    def __init__(self, owner, tiles):
        self.owner = owner
        self.tiles = tiles
        self.keep = None


class ImagePositions:
    """One *Model call's images: `owner` the pruning whose model runs, `slots` (B, L) bool where
    the prompts' image placeholders are, `images` each image's (kept rows, rows without pruning)
    in placeholder order; `total` (B,), once known, the rows each prompt dropped."""

    def __init__(self, owner, slots, images):
        self.owner = owner
        self.slots = slots
        self.images = images
        self.total = None

    def shifts(self):
        """((B, L), (B,)) int64: the image rows dropped before each token of the prompts (a kept
        row: those of its own image before it too), and in each whole prompt."""
        B, length = self.slots.shape
        step = torch.zeros(B * length, dtype=torch.long)
        total = torch.zeros(B, dtype=torch.long)
        flat = self.slots.reshape(-1).nonzero().squeeze(1).cpu()
        start = 0
        for rows, n in self.images:
            columns = flat[start:start + len(rows)]
            start += len(rows)
            before = rows.cpu() - torch.arange(len(rows))  # dropped rows of the image before it
            step[columns] += torch.diff(before, prepend=torch.zeros(1, dtype=torch.long))
            after = int(columns[-1]) + 1
            if after % length:
                step[after] += n - len(rows) - int(before[-1])
            total[int(columns[0]) // length] += n - len(rows)
        return step.view(B, length).cumsum(dim=1), total


class NextPlaceholderCount:
    """A patched LLaVA-NeXT processor's placeholder count: each image's ImageLayout.kept, from
    its size (and, for LLaVA-OneVision, whether its prompt holds several images)."""

    def __init__(self, processor, state):
        self.state = state
        self.image_token = processor.image_token
        self.original_num_multimodal_tokens = processor._get_num_multimodal_tokens

    def patched(self, image_inputs, image_idx):
        """Whether the image is cut into tiles (LLaVA-NeXT: always)."""
        return True

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        layout = self.state.layout(height, width, self.patched(image_inputs, image_idx))
        return self.image_token * layout.kept

    def num_multimodal_tokens(self, image_sizes=None, *args, **kwargs):
        data = self.original_num_multimodal_tokens(image_sizes, *args, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.state.layout(int(h), int(w)).kept
                                     for h, w in image_sizes]
        return data

