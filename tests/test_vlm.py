"""prune_image_tokens on tiny random-weight LLaVA models (tools/tiny_llava.py, made offline):
the language model receives the projector applied to the rows SPEC's reference selection keeps
of the feature layer, and is otherwise the unpatched model.

Tiny shapes: 32 px images in 8 px patches (16 patches), 2 vision blocks of width 32, a 2-layer
Llama of width 32. The expected features are computed here from the unpatched tower's hidden
states and its own projections, not through the library's adapter.
"""
import numpy as np
import pytest
import torch

import tokenprune
from tokenprune import (UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning,
                        select_reference)

pytest.importorskip("transformers")
from helpers import processor_inputs  # noqa: E402
from tiny_llava import build_llava  # noqa: E402  (tests/conftest.py puts tools/ on the path)

K, M = 2, 4
PROMPTS = ["USER: <image>\nwhat is this ? ASSISTANT:",
           "USER: <image>\ndescribe the picture ASSISTANT:",
           "USER: <image>\nhow many red cats are in the picture on the left ? ASSISTANT:"]


@pytest.fixture(scope="module")
def pictures():
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


# name -> build_llava arguments; the names say what each covers.
VARIANTS = {
    "clip": dict(vision="clip"),                               # LLaVA-1.5's layer -2, "default"
    "clip-full": dict(vision="clip", vision_feature_select_strategy="full"),  # class row first
    "clip-layers": dict(vision="clip", vision_feature_layer=[-2, -1]),  # selected at the deepest
    "siglip": dict(vision="siglip"),                           # no class token, row 0 dropped
    "siglip-full": dict(vision="siglip", vision_feature_select_strategy="full"),
    "clip-eager": dict(vision="clip", attn_implementation="eager"),
}


@pytest.fixture(scope="module")
def llava():
    """get(name) -> (model, processor), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_llava(size="tiny", seed=0, **VARIANTS[name])
        return built[name]
    return get


def expected_features(model, pixel_values, k=K, m=M, selection="mmr", mmr_lambda=0.8):
    """(features (images, rows, D), keep_idx): the projector applied to the rows of the listed
    hidden states that select_reference keeps, selected from the input of the block whose output
    is the deepest listed hidden state, with that block's own q/k/v projections. `selection`:
    prune_image_tokens' default, mmr."""
    cfg = model.config
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    listed = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) \
        else cfg.vision_feature_layer
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        deepest = max(layer % len(hidden) for layer in listed)
        x = hidden[deepest - 1]  # the input of block deepest - 1
        block = tower.encoder.layers[deepest - 1]
        y = block.layer_norm1(x)
        attn = block.self_attn
        qkv = torch.cat([attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)], dim=-1)
        class_token = "CLIP" in type(tower).__name__
        default = cfg.vision_feature_select_strategy == "default"
        p = 1 if class_token or default else 0
        keep = select_reference(x, qkv, attn.num_heads, k, m, 0.5, "none", num_prefix=p,
                                class_token=class_token, selection=selection,
                                mmr_lambda=mmr_lambda)
        rows = keep if default else torch.cat([torch.arange(p).expand(len(keep), -1), keep], 1)
        kept = torch.cat([torch.stack([hidden[layer][b, rows[b]] for b in range(len(rows))])
                          for layer in listed], dim=-1)
        return projector(kept), keep


def image_features(model, pixel_values):
    with torch.no_grad():
        return torch.stack(model.get_image_features(pixel_values).pooler_output)


def inputs(processor, pictures, prompts=PROMPTS, side="left"):
    return processor_inputs(processor, pictures, prompts, side)


