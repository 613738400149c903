"""prune_image_tokens on tiny random-weight Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE models
(tools/tiny_qwen_vl.py, made offline).

- Qwen3-VL-MoE: Qwen3-VL with mixture-of-experts MLPs; its tower here has 4 blocks and deepstack
  features from blocks 0 (before the cut at `layer=1`) and 2 (after it).
- Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's tower without deepstack features (3 blocks here), and a
  language model whose first layer is a gated delta net (linear attention, which reads no
  positions) and whose second is full attention (3D M-RoPE).
The models are test_qwen_vl_layer's `deep` ones (its DEEP), with sharpened vision attention, so
that the kept units and the rows after a cut depend on the rotary positions. The prompts and
images are test_qwen_vl's: a left-padded batch of 3 prompts with 4 images of 6, 8, 9 and 9
units.

Every expectation is computed here from the unpatched model, never from the pruned one: the kept
units by the cls rule from the selecting block's captured input and its own q/k (test_qwen_vl_
layer's `cls_keep`), the image rows from its tower (under `layer=L` from its own block modules run
on the kept patches: test_qwen_vl_layer's `reference`), the positions from its get_rope_index on
the unpruned prompt, and the tokens from its language model on those rows and positions
(test_qwen_generate's `reference_greedy`).
"""
import numpy as np
import pytest
import torch

from tokenprune import UnsupportedModelError, prune_image_tokens, pruned_block, remove_pruning

pytest.importorskip("transformers")
from test_qwen_generate import STEPS, batches, reference_greedy  # noqa: E402
import test_qwen_vl  # noqa: E402  (its logits test, called on these families)
from test_qwen_vl import inputs, kept_columns, unpruned, video_passes_through  # noqa: E402
from test_qwen_vl_layer import (HOW, LAYER, captured_input, cls_keep, deep,  # noqa: E402,F401
                                full_pieces, reference)

