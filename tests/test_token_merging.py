"""bench/token_merging.py, the token-merging baseline written from ToMe's paper, against that
description: r=0 is the model itself, the token count after each block, the sizes, and
proportional attention with the size-weighted average (a merged pair of identical tokens changes
nothing for the other tokens)."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from tokenprune.proxy import build_proxy_model

_spec = importlib.util.spec_from_file_location(
    "tokenprune_bench_token_merging",
    Path(__file__).resolve().parent.parent / "bench" / "token_merging.py")
token_merging = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(token_merging)


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    openclip = build_proxy_model(image_size=64, width=64, heads=2, layers=3).eval()  # 17 tokens
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                            num_classes=5).eval()                                      # 17 tokens
    return {"openclip": openclip, "timm": vit}


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["openclip", "timm"])
def test_r0_is_the_model_itself(towers, images, kind):
    model = towers[kind]
    with torch.no_grad():
        expected = model(images)
        state = token_merging.apply_token_merging(model, 0)
        try:
            merged = model(images)
        finally:
            assert token_merging.remove_token_merging(model)
        again = model(images)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, expected)  # undone
    assert state["tokens"] == [17] * len(state["tokens"]) and len(state["tokens"]) > 0


def counts(tokens, r, blocks):
    """The paper's count: r fewer after each block, at most half of the tokens but the class
    token."""
    out = []
    for _ in range(blocks):
        tokens -= min(r, (tokens - 1) // 2)
        out.append(tokens)
    return out


@pytest.mark.parametrize("kind", ["openclip", "timm"])
def test_r_tokens_fewer_after_each_block_and_the_sizes_add_up(towers, images, kind):
    model = towers[kind]
    blocks = len(token_merging.find_tower(model).blocks)
    state = token_merging.apply_token_merging(model, 3)
    try:
        with torch.no_grad():
            model(images)
        assert state["tokens"] == counts(17, 3, blocks)
        assert state["tokens"][:3] == [14, 11, 8]
        size = state["size"][..., 0]
        assert torch.equal(size.sum(dim=1), torch.full((3,), 17.0))  # every token counted once
        assert torch.equal(size[:, 0], torch.ones(3))                 # the class token, alone
        assert (size >= 1).all()
        state["r"] = 100  # at most half of the tokens that reach a block, the class token kept
        with torch.no_grad():
            model(images)
        assert state["tokens"] == counts(17, 100, blocks)
        assert state["tokens"][:3] == [9, 5, 3]
    finally:
        token_merging.remove_token_merging(model)


def test_matching_merges_the_most_similar_pairs_and_keeps_the_class_token():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0],      # 0 (class, A), 1 (B)
                            [0.0, 1.0], [1.0, 0.1],      # 2 (A) = 1, 3 (B)
                            [0.7, 0.7], [1.0, 0.0]]])    # 4 (A), 5 (B) = 0
    unmerged, merged, partner = token_merging.match(metric, 1, protect_first=True)
    # A = tokens 0, 2, 4 and B = 1, 3, 5: token 2 (A row 1) is token 1 (B row 0); the class
    # token, although equal to token 5, is never merged.
    assert merged.tolist() == [[1]] and partner.tolist() == [[0]]
    assert unmerged.tolist() == [[0, 2]]
    x = torch.arange(6.0).view(1, 6, 1)
    size = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0]).view(1, 6, 1)
    new_x, new_size = token_merging.merge(x, size, unmerged, merged, partner)
    # unmerged A (tokens 0, 4), then B (1 merged with 2, 3, 5); 1 and 2 weighted 1 : 3.
    assert new_x.flatten().tolist() == [0.0, 4.0, (1 + 3 * 2) / 4, 3.0, 5.0]
    assert new_size.flatten().tolist() == [1.0, 1.0, 4.0, 1.0, 1.0]


def test_a_merged_pair_of_identical_tokens_changes_nothing_else(towers):
    """Two identical tokens merged in one block: in the next, proportional attention with their
    summed size is attention over both copies, and their average is either copy, so every
    other token leaves both blocks as without merging."""
    first, second = token_merging.find_tower(towers["timm"]).blocks[:2]
    torch.manual_seed(2)
    x = torch.randn(1, 9, 192)
    x[0, 4] = x[0, 3]  # token 3 (B) and token 4 (A): the only identical pair
    state = {"r": 1, "size": None, "tokens": [], "protect_first": True}
    with torch.no_grad():
        expected = second(first(x))
        y = token_merging._merging_forward(token_merging._Parts(first), state)(x)
        state["r"] = 0
        merged = token_merging._merging_forward(token_merging._Parts(second), state)(y)
    assert state["size"].flatten().tolist() == [1, 1, 1, 1, 1, 2, 1, 1]
    # Order after the merge: unmerged A (tokens 0, 2, 6, 8), then B (1, 3 + 4, 5, 7).
    torch.testing.assert_close(merged[0], expected[0, [0, 2, 6, 8, 1, 3, 5, 7]],
                               rtol=1e-5, atol=1e-5)
    # Without the size in the second block's attention the others would differ.
    plain = second(y)
    assert not torch.allclose(plain[0, 0], expected[0, 0], atol=1e-4)


def test_bad_r_and_towers_are_refused(towers):
    with pytest.raises(ValueError, match="r must be an integer >= 0"):
        token_merging.apply_token_merging(towers["timm"], -1)
    registers = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                  reg_tokens=4)
    with pytest.raises(ValueError, match="5 prefix tokens"):
        token_merging.apply_token_merging(registers, 2)


_acc_spec = importlib.util.spec_from_file_location(
    "tokenprune_bench_merging_accuracy",
    Path(__file__).resolve().parent.parent / "bench" / "merging_accuracy.py")
merging_accuracy = importlib.util.module_from_spec(_acc_spec)
_acc_spec.loader.exec_module(merging_accuracy)


def test_pareto_front_keeps_what_nothing_beats():
    rows = [dict(name="a", accuracy=0.9, images_per_s=100), dict(name="b", accuracy=0.8,
            images_per_s=200), dict(name="c", accuracy=0.7, images_per_s=150),
            dict(name="d", accuracy=0.9, images_per_s=90)]
    assert merging_accuracy.pareto(rows) == {"a", "b"}


def test_merging_accuracy_rows_on_the_shipped_vit():
    rows = merging_accuracy.run_regime("small", 20, 10, 1, say=lambda line: None)
    kinds = [row["kind"] for row in rows]
    assert kinds[0] == "unpruned" and kinds.count("merging baseline") == len(
        merging_accuracy.R_VALUES)
    assert kinds.count("tokenprune") == len(merging_accuracy.PRUNINGS) * 2
    by_name = {row["name"]: row for row in rows}
    assert by_name["merging r=4"]["mean_tokens_per_block"] == (65 + 61 + 57 + 53) / 4
    assert by_name["schedule 2/3 (40, 20), cls"]["mean_tokens_per_block"] == (65 + 41 + 21 + 21) / 4
    assert any(row["pareto"] for row in rows)
