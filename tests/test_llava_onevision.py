"""prune_image_tokens on tiny random-weight LLaVA-NeXT and LLaVA-OneVision models
(tools/tiny_llava_next.py, made offline): SPEC.md, "Image tokens for LLaVA-NeXT and
LLaVA-OneVision".

Every expectation is computed from the unpatched model: what its language model receives on the
unpruned prompt (recorded by a forward pre-hook), with the dropped image rows taken out using the
kept rows the pruned model reports, and which tile patch each language-model row comes from, read
off the unpatched `pack_image_features` run on marker features. It is never the pruned model
against itself.

Tiny shapes: 32-px tiles in 8-px patches (16 a tile), 2 vision blocks of width 32, a 2-layer
language model of width 32. The batch: three left-padded prompts with four images of different
sizes and tile grids (the second prompt holds two images; LLaVA-OneVision encodes those as one
tile each), with padded tiles that unpadding cuts to 12, 8 or 4 patches, and for LLaVA-OneVision
a 4 x 4 crop grid that transformers downsamples.
"""
import math

import numpy as np
import pytest
import torch

from tokenprune import UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaOnevisionForConditionalGeneration"):
    pytest.skip("this transformers has no LLaVA-OneVision", allow_module_level=True)
from helpers import processor_inputs, run_main  # noqa: E402
from tiny_llava_next import FAMILIES, build_llava_next, save_llava_next  # noqa: E402

PROMPTS = ["USER: <image>\nwhat is this ? ASSISTANT:",
           "USER: <image>\n<image>\nhow many red cats are in the left picture ? ASSISTANT:",
           "USER: <image>\ndescribe the picture ASSISTANT:"]
# (height, width) px of the images of PROMPTS, in order. LLaVA-NeXT: tile grids 2 x 2 (rows
# cut to 12 patches), 2 x 1 (columns cut), 2 x 2 (whole), 1 x 3 (8 patches a tile). The last
# one of LLaVA-OneVision: 4 x 4 tiles, a 16 x 16 grid that transformers downsamples to 12 x 12.
SIZES = {"llava_next": [(40, 60), (70, 30), (50, 50), (20, 90)],
         "llava_onevision": [(40, 60), (70, 30), (50, 50), (120, 128)]}
PER_PROMPT = [[0], [1, 2], [3]]
STEPS = 3  # new tokens: the prefill and two decoding steps


@pytest.fixture(scope="module")
def llava():
    """get(family) -> (model, processor, images per prompt), built once per module."""
    built = {}

    def get(family):
        if family not in built:
            model, processor = build_llava_next(family, "tiny", seed=0)
            rng = np.random.default_rng(0)
            images = [Image_from(rng, size) for size in SIZES[family]]
            built[family] = model, processor, [[images[i] for i in p] for p in PER_PROMPT]
        return built[family]
    return get


def Image_from(rng, size):
    from PIL import Image
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def inputs(processor, images, prompts=PROMPTS, side="left"):
    """The processor's batch of `prompts` with `images` (a list per prompt)."""
    return processor_inputs(processor, images, prompts, side)


def record(model, run):
    """run() with a forward pre-hook on the language model (registered now, so after any pruning
    hook): what it received at each call, (inputs_embeds, position_ids), and run()'s result."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["inputs_embeds"].detach().clone(), kwargs["position_ids"].clone()))
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return seen, run()
    finally:
        handle.remove()


def generate(model, batch, use_cache=True):
    return model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                          use_cache=use_cache)


def kept_columns(batch, image_token_id, keep, rows):
    """Per prompt of an unpruned batch, the columns the pruned prompt keeps, in order: its real
    tokens minus the image rows not kept (`keep`: each image's kept rows, `rows`: its rows
    without pruning, in placeholder order; two images may be adjacent)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    images, columns = iter(zip(keep, rows)), []
    for b in range(len(ids)):
        real = mask[b].nonzero().squeeze(1).tolist()
        kept, i = [], 0
        while i < len(real):
            if ids[b, real[i]] != image_token_id:
                kept.append(real[i])
                i += 1
                continue
            idx, n = next(images)
            kept += [real[i + r] for r in idx.tolist()]
            i += n
        columns.append(kept)
    return columns