FAMILIES = ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def units_of(batch):
    return (batch["image_grid_thw"].prod(-1) // 4).tolist()


def expected_pieces(model, batch, layer):
    """(kept units per image, test_qwen_vl's `unpruned` pieces with every kept unit's row as the
    pruned model must give it) for HOW (cls, ratio 0.4): the selection at the last block's input
    (layer None; the rows are the unpruned tower's) or at block `layer`'s (the rows from blocks
    layer.. run on the kept patches)."""
    depth = len(model.model.visual.blocks)
    if layer is not None:
        keeps, features, stacks = reference(model, batch, layer % depth)
        return keeps, full_pieces(model, batch, keeps, features, stacks)
    block = model.model.visual.blocks[-1]
    x, (cos, sin), _ = captured_input(model, batch, depth - 1)
    keeps, start = [], 0
    for n in units_of(batch):
        rows = slice(4 * start, 4 * (start + n))
        start += n
        keeps.append(cls_keep(block, x[rows], (cos[rows], sin[rows]), -(-4 * n // 10)))
    return keeps, unpruned(model, batch)


def recorded_generate(model, batch, use_cache):
    """Greedy generate of STEPS tokens; (the new tokens (B, STEPS), what the language model
    received at each call: its input rows, position ids (the M-RoPE rows), deepstack features and
    their mask; and the (call, cos, sin) that reached each full-attention layer)."""
    calls, rotary = [], []
    language_model = model.model.language_model

    def record(module, args, kwargs):
        calls.append(dict(embeds=kwargs["inputs_embeds"].clone(),
                          positions=kwargs["position_ids"][-3:].clone(),
                          deepstack=kwargs.get("deepstack_visual_embeds"),
                          visual=kwargs.get("visual_pos_masks")))

    def attention(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        rotary.append((len(calls) - 1, cos.clone(), sin.clone()))
    handles = [language_model.register_forward_pre_hook(record, with_kwargs=True)]
    # Qwen3.5's linear-attention layers have no self_attn: they take no positions.
    handles += [layer.self_attn.register_forward_pre_hook(attention, with_kwargs=True)
                for layer in language_model.layers if hasattr(layer, "self_attn")]
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False, use_cache=use_cache)
    finally:
        for handle in handles:
            handle.remove()
    return out[:, batch["input_ids"].shape[1]:], calls, rotary


def check_calls(model, full, pruned, keeps, pieces, tokens, calls, use_cache):
    """The language model's input at the prefill and at every step against the expectation: the
    kept columns of the unpruned prompt's rows and positions, then the generated tokens at the
    unpruned prompt's largest position + 1, + 2, ..."""
    embeds, positions, _, deepstack = pieces
    embed = model.model.get_input_embeddings()
    columns = kept_columns(full, model, keeps)
    mask = pruned["attention_mask"].bool()
    length = mask.shape[1]
    full_mask = full["attention_mask"].bool()
    assert len(calls) == STEPS
    for b, cols in enumerate(columns):
        real = mask[b].nonzero().squeeze(1)
        want_rows, want_positions = embeds[b, cols], positions[:, b, cols]
        last = int(positions[:, b, full_mask[b]].max())
        for step, call in enumerate(calls):
            where = f"sample {b}, call {step}"
            if step and use_cache:  # only the token generated at the step before
                assert call["embeds"].shape[1] == 1, where
                torch.testing.assert_close(call["embeds"][b, 0], embed(tokens[b, step - 1]))
                assert torch.equal(call["positions"][:, b, 0],
                                   torch.full((3,), last + step)), where
                continue
            # the prefill, or without a cache the prompt again and the tokens generated so far
            torch.testing.assert_close(call["embeds"][b, real], want_rows, atol=1e-5, rtol=1e-5)
            assert torch.equal(call["positions"][:, b, real], want_positions), where
            torch.testing.assert_close(call["embeds"][b, length:], embed(tokens[b, :step]))
            new = call["positions"][:, b, length:]
            assert torch.equal(new, last + 1 + torch.arange(step).expand(3, step)), where
    if deepstack is None:
        assert all(call["deepstack"] is None for call in calls)
        return
    image = pruned["input_ids"] == model.config.image_token_id
    for step, call in enumerate(calls[:1] if use_cache else calls):
        assert torch.equal(call["visual"][:, :image.shape[1]], image), step
        for got, feature in zip(call["deepstack"], deepstack, strict=True):
            want = torch.cat([rows.index_select(0, idx) for rows, idx in zip(feature, keeps)])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("layer", [None, LAYER], ids=["last_block", "layer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_language_model_receives_the_kept_rows_at_their_unpruned_positions(
        deep, family, layer, use_cache):
    """At the prefill and at every decoding step of generate, batched and each prompt alone:
    the rows, the positions (and Qwen3-VL-MoE's deepstack rows), the positions' rotary
    embedding at every full-attention layer, the kept units, and the greedy tokens."""
    model, processor, pictures = deep(family)
    runs = batches(pictures) if layer is None and use_cache else batches(pictures)[:1]
    fulls = [inputs(processor, images, prompts) for prompts, images in runs]
    expected = [expected_pieces(model, full, layer) for full in fulls]
    greedy = [reference_greedy(model, full, keeps, pieces)
              for full, (keeps, pieces) in zip(fulls, expected)]
    rotary = model.model.language_model.rotary_emb
    prune_image_tokens(model, processor, layer=layer, **HOW)
    try:
        for (prompts, images), full, (keeps, pieces), want in zip(runs, fulls, expected, greedy):
            pruned = inputs(processor, images, prompts)
            tokens, calls, reached = recorded_generate(model, pruned, use_cache)
            got = pruned_block(model).last_keep_idx
            assert all(torch.equal(a, b) for a, b in zip(got, keeps, strict=True))
            check_calls(model, full, pruned, keeps, pieces, tokens, calls, use_cache)
            assert torch.equal(tokens, want)
            # What a decoding step without position_ids starts from: the unpruned prompt's
            # largest position + 1 - the pruned prompt's length.
            last = torch.stack([pieces[1][:, b, real].max() for b, real in
                                enumerate(full["attention_mask"].bool())])
            deltas = last + 1 - pruned["attention_mask"].sum(dim=1)
            assert torch.equal(model.model.rope_deltas.squeeze(1), deltas)
            # The positions reach the full-attention layers as given (Qwen3.5: layer 1 only).
            assert reached and {call for call, _, _ in reached} == set(range(STEPS))
            for call, cos, sin in reached:
                want_cos, want_sin = rotary(calls[call]["embeds"], calls[call]["positions"])
                assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    finally:
        remove_pruning(model)
    # Some image dropped a unit before one it kept (else positions taken in order would pass).
    assert any(not torch.equal(idx, torch.arange(len(idx))) for keeps, _ in expected
               for idx in keeps)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how, side", [
    (dict(k_anchors=2, top_m=3), "left"),  # the default selection, mmr
    (dict(ratio=0.5, selection="score", k_anchors=1), "right")])
def test_logits_equal_the_unpatched_language_model_and_notice_a_wrong_position(
        deep, family, how, side):
    """A forward pass (no generate): the logits at every real token equal the unpatched
    language model's on the kept rows at their unpruned positions; the same rows with each image
    token's height and width swapped give other logits, so a wrong position would fail here
    (test_qwen_vl's test, on these families)."""
    test_qwen_vl.test_logits_equal_the_unpatched_language_model_on_the_kept_rows(
        deep, family, how, side)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_processor_writes_the_kept_count_of_each_grid(deep, family):
    """ceil(0.3 n) placeholders for an image of n units, before the tower runs: the same for
    two different images of one grid, and what _get_num_multimodal_tokens says for its size."""
    model, processor, pictures = deep(family)
    images = pictures[:3] + [pictures[3].transpose(0)]  # images 3 and 4: one grid, other pixels
    prune_image_tokens(model, processor, ratio=0.3)
    try:
        batch = inputs(processor, images)
        told = processor._get_num_multimodal_tokens(
            image_sizes=[(image.height, image.width) for image in images]).num_image_tokens
    finally:
        remove_pruning(model)
    counts = [-(-3 * n // 10) for n in units_of(batch)]
    assert units_of(batch) == [6, 8, 9, 9] and counts == [2, 3, 3, 3] and told == counts
    image = batch["input_ids"] == model.config.image_token_id
    assert image.sum(dim=1).tolist() == [2, 6, 3]  # prompt 2 holds images 2 and 3
    assert torch.equal(batch["mm_token_type_ids"].bool(), image)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_is_bit_identical_and_remove_pruning_restores(deep, family):
    model, processor, pictures = deep(family)
    batch = inputs(processor, pictures)
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.warns(UserWarning, match="nothing to prune"):
        prune_image_tokens(model, processor, ratio=1.0)
    assert pruned_block(model) is None and "replace_image_token" not in processor.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs(processor, pictures)).logits, before)
    for layer in (None, LAYER):
        prune_image_tokens(model, processor, ratio=0.5, layer=layer)
        assert (model.config.text_config._attn_implementation,
                model.config.vision_config._attn_implementation) == ("sdpa", "sdpa")
        with torch.no_grad():
            model(**inputs(processor, pictures))
        remove_pruning(model)
    inner, visual = model.model, model.model.visual
    assert not any(name in inner.__dict__ for name in
                   ("get_image_features", "get_video_features", "get_rope_index"))
    modules = [inner, inner.language_model, *visual.blocks, visual.merger,
               *getattr(visual, "deepstack_merger_list", [])]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    assert "replace_image_token" not in processor.__dict__
    after = inputs(processor, pictures)
    assert torch.equal(after["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after).logits, before)


@pytest.mark.parametrize("layer", [None, LAYER])
@pytest.mark.parametrize("family", FAMILIES)
def test_video_passes_through_unpruned(deep, family, layer):
    """Qwen3.5 encodes video through get_image_features (Qwen3-VL too): still whole."""
    video_passes_through(*deep(family)[:2], layer)


def test_the_triton_kernels_keep_the_units_the_reference_keeps(deep):
    """The kernels (Triton's CPU interpreter here) on Qwen3.5's tower, whose blocks all attend to
    the whole image: the units of the PyTorch reference (test_qwen_vl runs every selection on
    Qwen3-VL, whose tower Qwen3-VL-MoE has as it is)."""
    model, processor, pictures = deep("qwen3_5")
    batch = inputs(processor, pictures)
    keeps = {}
    for backend in ("reference", "triton"):
        prune_image_tokens(model, k_anchors=2, top_m=3, backend=backend)
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        keeps[backend] = pruned_block(model).last_keep_idx
    remove_pruning(model)
    assert all(torch.equal(a, b) for a, b in zip(keeps["triton"], keeps["reference"],
                                                 strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_refusals(deep, family):
    model, processor, _ = deep(family)
    depth = len(model.model.visual.blocks)
    with pytest.raises(UnsupportedModelError, match=r"^prune_image_tokens can patch a "
                                                    r"Qwen3VLProcessor for .*, got \w+$"):
        prune_image_tokens(model, processor.tokenizer)
    with pytest.raises(ValueError, match=rf"^layer must be a vision block index in "
                                         rf"\[-{depth}, {depth - 1}\] .*got {depth}$"):
        prune_image_tokens(model, layer=depth)
    with pytest.raises(ValueError, match=r"^layer must be an int .*got float 1.0$"):
        prune_image_tokens(model, layer=1.0)
    with pytest.raises(ValueError, match="top_m=4 and ratio=0.5 .*ambiguous"):
        prune_image_tokens(model, top_m=4, ratio=0.5)
    with pytest.raises(ValueError, match="selection"):
        prune_image_tokens(model, selection="best")
    assert pruned_block(model) is None
    for layer in range(-depth, depth):  # every block of these towers attends to the whole image
        prune_image_tokens(model, layer=layer)
        assert pruned_block(model).layer == layer % depth
    remove_pruning(model)


def test_a_text_only_qwen3_5_is_refused_naming_the_supported_families(deep):
    """Qwen3_5ForCausalLM (the language model alone, model_type qwen3_5_text) has no image
    tokens to prune."""
    from tokenprune.vlm import supported
    from transformers import Qwen3_5ForCausalLM
    model, _, _ = deep("qwen3_5")
    text_only = Qwen3_5ForCausalLM(model.config.text_config)
    with pytest.raises(UnsupportedModelError) as refusal:
        prune_image_tokens(text_only)
    message = str(refusal.value)
    assert message.startswith("tokenprune.prune_image_tokens cannot prune Qwen3_5ForCausalLM; "
                              f"it supports {supported()}")
    for name in ("Qwen3-VL-MoE (qwen3_vl_moe)", "Qwen3.5 (qwen3_5)", "Qwen3.5-MoE (qwen3_5_moe)"):
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize("family, dense", [("qwen3_vl_moe", "Qwen3VLForConditionalGeneration"),
                                           ("qwen3_5_moe", "Qwen3_5ForConditionalGeneration")])
def test_an_moe_checkpoint_loaded_as_the_dense_class_is_refused_naming_its_classes(
        family, dense, tmp_path):
    """What lmms-eval's qwen3_vl and qwen3_5 load for an MoE folder whose name lacks "A3B": the
    dense class (its MLPs newly made) with the MoE config. Refused, saying which classes."""
    import transformers
    from tiny_qwen_vl import save_qwen_vl
    from transformers.utils import logging as transformers_logging
    folder = save_qwen_vl(str(tmp_path / family), family, "tiny", seed=0)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report of missing weights
    try:
        model = getattr(transformers, dense).from_pretrained(folder)
    finally:
        transformers_logging.set_verbosity(verbosity)
    assert model.config.model_type == family
    with pytest.raises(UnsupportedModelError, match=rf"^tokenprune.prune_image_tokens cannot "
                                                    rf"prune {dense} \(its config is .*'s, "
                                                    rf"'{family}', whose classes are \w+Moe"
                                                    rf"ForConditionalGeneration and \w+Model\); "
                                                    rf"it supports "):
        prune_image_tokens(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generate_command_compares_a_saved_model(family, tmp_path, capsys):
    """tokenprune generate --compare on the saved tiny model: the unpruned and the pruned answers,
    each the library's own (the pruned ones with the processor patched the same way)."""
    from helpers import run_main
    from PIL import Image
    from tiny_qwen_vl import save_qwen_vl
    import transformers
    from transformers import AutoProcessor

    from tokenprune.vlm import FAMILIES as TABLE
    folder = save_qwen_vl(str(tmp_path / family), family, "tiny", seed=0)
    rng = np.random.default_rng(0)
    images, paths = [], []
    for i, (h, w) in enumerate([(64, 96), (96, 96)]):  # 16-px patches: 6 and 9 units
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        paths.append(str(tmp_path / f"{i}.png"))
        images[-1].save(paths[-1])
    status, out, err = run_main(["generate", "--model", folder, "--image", paths[0], "--image",
                                 paths[1], "--prompt", "what is this ?", "--max_new_tokens", "3",
                                 "--k_anchors", "2", "--top_m", "2", "--compare"], capsys)
    assert status == 0, err
    assert f"{family}, 6-9 image tokens per image" in err
    lines = out.splitlines()
    assert lines[0].startswith("unpruned: 6-9 image tokens per image; batch 2")
    assert lines[3].startswith("pruned (k_anchors 2, top_m 2, mmr, lambda 0.8): 6-9 -> 4 image "
                               "tokens per image; batch 2")
    assert "speed-up over unpruned" in lines[3]
    model_class = getattr(transformers, TABLE[family].model_class)
    model = model_class.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                         "text": "what is this ?"}]}],
        add_generation_prompt=True)
    for first, pruning in ((1, {}), (4, dict(k_anchors=2, top_m=2))):
        if pruning:
            prune_image_tokens(model, processor, **pruning)
        batch = processor(images=images, text=[text] * 2, padding=True, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=3, do_sample=False)
        answers = processor.batch_decode(new[:, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
        assert lines[first:first + 2] == [f"  [{i}.png] {a.strip()}" for i, a in
                                          enumerate(answers)]

