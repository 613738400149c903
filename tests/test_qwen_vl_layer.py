"""prune_image_tokens(..., layer=L) on tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models
whose towers are deeper than test_qwen_vl's, so that blocks run after the cut, and whose vision
attention is sharper (`sharpen`):
- Qwen2-VL: 3 full-attention blocks, L = 1;
- Qwen2.5-VL: 4 blocks, full attention at 1 and 3, windows of 2 x 2 units at 0 and 2, L = 1 (so
  block 2 attends in windows of kept units);
- Qwen3-VL: 4 blocks, deepstack features from blocks 0 (before L) and 2 (after), L = 1.

The expected tower output is computed here from the definition (SPEC.md, "Pruning inside the
Qwen vision tower"), with the model's own block modules: block L's input and rotary embeddings
captured from the unpatched tower, taken to unit order; the cls selection computed from them;
then blocks L.. called on each image's kept patches (on each window's, for a window block), one
call per attention segment; the merger on the result. The images are those of test_qwen_vl:
6 (2 x 3), 8 (4 x 2) and 9 (3 x 3) units.
"""
import sys

import numpy as np
import pytest
import torch

from tokenprune import prune_image_tokens, pruned_block, remove_pruning

pytest.importorskip("transformers")
from test_qwen_vl import (FAMILIES, batched_generate_equals_each_alone,  # noqa: E402
                          expected_logits, inputs, pictures_for, unpruned)
from tiny_qwen_vl import build_qwen_vl  # noqa: E402

DEEP = {"qwen2_vl": dict(depth=3),
        "qwen2_5_vl": dict(depth=4, fullatt_block_indexes=[1, 3]),
        "qwen3_vl": dict(depth=4, deepstack_visual_indexes=[0, 2]),
        # test_qwen3_5.py's, with this fixture
        "qwen3_vl_moe": dict(depth=4, deepstack_visual_indexes=[0, 2]),
        "qwen3_5": dict(depth=3), "qwen3_5_moe": dict(depth=3)}
LAYER = 1
WINDOW = 2  # units per window side in the tiny Qwen2.5-VL (32 px windows, 8 px patches, 2 x 2)
HOW = dict(k_anchors=1, ratio=0.4, selection="cls")


@pytest.fixture(scope="module")
def deep():
    built = {}

    def get(family):
        if family not in built:
            model, processor = build_qwen_vl(family, "tiny", seed=1, vision=DEEP[family])
            sharpen(model)
            built[family] = model, processor, pictures_for(family)
        return built[family]
    return get


def sharpen(model):
    """q and k of every vision block 8 times larger: random weights of std 0.02 give near-uniform
    attention, under which a patch's rotary position hardly matters; these make it matter."""
    with torch.no_grad():
        for block in model.model.visual.blocks:
            rows = 2 * block.attn.qkv.in_features  # q's and k's rows of the qkv projection
            block.attn.qkv.weight[:rows] *= 8


def unit_order(model, grid):
    """For each patch in unit order (image by image, unit by unit, its 4 patches), its row in
    the tower (Qwen2.5-VL holds the units in window order)."""
    visual = model.model.visual
    rows = int(grid.prod(-1).sum())
    if not hasattr(visual, "window_size"):
        return torch.arange(rows)
    from transformers.vision_utils import get_vision_window_index
    window, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    return torch.cat([torch.arange(4 * w, 4 * w + 4) for w in torch.argsort(window).tolist()])


def captured_input(model, batch, block_index):
    """Block `block_index`'s input and rotary (cos, sin) in the unpatched tower, in unit order,
    and the unpatched image features (for the deepstack rows taken before L)."""
    block = model.model.visual.blocks[block_index]
    captured = {}

    def capture(module, args, kwargs):
        captured.update(x=args[0], rotary=kwargs["position_embeddings"])
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            features = model.model.get_image_features(batch["pixel_values"],
                                                      batch["image_grid_thw"])
    finally:
        handle.remove()
    order = unit_order(model, batch["image_grid_thw"])
    cos, sin = captured["rotary"]
    return captured["x"][order], (cos[order], sin[order]), features


