"""Under `generate`, a pruned Qwen-VL model's language model receives each kept image token at its
unpruned position, at the prefill and at every step, with and without a cache (issue 28).

What the language model receives is recorded by a forward pre-hook on it, registered after
prune_image_tokens so that it sees what tokenprune hands on. The expectation is computed here from
the unpatched model: its get_rope_index on the unpruned prompt, the columns of the image units
that the pruned model kept (taken from `last_keep_idx`), and the unpruned prompt's largest position
for the generated tokens, which follow it one by one. It is never the pruned model against itself:
a wrong position given the same way batched and alone fails here.

The models are test_qwen_vl_layer's (deeper towers, so that `layer=1` cuts with blocks after it);
the prompts and images are test_qwen_vl's: a left-padded batch of 3 with 4 images of 6, 8, 9 and
9 units, and each prompt alone.
"""
import pytest
import torch

from tokenprune import prune_image_tokens, pruned_block, remove_pruning

pytest.importorskip("transformers")
from test_qwen_vl import (FAMILIES, PER_PROMPT, PROMPTS, inputs, kept_columns,  # noqa: E402
                          unpruned)
from test_qwen_vl_layer import LAYER, deep  # noqa: E402,F401  (the module-scoped fixture)

STEPS = 3  # new tokens: the prefill and two decoding steps


def batches(pictures):
    """(prompts, their images) for the batch of every prompt and for each prompt alone."""
    alone = [([prompt], [pictures[i] for i in images])
             for prompt, images in zip(PROMPTS, PER_PROMPT)]
    return [(PROMPTS, pictures)] + alone


def recorded_generate(model, batch, use_cache):
    """Greedy generate of STEPS tokens; (the new tokens (B, STEPS), the position_ids the language
    model received at each call, its last three rows: the M-RoPE temporal, height, width)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"][-3:].clone())
    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False, use_cache=use_cache)
    finally:
        handle.remove()
    return out[:, batch["input_ids"].shape[1]:], seen


def expected_positions(model, full, positions, keep):
    """Per sample: the unpruned positions (3, n) of the tokens the pruned prompt keeps, in order,
    and the unpruned prompt's largest position (the first new token is at that + 1)."""
    columns = kept_columns(full, model, keep)
    mask = full["attention_mask"].bool()
    return [(positions[:, b, cols], int(positions[:, b, mask[b]].max()))
            for b, cols in enumerate(columns)]


