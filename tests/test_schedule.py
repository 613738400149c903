"""Pruning schedules (SPEC.md, "Pruning at several blocks"): each stage selects among the tokens
the stages before it kept, and every stage's kept patches are reported in the original numbering.

The patched tower is checked against the same unpatched tower pruned by hand: forward pre-hooks
on its own blocks that, at each stage's block, take the attention from the block's own attention
module, select with the reference (select_from_attention), gather the kept rows, map the local
indices to the original numbering with plain list indexing, and hand rotary towers the rows of
the patches that reach each block. A wrong stage order, a wrong index mapping or wrong rotary
rows makes the outputs or the indices differ. Towers: 4 blocks, 36 patches, random weights.
"""
import copy
import functools
from contextlib import contextmanager

import pytest
import torch
from open_clip.transformer import VisionTransformer

from tokenprune import PruneConfig, pruned_block, pruned_blocks, remove_pruning, replace_last_block
from tokenprune.block import PrunedBlock
from tokenprune.reference import select_from_attention
from tokenprune.towers import find_tower

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,  # noqa: E402
                          SiglipVisionModel)

# Blocks 0, 2, 3 (a block between the first two stages, a negative layer): 20, 10, 5 patches.
SCHEDULE = [(0, 5, 15), (2, 3, 7), (-1, 2, 3)]
INDICES = (0, 2, 3)


# ----- the towers, and each family's own attention probabilities ----------------------------

def openclip_attention(block, x, rope):
    y = block.ln_1(x)
    return block.attn(y, y, y, need_weights=True)[1].float()  # the head mean, (B, T, T)


def timm_attention(block, x, rope):
    """The head mean of the probabilities timm's attention computes (unfused), where its
    dropout reads them."""
    attn, seen = block.attn, {}
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.update(P=out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        attn(block.norm1(x), **({} if rope is None else {"rope": rope}))
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen["P"].float().mean(dim=1)


def hf_attention(block, x, rope):
    attn = block.self_attn
    y = block.layer_norm1(x)
    B, T, _ = y.shape
    q = attn.q_proj(y).view(B, T, attn.num_heads, attn.head_dim)
    k = attn.k_proj(y).view(B, T, attn.num_heads, attn.head_dim)
    return (torch.einsum("bihd,bjhd->bhij", q, k) * attn.scale).softmax(dim=-1).mean(dim=1)


def hf_shapes():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                image_size=48, patch_size=8)


def build(name):
    torch.manual_seed(0)
    if name == "openclip":
        return VisionTransformer(image_size=48, patch_size=8, width=64, layers=4, heads=2,
                                 mlp_ratio=2.0, output_dim=32).eval()
    if name == "timm-vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4,
                                 img_size=96).eval()
    if name == "timm-vit-reg4":  # 4 registers, no class token: the received-attention rule
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=96,
                                 reg_tokens=4, class_token=False, global_pool="avg").eval()
    if name == "eva02":  # rotary positions
        return timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=4,
                                 img_size=84).eval()
    if name == "hf-clip":
        return CLIPVisionModel(CLIPVisionConfig(**hf_shapes())).eval()
    return SiglipVisionModel(SiglipVisionConfig(**hf_shapes())).eval()  # no class token


TOWERS = {  # name: (image size, attention)
    "openclip": (48, openclip_attention), "timm-vit": (96, timm_attention),
    "timm-vit-reg4": (96, timm_attention), "eva02": (84, timm_attention),
    "hf-clip": (48, hf_attention), "hf-siglip": (48, hf_attention),
}


def output(model, images):
    out = model(images)
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.fixture(scope="module")
def towers():
    """towers(name): the tower, built once per test module."""
    return functools.lru_cache(maxsize=None)(build)