@pytest.mark.parametrize("name", ["clip", "clip-full", "clip-layers", "siglip", "siglip-full"])
def test_image_features_are_the_projector_on_the_reference_rows(llava, pictures, name):
    model, processor = llava(name)
    pixel_values = inputs(processor, pictures)["pixel_values"]
    expected, keep = expected_features(model, pixel_values)
    prune_image_tokens(model, k_anchors=K, top_m=M)
    try:
        features = image_features(model, pixel_values)
        state = pruned_block(model)
        assert torch.equal(state.last_keep_idx, keep)
    finally:
        remove_pruning(model)
    count = K + M + (1 if name == "clip-full" else 0)
    assert features.shape[:2] == (3, count) and state.image_seq_length == count
    if name.startswith("siglip") and name != "siglip-full":
        assert (keep >= 1).all()  # row 0, dropped by "default", is never chosen
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how, k, m, rule", [
    (dict(selection="cls"), K, M, dict(selection="cls")),
    (dict(selection="score"), K, M, dict(selection="score")),
    (dict(selection="mmr", mmr_lambda=0.3), K, M, dict(selection="mmr", mmr_lambda=0.3)),
    (dict(ratio=0.4), 2, 5, {}),                        # ceil(0.4 * 16) = 7 = 2 anchors + 5
    (dict(k_anchors=3, ratio=0.125), 2, 0, {}),         # 0.125 * 16 = 2: both are anchors
    (dict(ratio=0.4, selection="cls"), 2, 5, dict(selection="cls")),
])
def test_selection_mmr_lambda_and_ratio_choose_the_rows(llava, pictures, how, k, m, rule):
    model, processor = llava("clip")
    pixel_values = inputs(processor, pictures)["pixel_values"]
    expected, keep = expected_features(model, pixel_values, k, m, **rule)
    counts = {} if "ratio" in how else {"top_m": M}
    prune_image_tokens(model, processor, **{"k_anchors": K, **counts, **how})
    try:
        features = image_features(model, pixel_values)
        assert torch.equal(pruned_block(model).last_keep_idx, keep)
        count = (inputs(processor, pictures)["input_ids"] == model.config.image_token_id).sum(1)
        assert (count == k + m).all()
        # The state reports the call's settings (with a ratio, top_m None: it does not apply)
        # and the count every image gets (issue 28).
        state = pruned_block(model)
        config = state.config
        assert (config.k_anchors, config.top_m, config.ratio) == (
            how.get("k_anchors", K), None if "ratio" in how else M, how.get("ratio"))
        assert config.selection == rule.get("selection", "mmr") and state.image_seq_length == k + m
    finally:
        remove_pruning(model)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


def test_the_default_selection_is_mmr(llava, pictures):
    model, processor = llava("clip")
    pixel_values = inputs(processor, pictures)["pixel_values"]
    keeps = {}
    for selection in ("mmr", "score", "cls"):
        keeps[selection] = expected_features(model, pixel_values, selection=selection)[1]
    prune_image_tokens(model, k_anchors=K, top_m=M)
    try:
        image_features(model, pixel_values)
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert torch.equal(keep, keeps["mmr"])
    assert not torch.equal(keeps["mmr"], keeps["score"])  # the test can tell them apart


def test_ratio_counts_a_product_near_an_integer_as_that_integer():
    from tokenprune.vlm.units import kept_count
    assert 0.07 * 100 > 7 and kept_count(100, 0, 0.07) == 7
    assert 0.28 * 25 > 7 and kept_count(25, 0, 0.28) == 7
    assert kept_count(100, 0, 0.07 + 1e-7) == 8
    assert kept_count(7, 0, 1e-9) == 1 and kept_count(7, 0, 1.0) == 7
    assert kept_count(7, 10, None) == 7 and kept_count(70, 10, None) == 10


def test_ratio_refusals_and_nothing_to_prune(llava, pictures):
    model, processor = llava("clip")
    for ratio in (0, 1.01, -1, float("inf"), "0.5"):
        with pytest.raises(ValueError, match=f"ratio must be a number in \\(0, 1\\], got"):
            prune_image_tokens(model, ratio=ratio)
    with pytest.raises(ValueError, match="top_m=54 and ratio=0.5 .*ambiguous"):
        prune_image_tokens(model, top_m=54, ratio=0.5)
    with pytest.warns(UserWarning, match="ratio=1.0 keeps all 16 patch tokens: nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_the_unpatched_model_fed_the_same_features(llava, pictures, side):
    model, processor = llava("clip")
    original = inputs(processor, pictures, side=side)
    expected, _ = expected_features(model, original["pixel_values"])
    prune_image_tokens(model, processor, k_anchors=K, top_m=M)
    try:
        batch = inputs(processor, pictures, side=side)
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        remove_pruning(model)
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    assert (image.sum(dim=1) == K + M).all()
    assert ids.shape[1] == original["input_ids"].shape[1] - (16 - (K + M))  # 16 -> 6 per image
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(image[..., None], expected.reshape(-1, expected.shape[-1]))
        unpatched = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], unpatched[real], atol=1e-5, rtol=1e-5)


def generate(model, batch, tokens=6):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