def expect(model, processor, images, keep):
    """What the unpatched model's language model receives on the unpruned prompts (recorded at
    generate's prefill) at the columns the pruned prompts keep: per prompt (rows, positions,
    largest position), and each image's rows without pruning. Called with the model unpatched."""
    full = inputs(processor, images)
    seen, _ = record(model, lambda: generate(model, full))
    embeds, positions = seen[0]
    rows = image_rows(model, full)
    assert sum(rows) == int((full["input_ids"] == model.config.image_token_id).sum())
    mask = full["attention_mask"].bool()
    expected = [(embeds[b, cols], positions[b, cols], int(positions[b, mask[b]].max()))
                for b, cols in enumerate(kept_columns(full, model.config.image_token_id, keep,
                                                      rows))]
    return expected, rows


def image_rows(model, batch):
    """Each image's rows without pruning, from the unpatched model's own features."""
    options = {"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch \
        else {}
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                  **options)
    return [len(rows) for rows in features.pooler_output]


def check(seen, expected, pruned, out, model, use_cache):
    """The language model's inputs at the prefill and each step against the expectation."""
    mask = pruned["attention_mask"].bool()
    length = mask.shape[1]
    embed = model.get_input_embeddings()
    new = out[:, length:]
    assert len(seen) == STEPS
    for b, (rows, positions, last) in enumerate(expected):
        real = mask[b].nonzero().squeeze(1)
        embeds, ids = seen[0]
        assert torch.equal(embeds[b, real], rows), f"prefill rows of prompt {b}"
        assert torch.equal(ids[b, real], positions), f"prefill positions of prompt {b}"
        for step in range(1, STEPS):
            embeds, ids = seen[step]
            with torch.no_grad():
                tokens = embed(new[b, :step])
            want = last + 1 + torch.arange(step)
            if use_cache:  # only the token generated at the step before
                assert ids[b].tolist() == [last + step], f"step {step} of prompt {b}"
                assert torch.equal(embeds[b], tokens[-1:]), f"step {step} of prompt {b}"
            else:  # the whole sequence again: the prompt, then the tokens generated so far
                assert torch.equal(ids[b, real], positions) and torch.equal(
                    embeds[b, real], rows), f"step {step} of prompt {b}, the prompt"
                assert torch.equal(ids[b, length:], want), f"step {step} of prompt {b}"
                assert torch.equal(embeds[b, length:], tokens), f"step {step} of prompt {b}"


