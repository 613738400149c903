"""prune_image_tokens on a tiny random-weight InternVL (transformers' own
InternVLForConditionalGeneration, tools/tiny_internvl.py, made offline).

What the language model receives is recorded by a forward pre-hook on it, registered after
prune_image_tokens, at the prefill and at every decoding step. The expectation is computed here
from the unpatched model: its own image features and embeddings on the unpruned prompt, the
positions generate gives that prompt (its real tokens counted), and the dropped image rows taken
out using the kept units. Never the pruned model against itself.

Tiny shapes: 32-px tiles of 8 x 8 patches of 4 px and a class token, 16 image tokens per tile
after the pixel shuffle; 2 vision blocks of width 32; a 2-layer Qwen2 of width 32. Images of 1
tile (32 x 32), 2 + a thumbnail (64 wide, 32 high) and 4 + a thumbnail (64 x 64): 16, 48 and 80
units.
"""
import numpy as np
import pytest
import torch

from tokenprune import UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "InternVLForConditionalGeneration"):
    pytest.skip("this transformers has no InternVL", allow_module_level=True)
from helpers import processor_inputs  # noqa: E402
from tiny_internvl import SPECIAL_TOKENS, build_internvl  # noqa: E402  (conftest: tools/)

PICTURE = "<IMG_CONTEXT>\n"
# Left padding, several images in one prompt, images of different tile counts, text after the
# last image and (prompt 3) an image right before the end of the turn.
PROMPTS = [f"<|im_start|>user\n{PICTURE}what is this ?<|im_end|>\n<|im_start|>assistant\n",
           f"<|im_start|>user\n{PICTURE} and {PICTURE} how many red cats are in the picture on "
           f"the left ?<|im_end|>\n<|im_start|>assistant\n",
           f"<|im_start|>user\ndescribe {PICTURE}<|im_end|>\n<|im_start|>assistant\n"]
SIZES = [(32, 32), (32, 64), (64, 64)]  # (height, width): 1, 2 + 1 and 4 + 1 tiles
IMAGES = [0, 1, 2, 2]   # the images of PROMPTS, in order
PER_PROMPT = [[0], [1, 2], [3]]  # indices into those
TILES = [1, 3, 5, 5]
UNITS = [16 * t for t in TILES]
STEPS = 3  # new tokens in the generate tests: the prefill and two decoding steps
IMAGE_TOKEN = SPECIAL_TOKENS.index("<IMG_CONTEXT>")  # its id in the tiny vocabulary


@pytest.fixture(scope="module")
def internvl():
    """(model, processor, pictures), built once for the module."""
    from PIL import Image
    model, processor = build_internvl("tiny", seed=0)
    rng = np.random.default_rng(0)
    drawn = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    return model, processor, [drawn[i] for i in IMAGES]


def inputs(processor, pictures, prompts=PROMPTS, side="left"):
    return processor_inputs(processor, pictures, prompts, side)


