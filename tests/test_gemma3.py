"""prune_image_tokens on a tiny random-weight Gemma 3 (tools/tiny_gemma3.py, made offline).

What the language model receives is recorded by a forward pre-hook on it, registered after the
pruning, at the prefill and at every decoding step. The expectation is computed here from the
unpatched model: its own image features and embeddings on the unpruned prompt, the unpruned
prompt's positions (the real tokens before each one, as generate counts them), with the image
rows of the units not kept taken out by their columns; the logits are the unpatched model's on
those rows with the matching token_type_ids (so its own bidirectional image mask). Never the
pruned model batched against itself alone.

Tiny shapes: 32-px images in 4-px patches (64 patches), pooled 2 x 2 into 16 image tokens; 2
SigLIP blocks of width 32; a 2-layer language model of width 32 whose first layer attends in a
window of 8 tokens. A left-padded batch of 3 prompts with 4 images (the second prompt has two);
the file takes about 25 s of CPU (40 s on the shared 2-core VM).
"""
import numpy as np
import pytest
import torch

from tokenprune import UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning

pytest.importorskip("transformers")
from helpers import processor_inputs  # noqa: E402
from tiny_gemma3 import build_gemma3  # noqa: E402  (tests/conftest.py: tools/)

UNITS = 16  # image tokens per image, unpruned
PICTURE = "<start_of_image>"
PROMPTS = [f"<bos><start_of_turn>user\n{PICTURE}what is this ?<end_of_turn>\n"
           f"<start_of_turn>model\n",
           f"<bos><start_of_turn>user\n{PICTURE} and {PICTURE} how many red cats are in the "
           f"picture on the left ?<end_of_turn>\n<start_of_turn>model\n",
           f"<bos><start_of_turn>user\ndescribe {PICTURE}<end_of_turn>\n<start_of_turn>model\n"]
SIZES = [(32, 48), (64, 32), (48, 48), (40, 24)]  # resized to 32 x 32 by the processor
PER_PROMPT = [[0], [1, 2], [3]]
STEPS = 3  # generated tokens: the prefill and two decoding steps


@pytest.fixture(scope="module")
def gemma():
    """(model, processor, pictures per prompt), built once."""
    from PIL import Image
    model, processor = build_gemma3("tiny", seed=0)
    rng = np.random.default_rng(0)
    drawn = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    return model, processor, [[drawn[i] for i in images] for images in PER_PROMPT]


def inputs(processor, pictures, prompts=PROMPTS, side="left"):
    return processor_inputs(processor, pictures, prompts, side)


def image_token(model):
    return model.config.image_token_id


def unpruned_positions(batch):
    """The positions of an unpruned batch's tokens: the real tokens before each one."""
    return (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)


def unpruned(model, batch):
    """The unpatched model's input embeddings for an unpruned batch (its own image features in
    the image rows) and the positions of its tokens."""
    inner = model.model
    with torch.no_grad():
        rows = inner.get_image_features(batch["pixel_values"]).pooler_output
        image = batch["input_ids"] == image_token(model)
        embeds = inner.get_input_embeddings()(batch["input_ids"]).masked_scatter(
            image[..., None], rows.reshape(-1, rows.shape[-1]))
    return embeds, unpruned_positions(batch)