def cls_keep(block, x, rotary, count):
    """The `count` units of one image whose patches receive the most attention at `block`
    (full attention over the image), ascending."""
    attn = block.attn
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        q, k, _ = attn.qkv(block.norm1(x)).reshape(len(x), 3, attn.num_heads, -1).unbind(1)
        q, k = apply(q, k, *rotary)
        logits = torch.einsum("ihd,jhd->hij", q, k) * attn.scaling
    units = logits.softmax(dim=-1).mean(dim=0).mean(dim=0).view(-1, 4).mean(dim=1)
    return torch.sort(units, descending=True, stable=True).indices[:count].sort().values


def windows_of(keep, width):
    """Kept units of one image grouped by their window (row-major over windows, units in
    their window in unit order); windows with no kept unit left out."""
    groups = {}
    for u in keep.tolist():
        row, col = divmod(u, width)
        groups.setdefault((row // WINDOW, col // WINDOW), []).append(u)
    return [torch.tensor(groups[w]) for w in sorted(groups)]


def run_block(block, x, rotary, segments):
    """The block on x, each segment (a list of row indices) attending within itself only."""
    out = torch.empty_like(x)
    for rows in segments:
        cu = torch.tensor([0, len(rows)], dtype=torch.int32)
        out[rows] = block(x[rows], cu_seqlens=cu,
                          position_embeddings=(rotary[0][rows], rotary[1][rows]))
    return out


def reference(model, batch, layer=LAYER, mistake=None):
    """(kept units per image, image features per image, deepstack features per image or None),
    from the definition. mistake: "window" (window blocks attend over the whole image),
    "rotary" (the kept patches get the rotary of the image's first patches), "deepstack" (a
    feature from before L taken at the first units rather than the kept ones)."""
    visual = model.model.visual
    grid = batch["image_grid_thw"]
    x_all, rotary_all, unpatched = captured_input(model, batch, layer)
    full = getattr(visual, "fullatt_block_indexes", range(len(visual.blocks)))
    deepstack = getattr(visual, "deepstack_visual_indexes", [])
    keeps, features, stacks, start = [], [], [], 0
    for i, (t, h, w) in enumerate(grid.tolist()):
        n = t * h * w // 4
        rows = slice(4 * start, 4 * (start + n))
        start += n
        x, rotary = x_all[rows], (rotary_all[0][rows], rotary_all[1][rows])
        keep = cls_keep(visual.blocks[layer], x, rotary, -(-4 * n // 10))
        patches = (keep[:, None] * 4 + torch.arange(4)).reshape(-1)
        at = torch.arange(len(patches)) if mistake == "rotary" else patches
        x, rotary = x[patches], (rotary[0][at], rotary[1][at])
        place = {u: j for j, u in enumerate(keep.tolist())}
        windows = [(torch.tensor([place[u] for u in units.tolist()])[:, None] * 4
                    + torch.arange(4)).reshape(-1) for units in windows_of(keep, w // 2)]
        whole = [torch.arange(len(patches))]
        stack = {}
        with torch.no_grad():
            for b in range(layer, len(visual.blocks)):
                window_block = b not in full and mistake != "window"
                x = run_block(visual.blocks[b], x, rotary, windows if window_block else whole)
                if b in deepstack:
                    stack[b] = visual.deepstack_merger_list[deepstack.index(b)](x)
            for b in deepstack:
                if b < layer:
                    taken = torch.arange(len(keep)) if mistake == "deepstack" else keep
                    stack[b] = unpatched.deepstack_features[deepstack.index(b)][i][taken]
            features.append(visual.merger(x))
        keeps.append(keep)
        stacks.append([stack[b] for b in deepstack])
    return keeps, features, (stacks if deepstack else None)


def full_pieces(model, batch, keeps, features, stacks):
    """test_qwen_vl's `unpruned` pieces with every image's kept rows replaced by `features`
    (and its deepstack rows by `stacks`), for expected_logits."""
    embeds, positions, deltas, deepstack = unpruned(model, batch)

    def spread(rows, keep, units):
        out = rows.new_zeros(units, rows.shape[-1])
        out[keep] = rows
        return out
    units = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    image_rows = torch.cat([spread(f, k, n) for f, k, n in zip(features, keeps, units)])
    image = (batch["input_ids"] == model.config.image_token_id)[..., None]
    embeds = model.model.get_input_embeddings()(batch["input_ids"]).masked_scatter(image,
                                                                                  image_rows)
    if stacks is not None:
        deepstack = [[spread(s[j], k, n) for s, k, n in zip(stacks, keeps, units)]
                     for j in range(len(stacks[0]))]
    return embeds, positions, deltas, deepstack


@pytest.mark.parametrize("family, layer", [
    ("qwen2_vl", LAYER), ("qwen2_vl", 0), ("qwen2_5_vl", LAYER), ("qwen2_5_vl", -1),
    ("qwen3_vl", LAYER), ("qwen3_vl", 2)])  # Qwen3-VL at 2: a deepstack feature from L itself
def test_the_tower_and_the_logits_equal_the_definition(deep, family, layer):
    model, processor, pictures = deep(family)
    batch = inputs(processor, pictures)
    index = layer % len(model.model.visual.blocks)
    keeps, features, stacks = reference(model, batch, index)
    prune_image_tokens(model, processor, layer=layer, **HOW)
    try:
        with torch.no_grad():
            got = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            logits = model(**pruned).logits
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keep, keeps))
    for a, b in zip(got.pooler_output, features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if stacks is not None:
        for j, feature in enumerate(got.deepstack_features):
            for a, s in zip(feature, stacks):
                torch.testing.assert_close(a, s[j], atol=1e-5, rtol=1e-5)
    expected, mask = expected_logits(model, batch, full_pieces(model, batch, keeps, features,
                                                               stacks), keeps)
    real = pruned["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    # The comparison notices each mistake this family can make.
    mistakes = ["rotary"] + {(("qwen2_5_vl", LAYER)): ["window"],
                             ("qwen3_vl", LAYER): ["deepstack"]}.get((family, layer), [])
    for mistake in mistakes:
        wrong = reference(model, batch, index, mistake)
        wrong_logits, _ = expected_logits(model, batch, full_pieces(model, batch, *wrong), keeps)
        assert not torch.allclose(logits[real], wrong_logits[mask.bool()], atol=1e-4,
                                  rtol=1e-4), mistake


def test_the_windows_after_the_cut_are_the_kept_units_of_each_window(deep):
    model, processor, pictures = deep("qwen2_5_vl")
    batch = inputs(processor, pictures)
    received = {}

    def record(index):
        def hook(module, args, kwargs):
            received[index] = (kwargs["cu_seqlens"].tolist(), len(args[0]))
        return hook
    prune_image_tokens(model, processor, layer=LAYER, **HOW)
    blocks = model.model.visual.blocks
    handles = [blocks[b].register_forward_pre_hook(record(b), with_kwargs=True)
               for b in range(len(blocks))]
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        keep = pruned_block(model).last_keep_idx
    finally:
        for handle in handles:
            handle.remove()
        remove_pruning(model)
    windows, images = [0], [0]
    for idx, (t, h, w) in zip(keep, batch["image_grid_thw"].tolist()):
        for units in windows_of(idx, w // 2):
            windows.append(windows[-1] + 4 * len(units))
        images.append(images[-1] + 4 * len(idx))
    kept_rows = images[-1]
    assert received[0][1] > kept_rows  # block 0, before L, runs on every patch
    assert received[LAYER] == (images, kept_rows)
    assert received[2] == (windows, kept_rows)
    assert received[3] == (images, kept_rows)
    assert len(windows) > len(images)  # the windows are not the images
    # Some window lost all its units (else the test could not tell a kept empty window).
    all_windows = sum(len(windows_of(torch.arange(t * h * w // 4), w // 2))
                      for t, h, w in batch["image_grid_thw"].tolist())
    assert len(windows) - 1 < all_windows


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_last_keeps_the_units_of_layer_none(deep, family):
    model, processor, pictures = deep(family)
    batch = inputs(processor, pictures)
    keeps, features = {}, {}
    for layer in (None, -1):
        prune_image_tokens(model, processor, layer=layer, k_anchors=2, top_m=2)
        with torch.no_grad():
            out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        keeps[layer], features[layer] = pruned_block(model).last_keep_idx, out.pooler_output
        remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps[None], keeps[-1]))
    # ... but the last block ran on the kept patches only, so the features differ.
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(features[None], features[-1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_of_a_batch_equals_each_sample_alone(deep, family):
    batched_generate_equals_each_alone(*deep(family), layer=LAYER, k_anchors=2, top_m=3)


def test_refusals(deep):
    model, processor, _ = deep("qwen2_5_vl")
    for layer in (4, -5):
        with pytest.raises(ValueError, match=r"layer must be a vision block index in \[-4, 3\]"):
            prune_image_tokens(model, layer=layer)
    # A value of the wrong type is refused for its type, even where it is in the range (issue 28:
    # 1.0 was said to be outside [-4, 3]).
    for layer, given in ((1.0, "float 1.0"), (True, "bool True"), ("1", "str '1'")):
        with pytest.raises(ValueError, match=rf"^layer must be an int \(a vision block index in "
                                             rf"\[-4, 3\]; .*\), got {given}$"):
            prune_image_tokens(model, layer=layer)
    for layer in (0, 2, -2):
        with pytest.raises(ValueError, match=r"window-attention block .* one of its "
                                             r"full-attention blocks \[1, 3\]"):
            prune_image_tokens(model, layer=layer)
    assert pruned_block(model) is None
    for layer in (-3, 3):  # negative from the end; the last block
        prune_image_tokens(model, layer=layer)
        assert pruned_block(model).layer == layer % 4
    remove_pruning(model)
    other, _, _ = deep("qwen2_vl")
    prune_image_tokens(other, layer=0)  # any block in Qwen2-VL and Qwen3-VL
    remove_pruning(other)


def test_layer_is_refused_for_llava():
    from tiny_llava import build_llava
    model, _ = build_llava()
    with pytest.raises(ValueError, match="layer=1 is for the Qwen-VL models"):
        prune_image_tokens(model, layer=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_pruning_restores_the_tower(deep, family):
    model, processor, pictures = deep(family)
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
    prune_image_tokens(model, processor, layer=LAYER, ratio=0.5)
    assert (model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
    with torch.no_grad():
        model(**inputs(processor, pictures))
    remove_pruning(model)
    visual = model.model.visual
    modules = [*visual.blocks, visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    after = inputs(processor, pictures)
    assert torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)


def test_the_generate_command_prunes_inside_the_tower(tmp_path, capsys):
    from helpers import run_main
    from PIL import Image
    from tiny_qwen_vl import save_qwen_vl
    folder = save_qwen_vl(str(tmp_path / "qwen"), "qwen2_5_vl", "tiny", seed=0)
    path = str(tmp_path / "0.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3),
                                                      dtype=np.uint8)).save(path)  # 9 units
    common = ["generate", "--model", folder, "--image", path, "--prompt", "what is this ?",
              "--max_new_tokens", "2", "--k_anchors", "2", "--top_m", "2"]
    status, out, err = run_main(common + ["--layer", "-1"], capsys)
    assert status == 0, err
    assert "9 -> 4 image tokens per image" in out and "vision block -1" in out
    # Block 0 of the tiny Qwen2.5-VL attends in windows: refused in one line, from its config
    # (test_generate.py::test_qwen_layer_is_refused_from_the_config: before anything loads).
    status, out, err = run_main(common + ["--layer", "0"], capsys)
    assert status != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("tokenprune: error: --layer 0 is window-attention block 0")
    assert "Traceback" not in err