@pytest.mark.parametrize("how, use_cache", [
    (dict(ratio=0.3), True), (dict(ratio=0.3), False),
    (dict(k_anchors=2, top_m=3, selection="score"), True),
    (dict(ratio=0.5, selection="random"), False)],
    ids=["mmr-ratio-cache", "mmr-ratio-no_cache", "score-cache", "random-no_cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_language_model_receives_the_unpruned_rows_at_their_positions(llava, family, how,
                                                                         use_cache):
    """At the prefill: each kept image row and every text row equal to the unpatched model's,
    in its order, at its unpruned position; at each decoding step the generated token at the
    unpruned prompt's largest position + 1 + step (without a cache, the whole sequence again)."""
    model, processor, images = llava(family)
    prune_image_tokens(model, processor, **how)
    try:
        pruned = inputs(processor, images)
        seen, out = record(model, lambda: generate(model, pruned, use_cache))
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    expected, rows = expect(model, processor, images, keep)
    check(seen, expected, pruned, out, model, use_cache)
    # Some image dropped a row before one it kept, and no image kept all its rows: a row placed
    # by its order alone, or a position counted on the pruned prompt, would fail above.
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in keep)
    assert all(len(idx) < n for idx, n in zip(keep, rows))


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_and_several_returned_sequences_keep_the_unpruned_positions(llava, family):
    """generate expands each prompt (two beams, two returned sequences) after it encoded the
    images: every copy receives its prompt's kept rows at their unpruned positions."""
    model, processor, images = llava(family)
    prune_image_tokens(model, processor, ratio=0.3)
    try:
        pruned = inputs(processor, images)
        seen, _ = record(model, lambda: model.generate(
            **pruned, max_new_tokens=STEPS, min_new_tokens=STEPS, num_beams=2,
            num_return_sequences=2, do_sample=False))
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    expected, _ = expect(model, processor, images, keep)
    mask = pruned["attention_mask"].bool().repeat_interleave(2, dim=0)
    embeds, ids = seen[0]
    assert len(ids) == 2 * len(expected)
    for row, real in enumerate(mask):
        rows, positions, _ = expected[row // 2]
        assert torch.equal(ids[row, real], positions) and torch.equal(embeds[row, real], rows)
    last = torch.tensor([e[2] for e in expected]).repeat_interleave(2)
    for step in range(1, STEPS):
        assert torch.equal(seen[step][1][:, 0], last + step), f"step {step}"


def language_model_logits(model, rows, positions):
    """The unpatched language model and head on the given rows at the given positions, one
    prompt at a time."""
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=rows[None], position_ids=positions[None],
            attention_mask=torch.ones(1, len(rows), dtype=torch.long)).last_hidden_state
        return model.lm_head(hidden)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_unpatched_language_model_on_the_kept_rows(llava, family):
    """A forward pass, right-padded: the logits at every real token are those of the unpatched
    language model on the kept rows at their unpruned positions. The same rows with two kept
    image rows' positions swapped give other logits: the comparison notices a wrong position."""
    model, processor, images = llava(family)
    prune_image_tokens(model, processor, ratio=0.4, selection="cls")
    try:
        pruned = inputs(processor, images, side="right")
        with torch.no_grad():
            logits = model(**pruned).logits
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    expected, _ = expect(model, processor, images, keep)
    slots = pruned["input_ids"] == model.config.image_token_id
    for b, (rows, positions, _) in enumerate(expected):
        real = pruned["attention_mask"][b].bool()
        want = language_model_logits(model, rows, positions)
        torch.testing.assert_close(logits[b, real], want, atol=1e-5, rtol=1e-5)
        image = slots[b, real].nonzero().squeeze(1)
        swapped = positions.clone()
        swapped[image[[1, -2]]] = positions[image[[-2, 1]]]
        wrong = language_model_logits(model, rows, swapped)
        assert not torch.allclose(logits[b, real], wrong, atol=1e-4, rtol=1e-4)


def sources(model, image_sizes, patched):
    """Per image: (each of its rows' source (rows, 2): tile and patch, or (-1, -1) for a newline
    row; its tile count), read off the unpatched pack_image_features run on marker features
    (each patch's tile, patch index, and row and column in the crop grid). A grid that
    LLaVA-OneVision downsamples blends the markers: its cells are read from the same grid packed
    without downsampling, each at the patch nearest to where its blend samples (exactly; the
    lower on a tie), which its blended row and column confirm."""
    from fractions import Fraction

    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches)
    config = model.config
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    markers, tiles = [], []
    for size, alone in zip(image_sizes, patched):
        n = image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if alone else 1
        across = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)[1]
        t, p = torch.meshgrid(torch.arange(n), torch.arange(side * side), indexing="ij")
        crop = (t - 1).clamp(min=0)
        y, x = crop // across * side + p // side, crop % across * side + p % side
        markers.append(torch.stack([t, p, y, x], dim=-1).float())
        tiles.append(n)
    newline, sizes = torch.full((4,), -1.0), torch.tensor(image_sizes)

    def pack(aspect):
        if config.model_type == "llava_next":
            return model.model.pack_image_features(markers, sizes, "default", newline)[0]
        return model.model.pack_image_features(markers, sizes, newline, aspect)[0]
    packed = pack(getattr(config, "vision_aspect_ratio", None))
    whole = pack("anyres_max_1000000")  # never downsampled
    found = []
    for rows, grid, n in zip(packed, whole, tiles):
        source = rows[:, :2].clone()
        if len(rows) != len(grid):  # downsampled
            base = side * side
            h1 = int((grid[:, 0] < 0).sum())
            cells = grid[base:].view(h1, -1, 4)[:, :-1]       # the grid without downsampling
            h2 = int((rows[:, 0] < 0).sum())
            blended = rows[base:].view(h2, -1, 4)[:, :-1]
            picked = []
            for axis, size, out in ((0, h1, h2), (1, cells.shape[1], blended.shape[1])):
                where = [Fraction((2 * i + 1) * size - out, 2 * out) for i in range(out)]
                at = cells[0, 0, 2 + axis] + torch.tensor([float(w) for w in where])
                got = blended[..., 2 + axis] if axis else blended[..., 2].T
                torch.testing.assert_close(got, at.expand_as(got), atol=1e-4, rtol=0)
                picked.append([int(w) + (w - int(w) > Fraction(1, 2)) for w in where])
            chosen = cells[picked[0]][:, picked[1], :2]
            source[base:].view(h2, -1, 2)[:, :-1] = chosen
        found.append((source.long(), n))
    return found