def images_for(name, batch=2):
    size = TOWERS[name][0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ----- the tower pruned by hand ------------------------------------------------------------

@contextmanager
def pruned_by_hand(model, config, attention, given=None):
    """While active, the unpatched `model` prunes as `config`'s schedule says, by forward
    pre-hooks on its own blocks. Yields the list that each stage's kept patches (original
    numbering, (B, n), or None where the stage pruned nothing) are appended to. `given`: a
    list of each stage's kept patches (original numbering) to keep instead of selecting."""
    tower = find_tower(model)
    p, class_token = tower.num_prefix, tower.class_token
    blocks = list(tower.blocks)
    stages = dict(zip(config.block_indices(len(blocks)), config.stage_configs()))
    kept = []

    def so_far():
        return next((keep for keep in reversed(kept) if keep is not None), None)

    def rows_of(rope):  # the rotary rows of the patches kept so far, (B, 1, n, d)
        keep = so_far()
        return rope if rope is None or keep is None else rope[keep - p].unsqueeze(1)

    def pre_hook(index, module, args, kwargs):
        x, rope = args[0], kwargs.get("rope")
        if index in stages and stages[index].kept_patches < x.shape[1] - p:
            cfg = stages[index]
            before = so_far()
            reaching = (list(range(p, x.shape[1])) if before is None else before.tolist())
            if given is None:
                local = select_from_attention(attention(module, x, rows_of(rope)), x,
                                              cfg.k_anchors, cfg.top_m, cfg.alpha,
                                              cfg.score_norm, p, class_token, cfg.selection,
                                              cfg.mmr_lambda).tolist()
            else:  # the given original indices, as positions among the tokens that reach here
                local = [[reach.index(i) + p for i in keep]
                         for reach, keep in zip(reaching if before is not None else
                                                [reaching] * x.shape[0],
                                                given[len(kept)].tolist())]
            if before is None:
                original = local
            else:
                original = [[reach[i - p] for i in row] for reach, row in zip(reaching, local)]
            kept.append(torch.tensor(original))
            rows = [list(range(p)) + row for row in local]
            x = torch.stack([x[b, rows[b]] for b in range(x.shape[0])])
        elif index in stages:
            kept.append(None)
        return (x, *args[1:]), (kwargs if rope is None else {**kwargs, "rope": rows_of(rope)})

    handles = [block.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: pre_hook(index, module, args, kwargs),
        with_kwargs=True) for index, block in enumerate(blocks)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def run_both(model, name, config, images):
    """(patched output, each stage's last_keep_idx, hand output, each stage's hand indices)."""
    with torch.no_grad():
        with pruned_by_hand(model, config, TOWERS[name][1]) as by_hand:
            expected = output(model, images)
        replace_last_block(model, config=config)
        try:
            out = output(model, images)
            stages = pruned_blocks(model)
            keeps = [block.last_keep_idx for block in stages]
            assert pruned_block(model) is stages[-1]
            assert [find_tower(model).blocks[i] for i in INDICES[:len(stages)]] == list(stages)
        finally:
            remove_pruning(model)
    return out, keeps, expected, by_hand


def assert_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def assert_same_indices(keeps, by_hand):
    assert len(keeps) == len(by_hand)
    for keep, hand in zip(keeps, by_hand):
        assert torch.equal(keep, hand)


# ----- the schedule against the tower pruned by hand ---------------------------------------

@pytest.mark.parametrize("name", list(TOWERS))
def test_schedule_matches_the_tower_pruned_by_hand(towers, name):
    model = towers(name)
    p = find_tower(model).num_prefix
    out, keeps, expected, by_hand = run_both(model, name, PruneConfig(schedule=SCHEDULE),
                                             images_for(name))
    assert_same_indices(keeps, by_hand)
    assert [keep.shape[1] for keep in keeps] == [20, 10, 5]
    for before, after in zip(keeps, keeps[1:]):  # each stage keeps a subset, ascending
        assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(after, before))
    assert all((keep.diff(dim=1) > 0).all() and (keep >= p).all() for keep in keeps)
    # The mapping matters here: the later stages' local indices are other patches.
    assert not torch.equal(keeps[1], keeps[1].clamp(max=p + 19))
    assert_close(out, expected)


@pytest.mark.parametrize("selection", ["cls", "mmr"])
@pytest.mark.parametrize("name", ["timm-vit-reg4", "eva02", "hf-siglip"])
def test_other_selections_match_the_tower_pruned_by_hand(towers, name, selection):
    model = towers(name)
    config = PruneConfig(schedule=SCHEDULE[:2], selection=selection, mmr_lambda=0.5)
    out, keeps, expected, by_hand = run_both(model, name, config, images_for(name))
    assert_same_indices(keeps, by_hand)
    assert_close(out, expected)