def kept_columns(model, batch, keep):
    """Per row, the columns of the unpruned batch that the pruned prompt keeps, and each one's
    image (its index among the batch's images, or -1 for a text token)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    L = ids.shape[1]
    flat = (ids == image_token(model)).reshape(-1).nonzero().squeeze(1).tolist()
    image_of = {}
    for i, idx in enumerate(keep):
        slots = flat[i * UNITS:(i + 1) * UNITS]
        kept = set(idx.tolist())
        image_of.update({slots[u]: (i if u in kept else None) for u in range(UNITS)})
    columns, images = [], []
    for b in range(ids.shape[0]):
        cols = [c for c in range(L) if mask[b, c] and image_of.get(b * L + c, -1) is not None]
        columns.append(cols)
        images.append([image_of.get(b * L + c, -1) for c in cols])
    return columns, images


def kept_rows(model, batch, keep, swap=False):
    """The unpruned batch cut to the kept columns, left-padded: (embeddings, positions,
    token_type_ids, attention mask). swap: the positions of every image's first two kept tokens
    exchanged (a wrong position, for the check that the comparison notices one)."""
    embeds, positions = unpruned(model, batch)
    columns, images = kept_columns(model, batch, keep)
    B, width = len(columns), max(map(len, columns))
    x = embeds.new_zeros(B, width, embeds.shape[-1])
    pos = positions.new_zeros(B, width)
    types = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, cols in enumerate(columns):
        at = slice(width - len(cols), width)
        x[b, at], pos[b, at], mask[b, at] = embeds[b, cols], positions[b, cols], 1
        types[b, at] = batch["token_type_ids"][b, cols]
        if swap:
            for image in set(images[b]) - {-1}:
                first, second = [width - len(cols) + j for j, i in enumerate(images[b])
                                 if i == image][:2]
                pos[b, [first, second]] = pos[b, [second, first]]
    return x, pos, types, mask


def expected_logits(model, batch, keep, swap=False):
    """The unpatched model's logits on the kept rows at their unpruned positions, with their
    token_type_ids (its own mask: each image's tokens see each other); (logits, mask)."""
    x, pos, types, mask = kept_rows(model, batch, keep, swap)
    with torch.no_grad():
        hidden = model.model(inputs_embeds=x, position_ids=pos, token_type_ids=types,
                             attention_mask=mask).last_hidden_state
    return model.lm_head(hidden), mask


def recording(model):
    """A forward pre-hook on the language model that records what it receives at each call;
    (the records, the hook's handle)."""
    seen = []

    def record(module, args, kwargs):
        seen.append({"embeds": kwargs["inputs_embeds"].clone(),
                     "positions": kwargs["position_ids"].clone(),
                     "mask": kwargs["attention_mask"]})
    return seen, model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("how, side", [
    (dict(k_anchors=2, top_m=3), "left"), (dict(ratio=0.4, selection="cls"), "left"),
    (dict(k_anchors=1, ratio=0.5, selection="score"), "right")])
def test_the_language_model_receives_the_kept_rows_at_their_unpruned_positions(gemma, how, side):
    model, processor, pictures = gemma
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, **how)
    seen, handle = recording(model)
    try:
        pruned = inputs(processor, pictures, side=side)
        with torch.no_grad():
            logits = model(**pruned).logits
        keep = pruned_block(model).last_keep_idx
        state = pruned_block(model)
    finally:
        handle.remove()
        remove_pruning(model)
    assert keep.shape == (4, state.image_seq_length) == (4, state.kept(UNITS))
    assert torch.equal(keep, keep.sort(dim=1).values)
    x, pos, _, mask = kept_rows(model, full, keep)
    real, expected_real = pruned["attention_mask"].bool(), mask.bool()
    assert torch.equal(real.sum(dim=1), expected_real.sum(dim=1))
    assert torch.equal(seen[0]["embeds"][real], x[expected_real])
    assert torch.equal(seen[0]["positions"][real], pos[expected_real])
    expected, _ = expected_logits(model, full, keep)
    torch.testing.assert_close(logits[real], expected[expected_real], atol=1e-5, rtol=1e-5)
    # The comparison notices a wrong position: two image tokens' positions exchanged.
    wrong, _ = expected_logits(model, full, keep, swap=True)
    assert not torch.allclose(logits[real], wrong[expected_real], atol=1e-4, rtol=1e-4)


def check_steps(seen, prompt_positions, last, pruned, use_cache):
    """The positions the language model received under generate: the prefill's are the
    expected ones, then each new token one after the unpruned prompt's largest position."""
    mask = pruned["attention_mask"].bool()
    length = mask.shape[1]
    assert len(seen) == STEPS
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().squeeze(1)
        assert torch.equal(seen[0]["positions"][b, real], prompt_positions[b]), f"prefill {b}"
        for step in range(1, STEPS):
            got = seen[step]["positions"][b]
            if use_cache:  # only the token generated at the step before
                assert got.tolist() == [last[b] + step], f"row {b}, step {step}"
            else:  # the whole sequence again: the prompt, then the new tokens
                assert torch.equal(got[real], prompt_positions[b]), f"row {b}, step {step}"
                assert got[length:].tolist() == [last[b] + 1 + i for i in range(step)]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_gives_each_kept_token_its_unpruned_position(gemma, use_cache):
    """Batched and each prompt alone, with and without a cache."""
    model, processor, pictures = gemma
    runs = [(PROMPTS, pictures)] + [([p], [i]) for p, i in zip(PROMPTS, pictures)]
    fulls = [inputs(processor, images, prompts) for prompts, images in runs]
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    kept = []
    try:
        for (prompts, images), full in zip(runs, fulls):
            pruned = inputs(processor, images, prompts)
            seen, handle = recording(model)
            try:
                with torch.no_grad():
                    model.generate(**pruned, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                   do_sample=False, use_cache=use_cache)
            finally:
                handle.remove()
            keep = pruned_block(model).last_keep_idx
            kept.append(keep)
            positions = unpruned_positions(full)
            columns, _ = kept_columns(model, full, keep)
            prompt = [positions[b, cols] for b, cols in enumerate(columns)]
            last = [int(positions[b].max()) for b in range(len(columns))]
            check_steps(seen, prompt, last, pruned, use_cache)
    finally:
        remove_pruning(model)
    # Some image dropped a unit before one it kept: had the kept units been the first ones, an
    # image's positions taken in order would have passed whatever units were kept.
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in kept[0])
    assert torch.equal(torch.cat(kept[1:]), kept[0])  # alone, each image keeps what it kept