def unpruned(model, batch):
    """The unpatched model's input to its language model on an unpruned batch: (embeddings with
    the image rows in (B, L, D), position ids (B, L): its real tokens counted, as generate
    counts them)."""
    inner = model.model
    with torch.no_grad():
        rows = inner.get_image_features(batch["pixel_values"]).pooler_output
        ids = batch["input_ids"]
        image = (ids == model.config.image_token_id)[..., None]
        embeds = inner.get_input_embeddings()(ids).masked_scatter(image, rows.reshape(-1, 32))
    mask = batch["attention_mask"]
    return embeds, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def kept_columns(batch, model, keep):
    """Per sample, the columns of the unpruned prompt that the pruned one keeps: its real tokens
    minus the image placeholders of the units not in `keep` (an image's placeholders are its
    units in order, tile after tile)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    flat = (ids == model.config.image_token_id).reshape(-1).nonzero().squeeze(1).tolist()
    dropped, start = set(), 0
    for n, idx in zip(units_of(batch), keep):
        slots = flat[start:start + n]
        start += n
        dropped.update(slots[u] for u in range(n) if u not in set(idx.tolist()))
    assert start == len(flat)
    L = ids.shape[1]
    return [[c for c in range(L) if mask[b, c] and b * L + c not in dropped]
            for b in range(ids.shape[0])]


def units_of(batch):
    """Units per image of an unpruned batch: its runs of image placeholders."""
    image = (batch["input_ids"] == IMAGE_TOKEN).int()
    runs = []
    for row in image.tolist():
        length = 0
        for v in row + [0]:
            if v:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


def expected_inputs(model, full, keep):
    """What the language model should receive for the unpruned batch `full`, left-padded:
    (embeddings (B, L', D), positions (B, L'), attention mask (B, L'))."""
    embeds, positions = unpruned(model, full)
    columns = kept_columns(full, model, keep)
    B, width = len(columns), max(map(len, columns))
    x = embeds.new_zeros(B, width, embeds.shape[-1])
    pos = positions.new_zeros(B, width)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, cols in enumerate(columns):
        at = slice(width - len(cols), width)
        x[b, at], pos[b, at], mask[b, at] = embeds[b, cols], positions[b, cols], 1
    return x, pos, mask


class Recorder:
    """A forward pre-hook on the language model: what it receives at each call (inputs_embeds,
    position_ids)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record,
                                                                           with_kwargs=True)

    def record(self, module, args, kwargs):
        self.seen.append((kwargs["inputs_embeds"].clone(), kwargs["position_ids"].clone()))

    def remove(self):
        self.handle.remove()


def language_model_logits(model, x, pos, mask):
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=x, position_ids=pos,
                                            attention_mask=mask).last_hidden_state
        return model.lm_head(hidden)


# --- the unit: 2 x 2 patches, mapped as transformers' pixel shuffle maps them -----------------

@pytest.mark.parametrize("side", [4, 6, 8, 32])
def test_the_units_are_the_pixel_shuffles_2x2_groups_in_its_order(side):
    """A tensor whose every patch row holds its own index (and a second channel, its index
    negated, so that the channel order within a patch shows too), through transformers' own
    pixel_shuffle: each output row is the unit's patches in shuffle_order's order, and the unit
    feature tokenprune selects on is that very row."""
    from transformers.models.internvl.modeling_internvl import InternVLModel
    from tokenprune.vlm.internvl import shuffle_order
    index = torch.arange(side * side, dtype=torch.float64)
    patches = torch.stack([index, -index], dim=-1)                        # (N, 2)
    shuffled = InternVLModel.pixel_shuffle(None, patches.reshape(1, side, side, 2), 0.5)
    rows = shuffled.reshape(-1, 8)                                        # (N / 4, 4 patches x 2)
    order = shuffle_order(side)
    assert torch.equal(rows[:, 0::2], order.view(-1, 4).double())
    assert torch.equal(patches[order].reshape(-1, 8), rows)
    # By hand, for side 4: unit 1 is row 0, columns 2-3 and row 1, columns 2-3.
    if side == 4:
        assert order.view(-1, 4).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                               [10, 11, 14, 15]]


def test_the_unit_attention_with_a_class_token_key_equals_the_whole_map():
    """unit_attention with one prefix key row (a class token) equals SPEC's definition on the
    whole (1 + N) x (1 + N) map of every head: rows normalised over all keys, the class token's
    column left out."""
    from tokenprune.reference import unit_attention
    generator = torch.Generator().manual_seed(0)
    units, heads, d = 9, 3, 8
    N = 4 * units
    q, k = (torch.randn(1 + N, heads, d, generator=generator) for _ in range(2))
    P = (torch.einsum("ihd,jhd->hij", q, k) * 0.3).softmax(dim=-1).mean(dim=0)
    expected = P[1:, 1:].reshape(units, 4, units, 4).mean((1, 3))
    banded = unit_attention(q[1:], k, None, 0.3, units, 4, chunk_elements=2 * N * 4,
                            num_prefix=1)
    torch.testing.assert_close(banded, expected, rtol=1e-5, atol=1e-7)


# --- the count per image, and how it is spread over the tiles ---------------------------------

def test_the_spec_worked_example_spreads_the_count_as_it_says():
    """SPEC.md, "Image tokens for InternVL": 5 units over 2 tiles and a thumbnail are 2, 1, 2
    (the remainder to the thumbnail, then to tile 0); one anchor goes to the thumbnail."""
    from tokenprune.vlm.internvl import tile_shares
    assert tile_shares(5, 3) == [2, 1, 2] and tile_shares(1, 3) == [0, 0, 1]
    assert tile_shares(24, 5) == [5, 5, 5, 4, 5] and tile_shares(7, 1) == [7]
    assert tile_shares(2, 5) == [1, 0, 0, 0, 1]


@pytest.mark.parametrize("how, counts, per_tile", [
    # k + m per image: 5 whatever the tiles; anchors 2 per image.
    # 5 over 3 tiles: 1 each, the remaining 2 to the thumbnail (the last tile) first, then to
    # tile 0; the 2 anchors likewise, and every tile that keeps a unit has an anchor.
    (dict(k_anchors=2, top_m=3), [5, 5, 5, 5],
     [[(5, 2)], [(2, 1), (1, 1), (2, 1)], [(1, 1)] * 5]),
    # ratio of the image's units: ceil(0.3 * 16, 48, 80) = 5, 15, 24; 24 over 5 tiles is 4
    # each, the remaining 4 to the thumbnail first, then tiles 0, 1, 2.
    (dict(k_anchors=3, ratio=0.3), [5, 15, 24, 24],
     [[(5, 3)], [(5, 1), (5, 1), (5, 1)], [(5, 1), (5, 1), (5, 1), (4, 1), (5, 1)]]),
    # k + m >= an image's units: that image is passed whole (no anchors: no selection). The
    # 10 anchors over 3 tiles: 3 each, the one left to the thumbnail.
    (dict(k_anchors=10, top_m=20), [16, 30, 30, 30],
     [[(16, 0)], [(10, 3), (10, 3), (10, 4)], [(6, 2)] * 5]),
])
def test_the_processor_writes_the_pruned_count_per_image(internvl, how, counts, per_tile):
    model, processor, pictures = internvl
    sizes = [(p.height, p.width) for p in pictures]
    before = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    prune_image_tokens(model, processor, **how)
    try:
        batch = inputs(processor, pictures)
        state = pruned_block(model)
        plans = [state.tile_plan(t) for t in (1, 3, 5)]
        after = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    finally:
        remove_pruning(model)
    assert batch["image_num_patches"].tolist() == TILES
    assert units_of(batch) == counts
    assert plans == per_tile
    # The count for an image size (vLLM's and tokenprune generate's question): the unpruned one
    # less the units dropped (transformers 5.19 counts <img> and </img> too, 5.25 does not).
    assert [b - a for a, b in zip(after, before)] == [u - c for u, c in zip(UNITS, counts)]


# --- what the language model receives ---------------------------------------------------------

@pytest.mark.parametrize("how, side", [
    (dict(k_anchors=2, top_m=3), "left"), (dict(ratio=0.3, selection="cls"), "left"),
    (dict(k_anchors=1, ratio=0.5, selection="score"), "right")])
def test_the_language_model_receives_the_kept_rows_at_their_unpruned_positions(internvl, how,
                                                                              side):
    model, processor, pictures = internvl
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, **how)
    recorder = Recorder(model)
    try:
        pruned = inputs(processor, pictures, side=side)
        with torch.no_grad():
            logits = model(**pruned).logits
        keep = pruned_block(model).last_keep_idx
        state = pruned_block(model)
    finally:
        recorder.remove()
        remove_pruning(model)
    assert [len(idx) for idx in keep] == [state.kept(n) for n in UNITS]
    assert all(torch.equal(idx, idx.sort().values) for idx in keep)
    x, pos, mask = expected_inputs(model, full, keep)
    (embeds, positions), = recorder.seen
    real = pruned["attention_mask"].bool()
    assert torch.equal(real.sum(1), mask.sum(1))
    assert torch.equal(embeds[real], x[mask.bool()])            # the rows, bit for bit
    assert torch.equal(positions[real], pos[mask.bool()])       # and their positions
    expected = language_model_logits(model, x, pos, mask)
    torch.testing.assert_close(logits[real], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    # The comparison notices a wrong position: two kept image rows of the 3-tile image with
    # their positions swapped.
    image = full["input_ids"] == model.config.image_token_id
    columns = kept_columns(full, model, keep)
    rows = [i for i, c in enumerate(columns[1]) if image[1, c]][:2]
    at = pos.shape[1] - len(columns[1])
    wrong = pos.clone()
    wrong[1, at + rows[0]], wrong[1, at + rows[1]] = pos[1, at + rows[1]], pos[1, at + rows[0]]
    assert not torch.equal(positions[real], wrong[mask.bool()])
    swapped = language_model_logits(model, x, wrong, mask)
    assert not torch.allclose(logits[real], swapped[mask.bool()], atol=1e-4, rtol=1e-4)


def batches(pictures):
    """(prompts, their images) for the batch of every prompt and for each prompt alone."""
    alone = [([prompt], [pictures[i] for i in images])
             for prompt, images in zip(PROMPTS, PER_PROMPT)]
    return [(PROMPTS, pictures)] + alone


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_gives_the_kept_rows_their_unpruned_positions_at_every_step(internvl, use_cache):
    """At the prefill the kept rows at their unpruned positions; at step i the new token at the
    unpruned prompt's largest position + 1 + i (without a cache, every step again the whole
    sequence: the prompt's positions, then those). In a batch and, with a cache, for each prompt
    alone too."""
    model, processor, pictures = internvl
    runs = batches(pictures) if use_cache else batches(pictures)[:1]
    fulls = [inputs(processor, images, prompts) for prompts, images in runs]
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    recorded, kept = [], []
    try:
        for prompts, images in runs:
            pruned = inputs(processor, images, prompts)
            recorder = Recorder(model)
            try:
                with torch.no_grad():
                    model.generate(**pruned, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                   do_sample=False, use_cache=use_cache)
            finally:
                recorder.remove()
            recorded.append((pruned, recorder.seen, pruned_block(model).last_keep_idx))
            kept += pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    for full, (pruned, seen, keep) in zip(fulls, recorded):
        x, pos, mask = expected_inputs(model, full, keep)
        last = full["attention_mask"].sum(1) - 1  # the unpruned prompt's largest position
        real = pruned["attention_mask"].bool()
        length = real.shape[1]
        assert len(seen) == STEPS
        assert torch.equal(seen[0][0][real], x[mask.bool()])
        assert torch.equal(seen[0][1][real], pos[mask.bool()])
        for step in range(1, STEPS):
            embeds, positions = seen[step]
            if use_cache:
                assert positions.shape[1] == 1
                assert torch.equal(positions[:, 0], last + step), f"step {step}"
            else:
                assert torch.equal(positions[:, :length][real], pos[mask.bool()])
                assert torch.equal(embeds[:, :length][real], x[mask.bool()])
                new = positions[:, length:]
                assert torch.equal(new, last[:, None] + 1 + torch.arange(step)), f"step {step}"
    # Some image dropped a unit before one it kept: had the kept units been the first ones, an
    # image's positions taken in order would have passed whatever units were kept.
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in kept)
    # The batch kept what each prompt kept alone.
    assert all(torch.equal(a, b) for a, b in zip(kept[:4], kept[4:]))
    assert len(kept) == (8 if use_cache else 4)


def reference_greedy(model, full, keep, steps=STEPS):
    """Greedy decoding by the unpatched language model on the unpruned prompt's rows and
    positions with the dropped image rows taken out, each new token at the next position, the
    whole sequence run again at each step."""
    x, pos, mask = expected_inputs(model, full, keep)
    last = pos.amax(dim=1)
    tokens = []
    for step in range(steps):
        token = language_model_logits(model, x, pos, mask)[:, -1].argmax(dim=-1)
        tokens.append(token)
        with torch.no_grad():
            x = torch.cat([x, model.model.get_input_embeddings()(token)[:, None]], dim=1)
        pos = torch.cat([pos, (last + 1 + step)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.long)], dim=1)
    return torch.stack(tokens, dim=1)


def test_greedy_generate_equals_the_language_model_on_the_kept_rows(internvl):
    model, processor, pictures = internvl
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, k_anchors=2, ratio=0.3)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            out = model.generate(**pruned, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False)
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    got = out[:, pruned["input_ids"].shape[1]:]
    assert torch.equal(got, reference_greedy(model, full, keep))


# --- where and how the selection is made ------------------------------------------------------

@pytest.mark.parametrize("vision", [{}, dict(use_qk_norm=True, norm_type="rms_norm")],
                         ids=["layer_norm", "qk_norm"])
def test_the_cls_selection_keeps_each_tiles_units_its_class_token_attends_to_most(vision):
    """Computed here from the feature block's captured input (the last block:
    vision_feature_layer -1): the block's own norm, q/k projections (and q/k norms), the class
    token's attention over the tile's 65 tokens averaged over heads, each unit's score the mean
    over its 2 x 2 patches (taken from the 8 x 8 grid by hand), the top of each tile by the
    counts worked out by hand: ratio 0.3 keeps 5, 15 and 24 units of images of 1, 3 and 5 tiles,
    5 a tile but the 5-tile image's tile 3, which keeps 4."""
    from PIL import Image
    model, processor = build_internvl("tiny", seed=1, vision=vision)
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for h, w in SIZES]
    block = model.model.vision_tower.encoder.layer[-1]
    captured = []
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        prune_image_tokens(model, processor, k_anchors=1, ratio=0.3, selection="cls")
        batch = processor(images=pictures, text=[PICTURE * 3], return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"],
                                           image_num_patches=batch["image_num_patches"])
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    x, = captured
    attn = block.attention
    with torch.no_grad():
        y = block.layernorm_before(x)
        q = attn.q_norm(attn.q_proj(y)).view(9, 65, 4, 8)
        k = attn.k_norm(attn.k_proj(y)).view(9, 65, 4, 8)
        to_keys = (torch.einsum("bhd,bjhd->bhj", q[:, 0], k) * 8 ** -0.5).softmax(-1).mean(1)
    grid = to_keys[:, 1:].reshape(9, 4, 2, 4, 2)          # (tile, unit row, 2, unit column, 2)
    unit_score = grid.mean(dim=(2, 4)).reshape(9, 16)
    # The 9 tiles in order: the 1-tile image's, the 3-tile image's, the 5-tile image's.
    image_of = [0, 1, 1, 1, 2, 2, 2, 2, 2]
    within = [0, 0, 1, 2, 0, 1, 2, 3, 4]      # the tile's place in its image
    counts = [5, 5, 5, 5, 5, 5, 5, 4, 5]
    per_tile = [torch.sort(unit_score[t], descending=True, stable=True).indices[:counts[t]]
                .sort().values + 16 * within[t] for t in range(9)]
    images = [torch.cat([per_tile[t] for t in range(9) if image_of[t] == i]) for i in range(3)]
    assert [len(idx) for idx in keep] == [5, 15, 24]
    for idx, want in zip(keep, images):
        assert torch.equal(idx, want)


