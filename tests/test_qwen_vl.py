"""prune_image_tokens on tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models
(tools/tiny_qwen_vl.py, made offline).

The expected results are computed from the unpatched model's own pieces: its tower's output (and
Qwen3-VL's deepstack features), its get_rope_index on the unpruned prompt, and its language
model, with the dropped image rows removed here. Tiny shapes: 2 vision blocks of width 32,
8-px patches (16 px for Qwen3-VL) merged 2 x 2, a 2-layer language model of width 32; images
of 6, 8 and 9 units.
"""
import numpy as np
import pytest
import torch

from tokenprune import UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning

pytest.importorskip("transformers")
from helpers import processor_inputs  # noqa: E402
from tiny_qwen_vl import QWEN3_TOWER, build_qwen_vl  # noqa: E402  (tests/conftest.py: tools/)

# The families this file, test_qwen_vl_layer.py and test_qwen_generate.py run on; the ones built
# on Qwen3-VL since (Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) are tests/test_qwen3_5.py's.
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
# Left padding, several images in one prompt, images of different sizes, text after the last
# image and (prompt 3) an image right before the generation prompt.
PROMPTS = [f"<|im_start|>user\n{PICTURE}what is this ?<|im_end|>\n<|im_start|>assistant\n",
           f"<|im_start|>user\n{PICTURE} and {PICTURE} how many red cats are in the picture on "
           f"the left ?<|im_end|>\n<|im_start|>assistant\n",
           f"<|im_start|>user\ndescribe {PICTURE}<|im_end|>\n<|im_start|>assistant\n"]
SIZES = [(32, 48), (64, 32), (48, 48)]  # in 8-px patches: 4 x 6, 8 x 4, 6 x 6 -> 6, 8, 9 units
IMAGES = [0, 1, 2, 2]  # the images of PROMPTS, in order
PER_PROMPT = [[0], [1, 2], [3]]  # indices into those


@pytest.fixture(scope="module")
def qwen():
    """get(family) -> (model, processor, pictures), built once per module."""
    built = {}

    def get(family):
        if family not in built:
            model, processor = build_qwen_vl(family, "tiny", seed=0)
            built[family] = model, processor, pictures_for(family)
        return built[family]
    return get


def pictures_for(family):
    """The batch's random images in prompt order (prompt 1 has one, prompt 2 two, prompt 3
    one), of SIZES in the family's patches."""
    from PIL import Image
    scale = 2 if family in QWEN3_TOWER else 1  # 16-px patches: the same unit grids
    rng = np.random.default_rng(0)
    drawn = [Image.fromarray(rng.integers(0, 256, (h * scale, w * scale, 3), dtype=np.uint8))
             for h, w in SIZES]
    return [drawn[i] for i in IMAGES]


def inputs(processor, pictures, prompts=PROMPTS, side="left"):
    return processor_inputs(processor, pictures, prompts, side)


def unpruned(model, batch):
    """The unpatched model's pieces for a batch of unpruned prompts: (input embeddings with the
    image rows in, position ids (3, B, L), rope_deltas, deepstack features or None)."""
    inner = model.model
    with torch.no_grad():
        images = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        rows = torch.cat(images.pooler_output)
        ids = batch["input_ids"]
        image = ids == model.config.image_token_id
        embeds = inner.get_input_embeddings()(ids).masked_scatter(image[..., None], rows)
        positions, deltas = inner.get_rope_index(
            ids, batch["mm_token_type_ids"], batch["image_grid_thw"],
            attention_mask=batch["attention_mask"])
    deepstack = getattr(images, "deepstack_features", None)
    return embeds, positions, deltas, deepstack