def test_rotary_rows_follow_each_stage(towers):
    """Hand-pruned with the rows of the first n patches after each stage instead of the kept
    ones' (wrong) gives another output: the rows matter, and the patched tower has the kept."""
    model, name = towers("eva02"), "eva02"
    config = PruneConfig(schedule=SCHEDULE, score_norm="minmax", alpha=0.3)
    images = images_for(name)
    out, keeps, expected, by_hand = run_both(model, name, config, images)
    assert_same_indices(keeps, by_hand)
    assert_close(out, expected)
    firsts = [torch.arange(1, 1 + keep.shape[1]).expand_as(keep) for keep in keeps]
    with torch.no_grad(), pruned_by_hand(model, config, timm_attention, given=firsts):
        wrong = output(model, images)
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_random_control_keeps_a_subset_per_stage_and_repeats(towers):
    model, name = towers("timm-vit"), "timm-vit"
    config = PruneConfig(schedule=SCHEDULE, selection="random", seed=3)
    images = images_for(name)
    runs = []
    for _ in range(2):  # a fresh patch draws the same patches
        replace_last_block(model, config=config)
        try:
            with torch.no_grad():
                out = output(model, images)
            runs.append((out, [block.last_keep_idx for block in pruned_blocks(model)]))
        finally:
            remove_pruning(model)
    (out, keeps), (again, keeps_again) = runs
    assert_same_indices(keeps, keeps_again) and torch.equal(out, again)
    for before, after in zip(keeps, keeps[1:]):
        assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(after, before))
    with torch.no_grad(), pruned_by_hand(model, config, timm_attention, given=keeps):
        expected = output(model, images)
    assert_close(out, expected)


def test_specs_worked_example(monkeypatch):
    """SPEC.md's worked example: the class token's attention at each stage is the example's
    (patched into the reference), 8 patches, cls selection; the kept patches in the original
    numbering are [2, 3, 5, 7], then [3, 7] (the local [2, 4] would be wrong)."""
    import tokenprune.reference as reference
    rows = {9: [0.12, 0.05, 0.20, 0.10, 0.02, 0.15, 0.08, 0.25, 0.03],  # block 0, 9 tokens
            5: [0.20, 0.10, 0.30, 0.05, 0.35]}                          # block 1, 5 tokens

    def example_attention(qkv, num_heads, scale=None):
        B, T, _ = qkv.shape
        return torch.tensor(rows[T]).expand(B, T, T).clone()
    monkeypatch.setattr(reference, "head_mean_attention", example_attention)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3,
                              img_size=(32, 64)).eval()  # 2 x 4 = 8 patches
    replace_last_block(model, schedule=[(0, 2, 2), (1, 1, 1)], selection="cls",
                       backend="reference")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 64))
    assert [block.last_keep_idx.tolist() for block in pruned_blocks(model)] == [[[2, 3, 5, 7]],
                                                                               [[3, 7]]]


# ----- one stage, nothing to prune, undo ---------------------------------------------------

@pytest.mark.parametrize("name", ["openclip", "eva02", "hf-clip"])
def test_one_stage_schedule_is_the_single_cut_bit_for_bit(towers, name):
    model, images = towers(name), images_for(name)
    assert PruneConfig(schedule=[(1, 4, 12)]) == PruneConfig(layer=1, k_anchors=4, top_m=12)
    results = []
    for kwargs in (dict(schedule=[(1, 4, 12)]), dict(layer=1, k_anchors=4, top_m=12)):
        replace_last_block(model, **kwargs)
        try:
            with torch.no_grad():
                results.append((output(model, images), pruned_block(model).last_keep_idx,
                                len(pruned_blocks(model))))
        finally:
            remove_pruning(model)
    (out, keep, count), (single, single_keep, single_count) = results
    assert torch.equal(out, single) and torch.equal(keep, single_keep) and count == single_count == 1