@pytest.mark.parametrize("selection", ["mmr", "cls", "score"])
def test_triton_backend_keeps_the_units_the_reference_keeps(internvl, selection):
    """The kernels under Triton's CPU interpreter (slow: one image of 3 tiles)."""
    model, processor, pictures = internvl
    batch = processor(images=pictures[1:2], text=[PICTURE], return_tensors="pt")
    keeps = {}
    for backend in ("reference", "triton"):
        prune_image_tokens(model, k_anchors=2, top_m=6, selection=selection, backend=backend)
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], image_num_patches=[3])
        keeps[backend] = pruned_block(model).last_keep_idx
    remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps["triton"], keeps["reference"]))


def test_the_default_selection_is_mmr_and_differs_from_score(internvl):
    model, processor, pictures = internvl
    batch = processor(images=pictures[:3], text=[PICTURE * 3], return_tensors="pt")
    keeps = {}
    for selection in (None, "mmr", "score"):
        prune_image_tokens(model, k_anchors=2, top_m=6,
                           **({"selection": selection} if selection else {}))
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], image_num_patches=[1, 3, 5])
        keeps[selection] = pruned_block(model).last_keep_idx
        assert pruned_block(model).config.selection == (selection or "mmr")
    remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps[None], keeps["mmr"]))
    assert not all(torch.equal(a, b) for a, b in zip(keeps["mmr"], keeps["score"]))