def test_greedy_generate_of_a_batch_equals_each_sample_alone(llava, pictures):
    model, processor = llava("clip")
    prune_image_tokens(model, processor, k_anchors=K, top_m=M)
    try:
        batched = generate(model, inputs(processor, pictures))
        alone = [generate(model, inputs(processor, [picture], [prompt]))[0]
                 for picture, prompt in zip(pictures, PROMPTS)]
        keep_alone = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert keep_alone.shape == (1, K + M)
    for b in range(3):
        assert torch.equal(batched[b], alone[b])


def test_sdpa_and_eager_give_the_same_tokens_and_stay_as_they_were(llava, pictures):
    tokens = {}
    for name in ("clip", "clip-eager"):
        model, processor = llava(name)
        before = (model.config.text_config._attn_implementation,
                  model.config.vision_config._attn_implementation)
        prune_image_tokens(model, processor, k_anchors=K, top_m=M)
        try:
            tokens[name] = generate(model, inputs(processor, pictures))
            assert (model.config.text_config._attn_implementation,
                    model.config.vision_config._attn_implementation) == before
        finally:
            remove_pruning(model)
        assert before == (("sdpa",) * 2 if name == "clip" else ("eager",) * 2)
    assert torch.equal(tokens["clip"], tokens["clip-eager"])


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_triton_backend_equals_the_reference_backend(llava, pictures, name):
    model, processor = llava(name)
    pixel_values = inputs(processor, pictures)["pixel_values"]
    features, keeps = {}, {}
    for backend in ("reference", "triton"):
        prune_image_tokens(model, k_anchors=K, top_m=M, backend=backend)
        features[backend] = image_features(model, pixel_values)
        keeps[backend] = pruned_block(model).last_keep_idx
    remove_pruning(model)
    assert torch.equal(keeps["triton"], keeps["reference"])
    assert torch.equal(features["triton"], features["reference"])


@pytest.mark.parametrize("name", ["clip-full", "clip-layers", "siglip"])
def test_generate_runs_with_the_pruned_placeholder_count(llava, pictures, name):
    model, processor = llava(name)
    prune_image_tokens(model, processor, k_anchors=K, top_m=M)
    try:
        batch = inputs(processor, pictures)
        out = generate(model, batch, tokens=3)
        count = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
        assert (count == model.config.image_seq_length).all()
    finally:
        remove_pruning(model)
    assert out.shape == (3, 3)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_nothing_to_prune_is_bit_identical(llava, pictures, name):
    model, processor = llava(name)
    patches = 16 if name == "clip" else 15  # SigLIP under "default": row 0 is not a candidate
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
        with pytest.warns(UserWarning, match="nothing to prune"):
            prune_image_tokens(model, processor, k_anchors=10, top_m=patches - 10)
        again = inputs(processor, pictures)
        after = model(**again).logits
    assert pruned_block(model) is None
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(before, after)


def test_an_unpatched_processor_is_refused_in_one_line_that_says_what_to_do(llava, pictures):
    """prune_image_tokens(model) alone, then the unpatched processor's 16 placeholders per
    image: our one line, which says what to do, and not transformers' count mismatch."""
    model, processor = llava("clip")
    batch = inputs(processor, pictures)
    prune_image_tokens(model, k_anchors=K, top_m=M)
    try:
        # A forward call is refused before the tower runs; generate encodes the images first.
        for run, encodes in ((lambda: model(**batch), False),
                             (lambda: generate(model, batch, tokens=2), True)):
            with pytest.raises(ValueError, match=(
                    r"^the prompts hold 48 image tokens for 3 images, 16 per image \(the "
                    r"unpruned count: was the processor patched\?\), but the pruned model gives "
                    r"6 per image: pass the processor to prune_image_tokens\(model, processor, "
                    r"\.\.\.\), or write pruned_block\(model\).image_seq_length = 6 image "
                    r"tokens per image$")):
                with torch.no_grad():
                    run()
            assert (pruned_block(model).last_keep_idx is not None) == encodes
        # Placeholders written by hand, 6 per image: the pruned model runs.
        ids = batch["input_ids"]
        image = model.config.image_token_id
        rows = [row[row != image].tolist() for row in ids]
        at = [row.tolist().index(image) for row in ids]
        written = [row[:i] + [image] * (K + M) + row[i:] for row, i in zip(rows, at)]
        width = max(map(len, written))
        pad = processor.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in written])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in written])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"])
        assert pruned_block(model).last_keep_idx.shape == (3, K + M)
    finally:
        remove_pruning(model)