def test_a_stage_with_nothing_to_prune_leaves_the_numbering_to_the_others(towers):
    """A first stage that keeps every patch prunes nothing: the second selects among all of
    them, as the single cut at its block does, bit for bit (rotary rows included)."""
    model, images = towers("eva02"), images_for("eva02")
    replace_last_block(model, schedule=[(0, 20, 30), (2, 3, 7)])
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match="nothing to prune"):
            out = output(model, images)
        first, second = pruned_blocks(model)
        keep = second.last_keep_idx
        assert first.last_keep_idx is None
    finally:
        remove_pruning(model)
    replace_last_block(model, layer=2, k_anchors=3, top_m=7)
    try:
        with torch.no_grad():
            single = output(model, images)
        assert torch.equal(keep, pruned_block(model).last_keep_idx)
    finally:
        remove_pruning(model)
    assert torch.equal(out, single)


@pytest.mark.parametrize("name", ["eva02", "hf-clip"])
def test_remove_pruning_undoes_every_stage(towers, name):
    model, images = towers(name), images_for(name)
    blocks = find_tower(model).blocks
    originals, keys = list(blocks), list(model.state_dict())
    with torch.no_grad():
        before = output(model, images)
        replace_last_block(model, schedule=SCHEDULE)
        assert list(model.state_dict()) == keys
        assert [type(b) is PrunedBlock for b in blocks] == [True, False, True, True]
        replace_last_block(model, schedule=[(1, 3, 9), (2, 2, 2)])  # replaces, never stacks
        assert [type(b) is PrunedBlock for b in blocks] == [False, True, True, False]
        remove_pruning(model)
        after = output(model, images)
    assert list(blocks) == originals and pruned_blocks(model) == ()
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks
                   if name == "eva02")  # the rotary hooks are gone
    assert torch.equal(before, after)


def test_the_seed_entry_points_take_a_schedule(towers):
    from tokenprune import PrunedVisionEncoder, apply_pruning_to_model
    model, images = towers("openclip"), images_for("openclip")
    try:
        encoder = PrunedVisionEncoder(model, schedule=SCHEDULE)
        with torch.no_grad():
            encoder(images)
        assert encoder.config.schedule == tuple(SCHEDULE)
        assert torch.equal(encoder.keep_idx, pruned_blocks(model)[-1].last_keep_idx)
        assert encoder.keep_idx.shape == (2, 5)
        apply_pruning_to_model(model, schedule=SCHEDULE[1:])
        assert [block.stage_config.layer for block in pruned_blocks(model)] == [2, -1]
    finally:
        remove_pruning(model)


def test_training_mode_gradients_flow_through_every_stage(towers):
    model = build("eva02").train()  # its own copy: the module's towers stay in eval mode
    images = images_for("eva02")
    replace_last_block(model, schedule=SCHEDULE)
    out = model(images)
    # Not out.sum(): this model ends in a LayerNorm with unit weight and zero bias, whose outputs
    # sum to a constant, so that loss has a zero gradient (up to rounding, which some builds
    # give and some do not); fixed random weights make a loss that depends on the input.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    stages = pruned_blocks(model)
    assert all(block.training for block in stages)
    assert all(block.attn.proj.weight.grad is not None for block in stages)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    remove_pruning(model)
    assert all(block.training for block in model.blocks)


def test_a_deep_copy_prunes_as_the_original(towers):
    model, images = towers("eva02"), images_for("eva02")
    replace_last_block(model, schedule=SCHEDULE)
    try:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            out, copied = output(model, images), output(twin, images)
        stages, twin_stages = pruned_blocks(model), pruned_blocks(twin)
        assert twin_stages[1].previous is twin_stages[0]
        assert all(torch.equal(a.last_keep_idx, b.last_keep_idx)
                   for a, b in zip(stages, twin_stages))
        assert torch.equal(out, copied)
    finally:
        remove_pruning(model)


# ----- the Triton backend (interpreted on the CPU) and torch.compile ----------------------

@pytest.mark.parametrize("name, selection", [("openclip", "score"), ("timm-vit-reg4", "mmr"),
                                             ("eva02", "score"), ("hf-siglip", "cls")])