# --- nothing to prune, undoing, refusals -------------------------------------------------------

def test_ratio_one_is_bit_identical_and_remove_pruning_restores(internvl):
    model, processor, pictures = internvl
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.warns(UserWarning, match="nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None
    again = inputs(processor, pictures)
    assert set(again) == set(batch) and torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)
    prune_image_tokens(model, processor, ratio=0.5)
    prune_image_tokens(model, processor, k_anchors=2, top_m=2)  # replaces the first
    assert units_of(inputs(processor, pictures)) == [4, 4, 4, 4]
    assert (model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
    remove_pruning(model)
    inner = model.model
    assert "generate" not in model.__dict__ and "get_image_features" not in inner.__dict__
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    assert not inner.language_model._forward_pre_hooks and not inner.language_model._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in inner.vision_tower.encoder.layer)
    assert "replace_image_token" not in processor.__dict__
    after = inputs(processor, pictures)
    assert set(after) == set(batch) and torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)
        generated = model.generate(**after, max_new_tokens=2, do_sample=False)
    assert generated.shape == (3, batch["input_ids"].shape[1] + 2)


def test_refusals(internvl):
    model, processor, pictures = internvl
    with pytest.raises(ValueError, match="layer=1 is for the Qwen-VL models; an InternVL model "
                                         "is pruned at the vision block of its "
                                         "config.vision_feature_layer"):
        prune_image_tokens(model, layer=1)
    for ratio in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            prune_image_tokens(model, ratio=ratio)
    with pytest.raises(ValueError, match="selection"):
        prune_image_tokens(model, selection="best")
    with pytest.raises(UnsupportedModelError, match="InternVLProcessor"):
        prune_image_tokens(model, processor.tokenizer)
    config = model.config
    for name, value, says in (("vision_feature_select_strategy", "full", "'default'"),
                              ("vision_feature_layer", 0, "0 is the embeddings"),
                              ("vision_feature_layer", [-1, -2], "one vision block's output")):
        own = getattr(config, name)
        setattr(config, name, value)
        try:
            with pytest.raises(ValueError, match=says):
                prune_image_tokens(model)
        finally:
            setattr(config, name, own)
    assert pruned_block(model) is None
    # Refused when the model runs: no tile counts, an unpatched processor's counts, a
    # per-call feature layer, tiles that the counts do not cover.
    unpatched = inputs(processor, pictures)
    prune_image_tokens(model, k_anchors=2, top_m=3)
    try:
        with pytest.raises(ValueError, match="needs each image's tile count .*image_num_patches"), \
                torch.no_grad():
            model(**unpatched)
        counted = {**unpatched, "image_num_patches": torch.tensor(TILES)}
        with pytest.raises(ValueError, match="the prompt has 16 image placeholders for an image "
                                             "of which prune_image_tokens keeps 5: pass the "
                                             "processor"), torch.no_grad():
            model(**counted)
        with pytest.raises(ValueError, match="vision_feature_layer=-2 in the call"), \
                torch.no_grad():
            model(**counted, vision_feature_layer=-2)
        with pytest.raises(ValueError, match="counts 13 tiles for 4 images, but pixel_values "
                                             "holds 14.*videos"), torch.no_grad():
            model(**{**counted, "image_num_patches": torch.tensor([1, 3, 5, 4])})
        with pytest.raises(ValueError, match="prefill_chunk_size=8: a chunked prefill"):
            model.generate(**counted, max_new_tokens=1, prefill_chunk_size=8)
    finally:
        remove_pruning(model)