def test_greedy_generate_equals_the_unpatched_model_on_the_kept_rows(gemma):
    """The tokens themselves: greedy generate (with a cache) of the pruned model equals greedy
    decoding by the unpatched model on the kept rows, at their unpruned positions with their
    token_type_ids, each new token appended as text at the next position."""
    model, processor, pictures = gemma
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            out = model.generate(**pruned, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False)
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    x, pos, types, mask = kept_rows(model, full, keep)
    last = pos.amax(dim=1)
    tokens = []
    for step in range(STEPS):
        with torch.no_grad():
            hidden = model.model(inputs_embeds=x, position_ids=pos, token_type_ids=types,
                                 attention_mask=mask).last_hidden_state
            token = model.lm_head(hidden[:, -1]).argmax(dim=-1)
        tokens.append(token)
        x = torch.cat([x, model.model.get_input_embeddings()(token)[:, None]], dim=1)
        pos = torch.cat([pos, (last + 1 + step)[:, None]], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out[:, pruned["input_ids"].shape[1]:], torch.stack(tokens, dim=1))


def test_each_images_kept_tokens_see_each_other_and_the_text_is_causal(gemma):
    """The masks the language model receives at the prefill (SDPA's boolean ones), checked
    against the rule written out here from the unpruned prompt's images: a token sees the real
    tokens up to itself and every kept token of its own image; the sliding-window layer only
    those fewer than its window (8) columns back."""
    model, processor, pictures = gemma
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, k_anchors=2, top_m=3)
    seen, handle = recording(model)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            model(**pruned)
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    _, images = kept_columns(model, full, keep)
    real = pruned["attention_mask"].bool()
    B, L = real.shape
    window = model.config.text_config.sliding_window
    masks = seen[0]["mask"]
    for b in range(B):
        image = torch.full((L,), -1)
        image[real[b]] = torch.tensor(images[b])
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        sees = real[b][None, :] & ((j <= i) | ((image[:, None] == image[None, :])
                                               & (image[:, None] >= 0)))
        rows = real[b]
        assert torch.equal(masks["full_attention"][b, 0][rows], sees[rows]), b
        assert torch.equal(masks["sliding_attention"][b, 0][rows], (sees & (i - j < window))[rows])
    assert (torch.tensor([len(set(row) - {-1}) for row in images]) == torch.tensor([1, 2, 1])).all()


def vision_blocks(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5.19: a wrapper


def captured_block_input(model, batch):
    """The last SigLIP block's input for the batch's images, from the unpatched model."""
    captured = {}
    block = vision_blocks(model)[-1]
    handle = block.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"])
    finally:
        handle.remove()
    return block, captured["x"]


def patch_scores(block, x):
    """(q, k) (B, N, H, d) of the block's own projections and the attention each patch
    receives, averaged over heads and the image's N patches as queries (B, N)."""
    attn = block.self_attn
    B, N, _ = x.shape
    with torch.no_grad():
        y = block.layer_norm1(x)
        q = attn.q_proj(y).view(B, N, attn.num_heads, -1)
        k = attn.k_proj(y).view(B, N, attn.num_heads, -1)
        attention = (torch.einsum("bihd,bjhd->bhij", q, k) * attn.scale).softmax(dim=-1)
    return q, k, attention.mean(dim=1).mean(dim=1)


def pooled(values):
    """(B, 64, ...) per patch of the 8 x 8 grid -> (B, 16, 4, ...): each 2 x 2 unit's patches."""
    B = values.shape[0]
    grid = values.reshape(B, 4, 2, 4, 2, *values.shape[2:])
    return grid.transpose(2, 3).reshape(B, 16, 4, *values.shape[2:])


def kept_units(model, processor, batch, **how):
    """The units that prune_image_tokens(**how) keeps of the batch's images."""
    prune_image_tokens(model, processor, **how)
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"])
        return pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)