def test_triton_backend_matches_the_reference_backend(towers, name, selection):
    model, images = towers(name), images_for(name, batch=1)
    results = {}
    for backend in ("reference", "triton"):
        replace_last_block(model, schedule=[(0, 3, 5), (2, 2, 2)], backend=backend,
                           selection=selection)
        try:
            with torch.no_grad():
                results[backend] = (output(model, images),
                                    [block.last_keep_idx for block in pruned_blocks(model)])
        finally:
            remove_pruning(model)
    (out, keeps), (triton_out, triton_keeps) = results["reference"], results["triton"]
    assert_same_indices(triton_keeps, keeps)
    torch.testing.assert_close(triton_out, out, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", [[(2, 4, 12)], SCHEDULE], ids=["single-cut", "schedule"])
@pytest.mark.parametrize("name", ["timm-vit", "eva02"])
def test_torch_compile_fullgraph_without_graph_breaks(towers, name, schedule):
    model, images = towers(name), images_for(name)
    replace_last_block(model, schedule=schedule, backend="reference")
    try:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(images)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            out = compiled(images)
            keeps = [block.last_keep_idx for block in pruned_blocks(model)]
            expected = model(images)
        assert_same_indices(keeps, [block.last_keep_idx for block in pruned_blocks(model)])
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
        remove_pruning(model)


def test_hidden_states_hold_each_stages_tokens(towers):
    model, images = towers("hf-clip"), images_for("hf-clip")
    replace_last_block(model, schedule=SCHEDULE)
    try:
        with torch.no_grad():
            out = model(images, output_hidden_states=True)
    finally:
        remove_pruning(model)
    assert [h.shape[1] for h in out.hidden_states] == [37, 21, 21, 11, 6]


# ----- the configuration -------------------------------------------------------------------

@pytest.mark.parametrize("schedule, message", [
    ([(2, 3, 9), (1, 2, 4)], "schedule blocks must be strictly increasing, got stage 1 at block 2 "
                             "and stage 2 at block 1"),
    ([(1, 3, 9), (2, 5, 9)], "schedule stage 2 must keep fewer patches than the 12 that stage 1 "
                             "keeps, got k_anchors \\+ top_m = 14"),
    ([(1, 0, 9)], "schedule stage 1 k_anchors must be an integer >= 1, got 0"),
    ([(1, 3, 9), (2, 1, -1)], "schedule stage 2 top_m must be an integer >= 0, got -1"),
    ([(1.5, 3, 9)], "schedule stage 1 layer must be an integer block index"),
    ([(1, 3)], "schedule stage 1 must be a \\(layer, k_anchors, top_m\\) triple, got \\(1, 3\\)"),
    ("3:4:20", "schedule must be a sequence of \\(layer, k_anchors, top_m\\) stages, got '3:4:20'"),
])
def test_bad_schedules_are_refused_in_one_line(schedule, message):
    with pytest.raises(ValueError, match=message) as err:
        PruneConfig(schedule=schedule)
    assert "\n" not in str(err.value)


def test_schedule_and_the_single_cut_settings_together():
    config = PruneConfig(schedule=[(3, 4, 20), (6, 2, 10)], selection="cls")
    assert (config.layer, config.k_anchors, config.top_m, config.kept_patches) == (6, 2, 10, 12)
    assert config.stages == ((3, 4, 20), (6, 2, 10)) and config.stages[1].k_anchors == 2
    assert eval(repr(config), {"PruneConfig": PruneConfig}) == config
    assert [(c.layer, c.kept_patches, c.selection, c.schedule) for c in config.stage_configs()] \
        == [(3, 24, "cls", ()), (6, 12, "cls", ())]
    # dataclasses.replace of another setting keeps the schedule; a conflicting count is refused.
    import dataclasses
    assert dataclasses.replace(config, alpha=0.2).schedule == config.schedule
    with pytest.raises(ValueError, match="either in schedule or as layer, k_anchors, top_m"):
        dataclasses.replace(config, k_anchors=3)
    with pytest.raises(TypeError, match="give either schedule or layer=2, not both"):
        replace_last_block(build("timm-vit"), schedule=SCHEDULE, layer=2)


def test_block_indices_resolve_against_the_tower():
    config = PruneConfig(schedule=[(3, 4, 9), (-2, 2, 4)])  # mixed signs: checked with the depth
    assert config.block_indices(12) == (3, 10)
    with pytest.raises(ValueError, match="schedule blocks must be strictly increasing, got 3, -2, "
                                         "which are blocks 3, 2 of this 4-block tower"):
        config.block_indices(4)
    with pytest.raises(ValueError, match=r"schedule stage 1 layer must be in \[-3, 2\] for this "
                                         r"3-block tower, got 3"):
        config.block_indices(3)