def test_the_inner_model_and_a_deep_copy_prune_on_their_own(internvl):
    import copy
    model, processor, pictures = internvl
    prune_image_tokens(model, processor, k_anchors=2, top_m=3)
    try:
        batch = inputs(processor, pictures)
        with torch.no_grad():
            logits = model(**batch).logits
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(twin(**batch).logits, logits)
        assert pruned_block(twin) is not pruned_block(model)
        remove_pruning(twin)
        assert pruned_block(model) is not None and "generate" not in twin.__dict__
    finally:
        remove_pruning(model)
    inner = model.model  # the *Model class, pruned on its own
    prune_image_tokens(inner, k_anchors=2, top_m=3)
    try:
        with torch.no_grad():
            hidden = inner(**batch).last_hidden_state
    finally:
        remove_pruning(inner)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)


def test_the_generate_command_compares_on_a_saved_internvl(tmp_path, capsys):
    from helpers import run_main
    from PIL import Image
    from tiny_internvl import save_internvl
    folder = save_internvl(str(tmp_path / "internvl"), "tiny", seed=0)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 64), (64, 64)]):  # 3 and 5 tiles: 48 and 80 units
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    status, out, err = run_main(["generate", "--model", folder, "--image", paths[0], "--image",
                                 paths[1], "--prompt", "what is this ?", "--max_new_tokens", "2",
                                 "--k_anchors", "2", "--top_m", "2", "--compare"], capsys)
    assert status == 0, err
    # The processor's counts for these sizes: 48 and 80 (transformers 5.19 adds <img>, </img>).
    from tiny_internvl import build_processor
    one_tile = build_processor()._get_num_multimodal_tokens(image_sizes=[(32, 32)])
    extra = one_tile.num_image_tokens[0] - 16
    before, after = f"{48 + extra}-{80 + extra}", 4 + extra
    assert f"internvl, {before} image tokens per image" in err
    assert f"unpruned: {before} image tokens per image; batch 2" in out
    assert (f"pruned (k_anchors 2, top_m 2, mmr, lambda 0.8): {before} -> {after} image tokens "
            f"per image; batch 2") in out