def test_the_cls_selection_keeps_the_units_whose_patches_receive_most_attention(gemma):
    """Computed here from the last block's input: each patch's received attention, its unit's
    score the mean over the unit's 2 x 2 patches, the ceil(0.3 * 16) = 5 best units (ties to
    the lower unit), ascending."""
    model, processor, pictures = gemma
    batch = inputs(processor, pictures)
    block, x = captured_block_input(model, batch)
    keep = kept_units(model, processor, batch, ratio=0.3, selection="cls")
    _, _, received = patch_scores(block, x)
    units = pooled(received).mean(dim=2)
    expected = torch.sort(units, dim=1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(keep, expected.sort(dim=1).values)


def test_mmr_and_score_run_on_each_units_mean_feature(gemma):
    """The other selections get the units' forms: the unit attention of the block's q/k with
    its 2 x 2 patches side by side, and each unit's feature the mean of its patches' rows of the
    block input (what the projector's average pool takes); SPEC's unit selection on them."""
    from tokenprune.config import image_token_config
    from tokenprune.reference import select_units_reference
    model, processor, pictures = gemma
    batch = inputs(processor, pictures)
    block, x = captured_block_input(model, batch)
    q, k, _ = patch_scores(block, x)
    for selection in ("mmr", "score"):
        keep = kept_units(model, processor, batch, k_anchors=2, top_m=3, selection=selection)
        config = image_token_config(2, 3, 0.5, "none", "reference", selection, 0.8, None)
        expected = torch.stack([select_units_reference(
            pooled(x)[b].mean(dim=1), pooled(q)[b].reshape(64, *q.shape[2:]),
            pooled(k)[b].reshape(64, *k.shape[2:]), None, block.self_attn.scale, 4, 2, 3,
            config) for b in range(len(x))])
        assert torch.equal(keep, expected), selection


def test_the_random_control_draws_each_images_units_from_its_seed(gemma):
    model, processor, pictures = gemma
    batch = inputs(processor, pictures)
    keep = kept_units(model, processor, batch, ratio=0.25, selection="random")
    assert keep.shape == (4, 4) and torch.equal(keep, keep.sort(dim=1).values)
    assert all(len(set(row.tolist())) == 4 for row in keep)
    assert len({tuple(row.tolist()) for row in keep}) > 1  # a draw per image
    # Pruning again starts the generator again at the seed: the same draws.
    assert torch.equal(kept_units(model, processor, batch, ratio=0.25, selection="random"), keep)


def test_the_processor_writes_the_kept_count_for_every_image_and_crop(gemma):
    model, processor, pictures = gemma
    tall = [[pictures[1][0]]]  # 64 x 32: two crops besides the whole image

    def crops():  # Gemma 3's pan-and-scan: the crops as more images, each in its own block
        return processor(images=tall, text=[PROMPTS[0]], return_tensors="pt",
                         do_pan_and_scan=True, pan_and_scan_min_crop_size=16)
    full = crops()
    prune_image_tokens(model, processor, ratio=0.5)
    try:
        batch = inputs(processor, pictures)
        image = batch["input_ids"] == image_token(model)
        assert image.sum(dim=1).tolist() == [8, 16, 8]
        assert torch.equal(batch["token_type_ids"].bool(), image)
        sizes = [(p.height, p.width) for row in pictures for p in row]
        assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [8] * 4
        prune_image_tokens(model, processor, k_anchors=2, top_m=3)
        pruned = crops()
        assert len(pruned["pixel_values"]) == 3  # the image and its two crops
        assert (pruned["input_ids"] == image_token(model)).sum() == 3 * 5
        # The text around the crops is the processor's own, only the image tokens fewer.
        drop = lambda ids: [t for t in ids.tolist() if t != image_token(model)]  # noqa: E731
        assert drop(pruned["input_ids"][0]) == drop(full["input_ids"][0])
        with torch.no_grad():
            logits = model(**pruned).logits[0]
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert keep.shape == (3, 5)
    expected, _ = expected_logits(model, full, keep)
    torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-5)