def test_remove_pruning_restores_model_and_processor(llava, pictures):
    model, processor = llava("clip")
    blocks = model.model.vision_tower.encoder.layers
    batch = inputs(processor, pictures)
    seq_length = model.config.image_seq_length
    with torch.no_grad():
        before = model(**batch).logits
    prune_image_tokens(model, k_anchors=K, top_m=M)
    prune_image_tokens(model, processor, k_anchors=3, top_m=2)  # replaces the first pruning
    assert model.config.image_seq_length == 5
    assert (inputs(processor, pictures)["input_ids"] == model.config.image_token_id).sum() == 15
    assert processor._get_num_multimodal_tokens([(32, 32)] * 2).num_image_tokens == [5, 5]
    assert sum(len(block._forward_pre_hooks) for block in blocks) == 1
    remove_pruning(model)  # the processor patched with it too
    again = inputs(processor, pictures)
    with torch.no_grad():
        after = model(**again).logits
    assert model.config.image_seq_length == seq_length
    assert not any(block._forward_pre_hooks for block in blocks)
    assert not model.model.multi_modal_projector._forward_pre_hooks
    assert not model.model._forward_pre_hooks
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(before, after)
    assert processor._get_num_multimodal_tokens([(32, 32)]).num_image_tokens == [16]
    # A processor on its own: patched later with the same call, restored on its own.
    prune_image_tokens(model, k_anchors=K, top_m=M)
    prune_image_tokens(model, processor, k_anchors=K, top_m=M)
    remove_pruning(processor)
    assert torch.equal(inputs(processor, pictures)["input_ids"], batch["input_ids"])
    remove_pruning(model)


def test_bad_feature_layer_and_values_are_refused(llava):
    model, _ = llava("clip")
    layer = model.config.vision_feature_layer
    try:
        model.config.vision_feature_layer = 0
        with pytest.raises(ValueError, match="vision_feature_layer 0 .*embeddings"):
            prune_image_tokens(model)
        model.config.vision_feature_layer = 5
        with pytest.raises(ValueError, match=r"vision_feature_layer must be .*\[-3, 2\]"):
            prune_image_tokens(model)
    finally:
        model.config.vision_feature_layer = layer
    with pytest.raises(ValueError, match="alpha"):
        prune_image_tokens(model, alpha=2)
    assert pruned_block(model) is None


def test_unsupported_models_are_refused(llava):
    with pytest.raises(UnsupportedModelError, match=r"supports LLaVA-1.5 \(llava\)"):
        prune_image_tokens(torch.nn.Linear(2, 2))
    model, processor = llava("clip")
    with pytest.raises(UnsupportedModelError, match="LlavaProcessor"):
        prune_image_tokens(model, processor.tokenizer)
    assert pruned_block(model) is None  # refused before anything was patched
    with pytest.raises(UnsupportedModelError, match="prune_image_tokens"):
        tokenprune.replace_last_block(model)


def test_a_deep_copy_keeps_its_own_pruning(llava, pictures):
    import copy
    model, processor = llava("clip")
    pixel_values = inputs(processor, pictures)["pixel_values"]
    prune_image_tokens(model, k_anchors=K, top_m=M)
    try:
        twin = copy.deepcopy(model)
        features = image_features(twin, pixel_values)
        assert pruned_block(model).last_keep_idx is None
        assert pruned_block(twin).last_keep_idx.shape == (3, K + M)
        assert torch.equal(image_features(model, pixel_values), features)
        remove_pruning(twin)
        assert pruned_block(model) is not None and model.config.image_seq_length == K + M
    finally:
        remove_pruning(model)


@pytest.mark.parametrize("name, model_type, why", [
    ("LlavaNextVideoForConditionalGeneration", "llava_next_video", "video models"),
    ("VideoLlavaForConditionalGeneration", "video_llava", "video models"),
])
def test_the_refusal_says_what_is_not_supported_yet(name, model_type, why):
    # A stand-in class of that name and model_type (the families are looked up by
    # config.model_type; building the real models is not needed for the message).
    from types import SimpleNamespace
    stand_in = type(name, (torch.nn.Module,), {"__module__": "transformers.models.stand_in"})()
    stand_in.config = SimpleNamespace(model_type=model_type)
    with pytest.raises(UnsupportedModelError, match=f"{name}.*{why}.*supports LLaVA-1.5"):
        prune_image_tokens(stand_in)