def kept_by_hand(n, ratio):
    """ceil(ratio * n), a product within 1e-6 of an integer taken as that integer."""
    product = ratio * n
    return round(product) if abs(product - round(product)) <= 1e-6 else math.ceil(product)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cls_selection_keeps_each_tiles_most_attended_patches(llava, family):
    """Computed here from the feature block's captured input, with its own q/k projections: per
    tile, the ceil(0.3 n) of its n patches that reach the language model with the largest
    anchor score (LLaVA-NeXT's CLIP: the class token's attention, softmax over all the tile's
    tokens; LLaVA-OneVision's SigLIP: the attention each patch receives from those patches,
    softmax over them alone), plus every newline row."""
    model, processor, images = llava(family)
    layers = model.model.vision_tower.encoder.layers
    block = layers[model.config.vision_feature_layer % (len(layers) + 1) - 1]
    captured = {}

    def capture(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        prune_image_tokens(model, processor, ratio=0.3, selection="cls")
        with torch.no_grad():
            model(**inputs(processor, images))
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    x = captured["x"]
    attn = block.self_attn
    with torch.no_grad():
        y = block.layer_norm1(x)
        q, k = (proj(y).view(*x.shape[:2], attn.num_heads, -1) for proj in (attn.q_proj,
                                                                              attn.k_proj))
    class_token = family == "llava_next"
    patched = [True] * 4 if family == "llava_next" else [True, False, False, True]
    sizes = [(image.height, image.width) for prompt in images for image in prompt]
    first = 0
    for (rows, tiles), idx in zip(sources(model, sizes, patched), keep):
        expected = [r for r in range(len(rows)) if rows[r, 0] < 0]  # the newline rows
        for t in range(tiles):
            at = (rows[:, 0] == t).nonzero().squeeze(1)      # the tile's rows, in row order
            patches = rows[at, 1] + (1 if class_token else 0)  # their tokens in the tower
            qt, kt = q[first + t], k[first + t]
            if class_token:  # the class token's row, softmax over every token of the tile
                P = torch.einsum("hd,jhd->hj", qt[0], kt) * attn.scale
                a = P.softmax(dim=-1).mean(dim=0)[patches]
            else:  # received from the tile's reaching patches, softmax over them
                P = torch.einsum("ihd,jhd->hij", qt[patches], kt[patches]) * attn.scale
                a = P.softmax(dim=-1).mean(dim=0).mean(dim=0)
            order = torch.sort(patches).indices  # ties to the lower token
            best = order[torch.sort(a[order], descending=True, stable=True).indices]
            expected += at[best[:kept_by_hand(len(at), 0.3)]].tolist()
        first += tiles
        assert idx.tolist() == sorted(expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_processor_writes_each_images_count_from_its_size(llava, family):
    """Placeholders per image: of each tile's n patches that reach the language model (counted
    here from the markers), ceil(0.3 n) (or with k_anchors + top_m = 5, min(5, n)), plus the
    newline rows (LLaVA-OneVision's downsampled grid: each tile's cells, by their patches).
    Unpatched, the processor writes each image's rows; tokenprune's layout of an image has as
    many rows as transformers' processor counts, on sizes from 8 to 139 px a side."""
    model, processor, images = llava(family)
    sizes = [(image.height, image.width) for prompt in images for image in prompt]
    patched = [True] * 4 if family == "llava_next" else [True, False, False, True]
    per_image = sources(model, sizes, patched)
    written = (inputs(processor, images)["input_ids"] == model.config.image_token_id).sum(1)
    assert written.tolist() == [sum(len(per_image[i][0]) for i in p) for p in PER_PROMPT]
    for how, per_tile in ((dict(ratio=0.3), lambda n: kept_by_hand(n, 0.3)),
                          (dict(k_anchors=2, top_m=3), lambda n: min(5, n))):
        expected = []
        for rows, tiles in per_image:
            counts = torch.bincount(rows[:, 0] + 1, minlength=tiles + 1)  # newlines, tiles
            expected.append(int(counts[0]) + sum(per_tile(int(n)) for n in counts[1:]))
        prune_image_tokens(model, processor, **how)
        try:
            pruned = (inputs(processor, images)["input_ids"]
                      == model.config.image_token_id).sum(1)
            counted = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            state = pruned_block(model)
            for h, w in [(h, w) for h in range(8, 140, 9) for w in range(8, 140, 13)]:
                unpatched = type(processor)._get_num_multimodal_tokens(processor,
                                                                       image_sizes=[(h, w)])
                assert state.layout(h, w).rows == unpatched.num_image_tokens[0], (h, w)
        finally:
            remove_pruning(model)
        assert pruned.tolist() == [sum(expected[i] for i in p) for p in PER_PROMPT], how
        # The processor's method counts every image as one alone in its prompt (cut into tiles).
        alone = [e for e, cut in zip(expected, patched) if cut]
        assert [c for c, cut in zip(counted, patched) if cut] == alone, how


@pytest.mark.parametrize("family, selection", [("llava_next", "mmr"),
                                               ("llava_onevision", "score")])
def test_the_triton_backend_keeps_the_rows_the_reference_keeps(llava, family, selection):
    """The kernels (here under Triton's CPU interpreter, as tests/conftest.py sets it, so two
    cases only) on every tile group: the CLIP class-token and the SigLIP no-class-token paths."""
    model, processor, images = llava(family)
    batch = inputs(processor, images)
    keeps = {}
    for backend in ("reference", "triton"):
        prune_image_tokens(model, ratio=0.3, selection=selection, backend=backend)
        try:
            with torch.no_grad():
                model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                               **({"batch_num_images": batch["batch_num_images"]}
                                                  if "batch_num_images" in batch else {}))
            keeps[backend] = pruned_block(model).last_keep_idx
        finally:
            remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps["triton"], keeps["reference"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_is_a_bit_identical_no_op(llava, family):
    model, processor, images = llava(family)
    images = images[:2]
    batch = inputs(processor, images, PROMPTS[:2])
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.warns(UserWarning, match="ratio=1.0 keeps all 16 patch tokens of a tile: "
                                         "nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None
    assert "get_image_features" not in model.model.__dict__
    assert not model.model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks
    again = inputs(processor, images, PROMPTS[:2])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_pruning_restores_model_and_processor(llava, family):
    model, processor, images = llava(family)
    batch = inputs(processor, images)
    with torch.no_grad():
        before = model(**batch).logits
        cached = generate(model, batch)
    state, config = model.state_dict(), model.config.to_dict()
    prune_image_tokens(model, k_anchors=2, top_m=2)
    prune_image_tokens(model, processor, ratio=0.3)  # replaces the first pruning
    blocks = model.model.vision_tower.encoder.layers
    assert sum(len(block._forward_pre_hooks) for block in blocks) == 1
    with torch.no_grad():
        generate(model, inputs(processor, images))
    remove_pruning(model)  # the processor patched with it too
    inner = model.model
    assert "get_image_features" not in inner.__dict__
    assert not any(block._forward_pre_hooks for block in blocks)
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    assert not inner.language_model._forward_pre_hooks and not inner.language_model._forward_hooks
    assert "replace_image_token" not in processor.__dict__
    assert "_get_num_multimodal_tokens" not in processor.__dict__
    again = inputs(processor, images)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)
        assert torch.equal(generate(model, again), cached)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert model.config.to_dict() == config


def test_sdpa_stays_and_the_inner_model_prunes_on_its_own(llava):
    model, processor, images = llava("llava_next")
    prune_image_tokens(model, processor, ratio=0.3)
    try:
        batch = inputs(processor, images, side="right")
        assert (model.config.text_config._attn_implementation,
                model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        remove_pruning(model)
    inner = model.model  # the *Model class, pruned on its own (its processor already patched)
    prune_image_tokens(inner, ratio=0.3)
    try:
        with torch.no_grad():
            hidden = inner(**batch).last_hidden_state
    finally:
        remove_pruning(inner)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)


def test_video_passes_through_unpruned(llava):
    model, processor, _ = llava("llava_onevision")
    video = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.model.get_video_features(video).pooler_output
    prune_image_tokens(model, processor, ratio=0.25)
    try:
        with torch.no_grad():
            after = model.model.get_video_features(video).pooler_output
        assert pruned_block(model).last_keep_idx is None
    finally:
        remove_pruning(model)
    assert torch.equal(after, before)


def test_a_downsampled_grid_keeps_cells_by_the_patch_each_weighs_most(llava):
    """LLaVA-OneVision's 16 x 16 crop grid of the 120 x 128 px image is downsampled to 12 x 12
    cells, each a blend of up to four patches (sources() checks where each cell samples against
    transformers' blend): a cell's unit is its nearest patch, all 144 distinct, and each of the
    16 tiles keeps ceil(ratio c) of its c cells. The cells kept are exactly those rows of the
    unpatched features (the first test); here, their count and that no warning is given."""
    import warnings
    model, processor, images = llava("llava_onevision")
    big = images[2]
    rows, tiles = sources(model, [(big[0].height, big[0].width)], [True])[0]
    cells = rows[16:][rows[16:, 0] >= 0]
    assert len(cells) == 144 and tiles == 17 and len(rows) == 16 + 12 * 13
    assert len({tuple(cell) for cell in cells.tolist()}) == 144
    per_tile = torch.bincount(cells[:, 0], minlength=17)[1:]
    assert per_tile.tolist() == [9] * 16  # rows and columns 0, 1, 3, 4, 5, 7, ... of 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_image_tokens(model, processor, ratio=0.25)
        try:
            batch = inputs(processor, [big], PROMPTS[2:])
            with torch.no_grad():
                model(**batch)
            keep = pruned_block(model).last_keep_idx[0]
        finally:
            remove_pruning(model)
    count = 4 + sum(kept_by_hand(int(c), 0.25) for c in per_tile) + 12
    assert (batch["input_ids"] == model.config.image_token_id).sum() == count == len(keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_refusals_are_one_line_naming_what_is_allowed(llava, family):
    model, processor, images = llava(family)
    other = llava("llava_onevision" if family == "llava_next" else "llava_next")[1]
    wanted = "LlavaNextProcessor" if family == "llava_next" else "LlavaOnevisionProcessor"
    with pytest.raises(UnsupportedModelError, match=f"can patch a {wanted}, got "
                                                    f"{type(other).__name__}$"):
        prune_image_tokens(model, other)
    with pytest.raises(UnsupportedModelError, match=r"supports .*LLaVA-NeXT \(llava_next\), "
                                                    r"LLaVA-OneVision \(llava_onevision\)"):
        prune_image_tokens(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"layer=1 is for the Qwen-VL models; .*leave layer "
                                         r"None"):
        prune_image_tokens(model, layer=1)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\], got 1.5"):
        prune_image_tokens(model, ratio=1.5)
    with pytest.raises(ValueError, match="top_m=4 and ratio=0.5 .*ambiguous"):
        prune_image_tokens(model, top_m=4, ratio=0.5)
    strategy = model.config.vision_feature_select_strategy
    model.config.vision_feature_select_strategy = "full" if strategy == "default" else "default"
    try:
        with pytest.raises(UnsupportedModelError, match=r"tiles need vision_feature_select_"
                                                        r"strategy='default' with a tower that "
                                                        r"has a class token \(CLIP\) or 'full'"):
            prune_image_tokens(model)
    finally:
        model.config.vision_feature_select_strategy = strategy
    pinpoints = processor.image_processor.image_grid_pinpoints
    processor.image_processor.image_grid_pinpoints = pinpoints[:2]
    try:
        with pytest.raises(ValueError, match="processor's image_grid_pinpoints .* are not the "
                                             "model's"):
            prune_image_tokens(model, processor, ratio=0.5)
    finally:
        processor.image_processor.image_grid_pinpoints = pinpoints
    assert pruned_block(model) is None and "replace_image_token" not in processor.__dict__

    batch = inputs(processor, images[:2], PROMPTS[:2])  # written for the unpruned model
    prune_image_tokens(model, ratio=0.5)  # the processor not patched
    try:
        for run in (lambda: model(**batch), lambda: generate(model, batch)):
            with pytest.raises(ValueError, match=r"^the prompts hold \d+ image tokens for 3 "
                                                 r"images \(the unpruned count: was the "
                                                 r"processor patched\?\), but the pruned model "
                                                 r"gives \d+ \(\[.*\] per image, from their "
                                                 r"sizes\): pass the processor to "
                                                 r"prune_image_tokens"), torch.no_grad():
                run()
        layer = model.config.vision_feature_layer
        with pytest.raises(ValueError, match=r"^vision_feature_layer=0 was given per call, but "
                                             rf"prune_image_tokens was set up for the config's "
                                             rf"{layer}: set it in the model's config"):
            model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                           vision_feature_layer=0)
    finally:
        remove_pruning(model)


def test_inputs_it_cannot_place_are_refused(llava):
    """Image features made elsewhere (they do not say which rows they keep), and images with
    inputs_embeds only (no placeholders to find)."""
    model, processor, images = llava("llava_next")
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    prune_image_tokens(model, processor, ratio=0.5)
    try:
        pruned = inputs(processor, images[:1], PROMPTS[:1])
        with pytest.raises(ValueError, match="did not come from the pruned model's own tower"):
            with torch.no_grad():
                model(input_ids=pruned["input_ids"], attention_mask=pruned["attention_mask"],
                      mm_encoder_outputs={"image": features})
        with pytest.raises(ValueError, match="needs input_ids with pixel_values"):
            with torch.no_grad():
                model(inputs_embeds=model.get_input_embeddings()(pruned["input_ids"]),
                      pixel_values=pruned["pixel_values"], image_sizes=pruned["image_sizes"])
    finally:
        remove_pruning(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generate_command_runs_a_saved_model(tmp_path, capsys, family):
    folder = save_llava_next(str(tmp_path / family), family, "tiny", seed=0)
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 60), (50, 50)]):  # 70 and 88 rows unpruned
        paths.append(str(tmp_path / f"{i}.png"))
        Image_from(rng, size).save(paths[-1])
    status, out, err = run_main(["generate", "--model", folder, "--image", paths[0], "--image",
                                 paths[1], "--prompt", "what is this ?", "--max_new_tokens", "2",
                                 "--ratio", "0.3", "--compare"], capsys)
    assert status == 0, err
    assert f"{family}, 70-88 image tokens per image" in err
    assert "unpruned: 70-88 image tokens per image; batch 2" in out
    assert "pruned (ratio 0.3, mmr, lambda 0.8): 70-88 -> 27-33 image tokens per image" in out