def test_ratio_one_is_bit_identical_and_remove_pruning_restores(gemma):
    model, processor, pictures = gemma
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    with pytest.warns(UserWarning, match="ratio=1.0 keeps all 16 image tokens per image: "
                                         "nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None
    again = inputs(processor, pictures)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)
    prune_image_tokens(model, processor, k_anchors=2, top_m=2)
    assert (model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
    remove_pruning(model)
    inner = model.model
    assert "get_image_features" not in inner.__dict__
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    assert not inner.language_model._forward_pre_hooks
    assert not inner.language_model._forward_hooks
    assert not any(block._forward_pre_hooks for block in vision_blocks(model))
    assert not {"replace_image_token", "_get_num_multimodal_tokens"} & set(processor.__dict__)
    after = inputs(processor, pictures)
    assert torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)
        assert torch.equal(model.generate(**after, max_new_tokens=2, do_sample=False), generated)


def test_copies_for_num_return_sequences_keep_their_images_units(gemma):
    """generate copies each prompt's image features for num_return_sequences; each copy gets
    its image's kept units, so the prefill's positions are those of the prompt it copies."""
    model, processor, pictures = gemma
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    seen, handle = recording(model)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            model.generate(**pruned, max_new_tokens=1, do_sample=False, num_beams=2,
                           num_return_sequences=2)
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    positions = unpruned_positions(full)
    columns, _ = kept_columns(model, full, keep)
    real = pruned["attention_mask"].bool()
    for b, cols in enumerate(columns):
        for copy in (2 * b, 2 * b + 1):
            assert torch.equal(seen[0]["positions"][copy, real[b]], positions[b, cols])


def test_refusals(gemma):
    from types import SimpleNamespace
    model, processor, pictures = gemma
    with pytest.raises(ValueError, match="layer=-1 is for the Qwen-VL models; a Gemma 3 model "
                                         "is pruned at its vision tower's last block"):
        prune_image_tokens(model, processor, layer=-1)
    with pytest.raises(UnsupportedModelError, match="can patch a Gemma3Processor for "
                                                    "Gemma3ForConditionalGeneration, got "
                                                    + type(processor.tokenizer).__name__):
        prune_image_tokens(model, processor.tokenizer)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        prune_image_tokens(model, ratio=1.5)
    assert pruned_block(model) is None
    unpatched = inputs(processor, pictures)
    prune_image_tokens(model, k_anchors=2, top_m=3)  # the processor not patched
    try:
        with pytest.raises(ValueError, match=r"the prompts hold 64 image tokens for 4 images, 16 "
                                             r"per image \(the unpruned count: was the processor "
                                             r"patched\?\), but the pruned model gives 5 per "
                                             r"image: pass the processor"):
            model(**unpatched)
        with pytest.raises(ValueError, match="needs input_ids with pixel_values"):
            model(inputs_embeds=torch.zeros(1, 3, 32), pixel_values=unpatched["pixel_values"])
        others = model.model.get_image_features(unpatched["pixel_values"])
        del others.tokenprune_kept_units  # features made elsewhere
        with pytest.raises(ValueError, match="did not come from the pruned model's own tower"):
            model(input_ids=unpatched["input_ids"], mm_encoder_outputs={"image": others})
    finally:
        remove_pruning(model)
    # Gemma 4: its number of image tokens follows each image's size.
    gemma4 = type("Gemma4ForConditionalGeneration", (), {})()
    gemma4.config = SimpleNamespace(model_type="gemma4")
    with pytest.raises(UnsupportedModelError, match=r"cannot prune Gemma4ForConditionalGeneration "
                                                    r"\(Gemma 4's variable-resolution images.* "
                                                    r"are not supported yet\); it supports .*"
                                                    r"Gemma 3 \(gemma3\)"):
        prune_image_tokens(gemma4)


def test_the_generate_command_runs_a_saved_gemma3_model(tmp_path, capsys):
    from helpers import run_main
    from PIL import Image
    from tiny_gemma3 import save_gemma3
    folder = save_gemma3(str(tmp_path / "gemma3"))
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 48), (48, 48)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    status, out, err = run_main(["generate", "--model", folder, "--image", paths[0], "--image",
                                 paths[1], "--prompt", "what is this ?", "--max_new_tokens", "2",
                                 "--k_anchors", "2", "--top_m", "2", "--compare"], capsys)
    assert status == 0, err
    assert "gemma3, 16 image tokens per image" in err
    assert "unpruned: 16 image tokens per image; batch 2" in out
    assert "16 -> 4 image tokens per image; batch 2" in out