def kept_columns(batch, model, keep):
    """Per sample, the columns of the unpruned prompt that the pruned one keeps: its real tokens
    minus the image placeholders of the units not in `keep`."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    image = ids == model.config.image_token_id
    flat = image.reshape(-1).nonzero().squeeze(1).tolist()
    dropped, start = set(), 0
    units = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    for n, idx in zip(units, keep):
        slots = flat[start:start + n]
        start += n
        dropped.update(slots[u] for u in range(n) if u not in set(idx.tolist()))
    L = ids.shape[1]
    return [[c for c in range(L) if mask[b, c] and b * L + c not in dropped]
            for b in range(ids.shape[0])]


def expected_logits(model, batch, pieces, keep, swap_positions=False):
    """The unpatched language model on the unpruned prompt's embeddings and positions with the
    dropped image rows removed, left-padded; (logits (B, L', V), attention mask (B, L')).
    swap_positions: give every image row its unit's height as width and its width as height
    (a wrong position, for the check that the comparison notices one)."""
    embeds, positions, _, deepstack = pieces
    columns = kept_columns(batch, model, keep)
    B, width = len(columns), max(map(len, columns))
    image = batch["input_ids"] == model.config.image_token_id
    x = embeds.new_zeros(B, width, embeds.shape[-1])
    pos = positions.new_zeros(3, B, width)
    mask = torch.zeros(B, width, dtype=torch.long)
    visual = torch.zeros(B, width, dtype=torch.bool)
    for b, cols in enumerate(columns):
        at = slice(width - len(cols), width)
        x[b, at], pos[:, b, at], mask[b, at] = embeds[b, cols], positions[:, b, cols], 1
        visual[b, at] = image[b, cols]
        if swap_positions:
            rows = visual[b].nonzero().squeeze(1)
            pos[1:, b, rows] = pos[1:, b, rows].flip(0)
    extra = {}
    if deepstack is not None:
        extra = dict(visual_pos_masks=visual, deepstack_visual_embeds=[
            torch.cat([rows.index_select(0, idx) for rows, idx in zip(feature, keep)])
            for feature in deepstack])
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=x, position_ids=pos,
                                            attention_mask=mask, **extra).last_hidden_state
        return model.lm_head(hidden), mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how, side", [
    (dict(k_anchors=2, top_m=3), "left"), (dict(ratio=0.4, selection="cls"), "left"),
    (dict(k_anchors=1, ratio=0.5, selection="score"), "right")])
def test_logits_equal_the_unpatched_language_model_on_the_kept_rows(qwen, family, how, side):
    model, processor, pictures = qwen(family)
    batch = inputs(processor, pictures)
    pieces = unpruned(model, batch)
    prune_image_tokens(model, processor, **how)
    try:
        pruned = inputs(processor, pictures, side=side)
        with torch.no_grad():
            logits = model(**pruned).logits
        keep = pruned_block(model).last_keep_idx
        state = pruned_block(model)
    finally:
        remove_pruning(model)
    units = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert [len(idx) for idx in keep] == [state.kept(n) for n in units]
    assert all(torch.equal(idx, idx.sort().values) for idx in keep)
    expected, mask = expected_logits(model, batch, pieces, keep)
    real = pruned["attention_mask"].bool()  # the expected prompts are left-padded
    assert torch.equal(mask.sum(dim=1), real.sum(dim=1))
    torch.testing.assert_close(logits[real], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    # The comparison notices a wrong position: the same rows with height and width swapped.
    wrong, _ = expected_logits(model, batch, pieces, keep, swap_positions=True)
    assert not torch.allclose(logits[real], wrong[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_goes_on_from_the_unpruned_positions(qwen, family):
    model, processor, pictures = qwen(family)
    batch = inputs(processor, pictures)
    embeds, positions, deltas, deepstack = unpruned(model, batch)
    lengths = batch["attention_mask"].sum(dim=1)
    prune_image_tokens(model, processor, k_anchors=2, top_m=2)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            model.generate(**pruned, max_new_tokens=1, do_sample=False)
        got = model.model.rope_deltas.squeeze(1)
    finally:
        remove_pruning(model)
    # the unpruned prompt's largest position + 1 - the pruned prompt's length
    expected = deltas.squeeze(1) + lengths - pruned["attention_mask"].sum(dim=1)
    assert torch.equal(got, expected)
    assert (expected > deltas.squeeze(1)).all()  # the pruned prompts are shorter


def generate(model, batch, tokens=5):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_of_a_batch_equals_each_sample_alone(qwen, family):
    batched_generate_equals_each_alone(*qwen(family), k_anchors=2, top_m=3)


def batched_generate_equals_each_alone(model, processor, pictures, **how):
    """Pruned with `how`: greedy generate on PROMPTS in one batch gives each prompt's tokens
    and kept units alone (also used by test_qwen_vl_layer.py)."""
    per_prompt = [[pictures[i] for i in images] for images in PER_PROMPT]
    prune_image_tokens(model, processor, **how)
    try:
        batched = generate(model, inputs(processor, pictures))
        keep_batched = pruned_block(model).last_keep_idx
        alone, keep_alone = [], []
        for images, prompt in zip(per_prompt, PROMPTS):
            alone.append(generate(model, inputs(processor, images, [prompt]))[0])
            keep_alone += pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keep_batched, keep_alone))
    for b in range(3):
        assert torch.equal(batched[b], alone[b])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cls_selection_keeps_the_units_whose_patches_receive_most_attention(qwen, family):
    """Computed here from the last block's captured input: q/k with the block's own rotary
    embedding, attention within each image (the tiny towers' last block attends to the whole
    image), the attention each patch receives averaged over heads and the image's patches."""
    import sys
    model, processor, pictures = qwen(family)
    batch = inputs(processor, pictures)
    block = model.model.visual.blocks[-1]
    captured = {}

    def capture(module, args, kwargs):
        captured.update(x=args[0], **kwargs)
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        prune_image_tokens(model, processor, k_anchors=1, ratio=0.3, selection="cls")
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    x, (cos, sin) = captured["x"], captured["position_embeddings"]
    attn = block.attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        q, k, _ = attn.qkv(block.norm1(x)).reshape(len(x), 3, attn.num_heads, -1).unbind(1)
        q, k = rotary(q, k, cos, sin)
    order = torch.arange(len(x))
    if family == "qwen2_5_vl":  # the tower's rows are in window order: back to unit order
        from transformers.vision_utils import get_vision_window_index
        visual = model.model.visual
        window, _ = get_vision_window_index(batch["image_grid_thw"], 2, visual.window_size,
                                            visual.patch_size)
        order = torch.cat([torch.arange(4 * w, 4 * w + 4)
                           for w in torch.argsort(window).tolist()])
    q, k = q[order], k[order]
    start = 0
    for n, idx in zip((batch["image_grid_thw"].prod(-1) // 4).tolist(), keep):
        rows = slice(start, start + 4 * n)
        start += 4 * n
        logits = torch.einsum("ihd,jhd->hij", q[rows], k[rows]) * attn.scaling
        received = logits.softmax(dim=-1).mean(dim=0).mean(dim=0)     # (4n,)
        units = received.view(n, 4).mean(dim=1)
        count = -(-3 * n // 10)  # ceil(0.3 n)
        expected = torch.sort(units, descending=True, stable=True).indices[:count].sort().values
        assert torch.equal(idx, expected), (n, idx, expected)


@pytest.mark.parametrize("segmented", [False, True], ids=["whole", "windows"])
def test_unit_attention_in_bands_equals_the_whole_map(segmented):
    """The unit attention computed a band of query rows at a time (several bands here, the last
    one short) equals SPEC's definition taken on the whole N x N map of every head."""
    from tokenprune.reference import unit_attention
    generator = torch.Generator().manual_seed(0)
    units, merge2, heads, d = 13, 4, 3, 8
    N = units * merge2
    q, k = (torch.randn(N, heads, d, generator=generator) for _ in range(2))
    segment = (torch.arange(N) // 20 if segmented else torch.zeros(N, dtype=torch.long))
    logits = torch.einsum("ihd,jhd->hij", q, k) * 0.3
    logits = logits.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    expected = logits.softmax(dim=-1).mean(dim=0).view(units, merge2, units, merge2).mean((1, 3))
    banded = unit_attention(q, k, segment if segmented else None, 0.3, units, merge2,
                            chunk_elements=3 * N * merge2)
    torch.testing.assert_close(banded, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_is_bit_identical_and_remove_pruning_restores(qwen, family):
    model, processor, pictures = qwen(family)
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.warns(UserWarning, match="nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None
    again = inputs(processor, pictures)
    with torch.no_grad():
        assert torch.equal(model(**again).logits, before)
    prune_image_tokens(model, processor, ratio=0.5)
    assert (inputs(processor, pictures)["input_ids"] == model.config.image_token_id).sum() == \
        sum(-(-n // 2) for n in (6, 8, 9, 9))
    assert (model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
    remove_pruning(model)
    inner = model.model
    assert not any(name in inner.__dict__ for name in
                   ("get_image_features", "get_video_features", "get_rope_index"))
    assert not inner._forward_pre_hooks and not inner.language_model._forward_pre_hooks
    assert not any(block._forward_pre_hooks for block in inner.visual.blocks)
    assert "replace_image_token" not in processor.__dict__
    after = inputs(processor, pictures)
    assert torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)


@pytest.mark.parametrize("layer", [None, -1])  # -1: pruning inside the tower leaves it too
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_passes_through_unpruned(qwen, family, layer):
    video_passes_through(*qwen(family)[:2], layer)


def video_passes_through(model, processor, layer):
    """The features of a 4 x 4-patch video (4 tokens) pruned with `layer` equal the unpatched
    model's, and nothing is selected (also used by test_qwen3_5.py)."""
    patch = model.config.vision_config.patch_size
    grid = torch.tensor([[1, 4, 4]])
    # 16 patches, each t x C x patch^2 values (t = 2 frames, C = 3 colours)
    video = torch.randn(16, 2 * 3 * patch ** 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.model.get_video_features(video, grid).pooler_output
    prune_image_tokens(model, processor, ratio=0.25, layer=layer)
    try:
        with torch.no_grad():
            after = model.model.get_video_features(video, grid).pooler_output
        assert pruned_block(model).last_keep_idx is None
    finally:
        remove_pruning(model)
    assert len(after[0]) == 4 and torch.equal(after[0], before[0])


def test_the_reported_config_is_what_runs(qwen):
    """pruned_block(model).config reports the call's settings: after ratio=0.5 it said
    k_anchors=10, top_m=54, the defaults that do not apply there (issue 28). With a ratio,
    top_m is None and each image of n units keeps ceil(0.5 * n) (6, 8, 9 -> 3, 4, 5)."""
    import math
    model, processor, pictures = qwen("qwen2_5_vl")
    batch = inputs(processor, pictures)
    units = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    for how, top_m, counts in ((dict(ratio=0.5), None, [math.ceil(0.5 * n) for n in units]),
                               (dict(k_anchors=2, top_m=3), 3, [min(5, n) for n in units]),
                               (dict(), 54, units)):
        prune_image_tokens(model, processor, **how)
        try:
            with torch.no_grad():
                model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            state = pruned_block(model)
        finally:
            remove_pruning(model)
        config = state.config
        assert (config.k_anchors, config.top_m, config.ratio) == (
            how.get("k_anchors", 10), top_m, how.get("ratio")), how
        assert (config.selection, config.mmr_lambda) == ("mmr", 0.8)
        assert [len(idx) for idx in state.last_keep_idx] == counts == [state.kept(n)
                                                                        for n in units]


def test_refusals(qwen):
    model, processor, _ = qwen("qwen2_5_vl")
    for ratio in (0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            prune_image_tokens(model, ratio=ratio)
    with pytest.raises(ValueError, match="top_m=4 and ratio=0.5 .*ambiguous"):
        prune_image_tokens(model, top_m=4, ratio=0.5)
    with pytest.raises(UnsupportedModelError, match="Qwen2_5_VLProcessor"):
        prune_image_tokens(model, processor.tokenizer)
    with pytest.raises(ValueError, match="selection"):
        prune_image_tokens(model, selection="best")
    assert pruned_block(model) is None


def test_the_generate_command_runs_a_saved_qwen_model(tmp_path, capsys):
    from helpers import run_main
    from PIL import Image
    from tiny_qwen_vl import save_qwen_vl
    folder = save_qwen_vl(str(tmp_path / "qwen"), "qwen2_5_vl", "tiny", seed=0)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(32, 48), (48, 48)]):  # 6 and 9 units
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    status, out, err = run_main(["generate", "--model", folder, "--image", paths[0], "--image",
                                 paths[1], "--prompt", "what is this ?", "--max_new_tokens", "2",
                                 "--k_anchors", "2", "--top_m", "2"], capsys)
    assert status == 0, err
    assert "qwen2_5_vl, 6-9 image tokens per image" in err
    assert "6-9 -> 4 image tokens per image; batch 2" in out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selection", ["mmr", "cls", "score"])
def test_triton_backend_keeps_the_units_the_reference_keeps(qwen, family, selection):
    model, processor, pictures = qwen(family)
    batch = inputs(processor, pictures)
    keeps = {}
    for backend in ("reference", "triton"):
        prune_image_tokens(model, k_anchors=2, top_m=3, selection=selection, backend=backend)
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        keeps[backend] = pruned_block(model).last_keep_idx
    remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps["triton"], keeps["reference"]))


def test_an_explicit_triton_backend_refuses_a_windowed_selecting_block():
    """The kernels read a block that attends to the whole image. Here the last block attends
    within windows: "auto" (the reference, on the CPU) selects, "triton" says why it cannot."""
    model, processor = build_qwen_vl("qwen2_5_vl", "tiny", seed=0,
                                     vision=dict(fullatt_block_indexes=[0]))
    batch = inputs(processor, pictures_for("qwen2_5_vl"))
    prune_image_tokens(model, k_anchors=2, top_m=3, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs the selecting block to attend "
                                         "to the whole image"), torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    prune_image_tokens(model, k_anchors=2, top_m=3, backend="auto")
    with torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert all(len(keep) == 5 for keep in pruned_block(model).last_keep_idx)


def test_the_inner_model_class_and_a_deep_copy_prune_on_their_own(qwen):
    import copy
    model, processor, pictures = qwen("qwen2_5_vl")
    prune_image_tokens(model, processor, k_anchors=2, top_m=2)
    try:
        batch = inputs(processor, pictures)
        assert torch.equal(batch["mm_token_type_ids"].bool(),
                           batch["input_ids"] == model.config.image_token_id)
        with torch.no_grad():
            logits = model(**batch).logits
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(twin(**batch).logits, logits)
        assert pruned_block(model).last_keep_idx is not None
        assert pruned_block(twin) is not pruned_block(model)
        remove_pruning(twin)
        assert pruned_block(model) is not None
    finally:
        remove_pruning(model)
    inner = model.model  # the *Model class, pruned on its own
    prune_image_tokens(inner, k_anchors=2, top_m=2)
    try:
        with torch.no_grad():
            hidden = inner(**{k: v for k, v in batch.items()}).last_hidden_state
    finally:
        remove_pruning(inner)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)