def check(seen, expected, pruned, use_cache):
    mask = pruned["attention_mask"].bool()
    length = mask.shape[1]
    assert len(seen) == STEPS
    for b, (prompt, last) in enumerate(expected):
        real = mask[b].nonzero().squeeze(1)
        assert torch.equal(seen[0][:, b, real], prompt), f"prefill of sample {b}"
        for step in range(1, STEPS):
            if use_cache:  # only the token generated at the step before
                got = seen[step][:, b]
                assert got.shape[-1] == 1
                assert torch.equal(got, torch.full_like(got, last + step)), f"step {step}"
            else:  # the whole sequence again: the prompt, then the tokens generated so far
                assert torch.equal(seen[step][:, b, real], prompt), f"step {step}, the prompt"
                new = seen[step][:, b, length:]
                want = last + 1 + torch.arange(step).expand(3, step)
                assert torch.equal(new, want), f"step {step}, the new tokens"


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("layer", [None, LAYER], ids=["last_block", "layer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_gives_each_kept_token_its_unpruned_position(deep, family, layer, use_cache):
    model, processor, pictures = deep(family)
    runs = batches(pictures)
    fulls = [inputs(processor, images, prompts) for prompts, images in runs]
    positions = [unpruned(model, full)[1] for full in fulls]  # the unpatched model's
    prune_image_tokens(model, processor, layer=layer, selection="cls", k_anchors=2, top_m=3)
    kept = []
    try:
        for (prompts, images), full, unpruned_positions in zip(runs, fulls, positions):
            pruned = inputs(processor, images, prompts)
            _, seen = recorded_generate(model, pruned, use_cache)
            keep = pruned_block(model).last_keep_idx
            kept += keep
            check(seen, expected_positions(model, full, unpruned_positions, keep), pruned,
                  use_cache)
    finally:
        remove_pruning(model)
    # Some image dropped a unit before one it kept: had the kept units been the first ones, an
    # image's positions taken in order would have passed whatever units were kept.
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in kept)


def reference_greedy(model, full, keep, pieces=None):
    """Greedy decoding of STEPS tokens by the unpatched language model, called here on the
    unpruned prompt's input rows and positions with the dropped image rows taken out (left-padded),
    each new token appended at the next position, the whole sequence run again at each step.
    `pieces`: test_qwen_vl's `unpruned` pieces to take the rows from (default: the unpatched
    model's own, for the selection at the last block)."""
    embeds, positions, _, deepstack = pieces or unpruned(model, full)
    columns = kept_columns(full, model, keep)
    image = full["input_ids"] == model.config.image_token_id
    B, width = len(columns), max(map(len, columns))
    x = embeds.new_zeros(B, width, embeds.shape[-1])
    pos = positions.new_zeros(3, B, width)
    mask = torch.zeros(B, width, dtype=torch.long)
    visual = torch.zeros(B, width, dtype=torch.bool)
    for b, cols in enumerate(columns):
        at = slice(width - len(cols), width)
        x[b, at], pos[:, b, at], mask[b, at] = embeds[b, cols], positions[:, b, cols], 1
        visual[b, at] = image[b, cols]
    last = pos.amax(dim=(0, 2))  # (B,) the largest position of each prompt
    tokens = []
    for step in range(STEPS):
        extra = {}
        if deepstack is not None:
            extra = dict(visual_pos_masks=visual, deepstack_visual_embeds=[
                torch.cat([rows.index_select(0, idx) for rows, idx in zip(feature, keep)])
                for feature in deepstack])
        with torch.no_grad():
            hidden = model.model.language_model(inputs_embeds=x, position_ids=pos,
                                                attention_mask=mask, **extra).last_hidden_state
            token = model.lm_head(hidden[:, -1]).argmax(dim=-1)
        tokens.append(token)
        x = torch.cat([x, model.model.get_input_embeddings()(token)[:, None]], dim=1)
        pos = torch.cat([pos, (last + 1 + step).expand(3, B)[..., None]], dim=2)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        visual = torch.cat([visual, torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_the_language_model_on_the_kept_rows(deep, family):
    """The tokens themselves: the pruned model's greedy generate (with a cache) equals greedy
    decoding by the unpatched language model on the kept rows at their unpruned positions (at
    the last block, where the kept rows are the unpruned tower's; under layer=L the positions
    test above and test_qwen_vl_layer's rows cover it)."""
    model, processor, pictures = deep(family)
    full = inputs(processor, pictures)
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    try:
        got, _ = recorded_generate(model, inputs(processor, pictures), use_cache=True)
        keep = pruned_block(model).last_keep_idx
    finally:
        remove_pruning(model)
    assert torch.equal(got, reference_greedy(model, full, keep))


@pytest.mark.parametrize("how", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)],
                         ids=["beams", "return_sequences"])
def test_expanded_batches_keep_each_kept_token_at_its_unpruned_position(deep, how):
    """generate repeats each prompt's image features for beams and several returned sequences
    (the same rows objects, sample by sample): each copy's prefill positions are the prompt's."""
    model, processor, pictures = deep("qwen3_vl")
    full = inputs(processor, pictures)
    positions = unpruned(model, full)[1]
    prune_image_tokens(model, processor, selection="cls", k_anchors=2, top_m=3)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"][-3:].clone())
    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pruned = inputs(processor, pictures)
        with torch.no_grad():
            model.generate(**pruned, max_new_tokens=1, **{"do_sample": False, **how})
        keep = pruned_block(model).last_keep_idx
    finally:
        handle.remove()
        remove_pruning(model)
    mask = pruned["attention_mask"].bool()
    for b, (prompt, _) in enumerate(expected_positions(model, full, positions, keep)):
        real = mask[b].nonzero().squeeze(1)
        for copy in (2 * b, 2 * b + 1):  # generate expands sample by sample
            assert torch.equal(seen[0][:, copy, real], prompt), (b, copy)
