"""The small trained ViTs shipped in tokenprune/assets/ (the small-digit and the large-digit
regime) and their data recipe (tokenprune/proxy.py).

Each asset loads and matches its card and the code (the large digit's card: at least 85%
held-out, at least a fifth of the patches on the digit); the recipe is deterministic, keeps training
and held-out digits apart and knows where the digit is; and on attention that was actually
trained, the seed's selection keeps clearly more accuracy than the random control at the same
token count. That last test is the one that catches a selection that picks the wrong tokens
(a reversed sort, the wrong row of P), which the tests against the reference cannot: they share
SPEC.md's reading with the code. On the large digit, cls and mmr keep clearly more than the
seed's default selection at the middle block (docs/choosing-settings.md).
"""
import os

import pytest
import torch

from tokenprune import PruneConfig, pruned_block, remove_pruning, replace_last_block
from tokenprune.proxy import (ARCH, CARD, CHECKPOINT, RECIPE, REGIMES, _source_digits,
                              build_proxy_model, heldout_set, load_proxy_model,
                              make_canvas_digits, object_patches, preprocess, proxy_card,
                              regime_of)

ASSETS = os.path.join(os.path.dirname(__file__), "..", "tokenprune", "assets")
N = 300  # held-out canvases for the accuracy tests: about a second per pass on 2 CPU cores


@pytest.fixture(scope="module")
def shipped():
    model, card = load_proxy_model()
    images, labels, boxes = heldout_set(N, card)
    return model, card, preprocess()(images), labels, object_patches(boxes)


@torch.no_grad()
def accuracy(model, pixels, labels, config=None):
    """Accuracy of the model pruned with `config` (unpruned when None), and the kept patches."""
    remove_pruning(model)
    if config is not None:
        replace_last_block(model, config=config)
    try:
        correct = (model(pixels).argmax(-1) == labels).float().mean().item()
        block = pruned_block(model)
        return correct, None if block is None else block.last_keep_idx
    finally:
        remove_pruning(model)


# ----- the asset ---------------------------------------------------------------------------

def test_card_describes_the_shipped_checkpoint(shipped):
    model, card, *_ = shipped
    assert card["arch"] == ARCH
    # JSON has lists where RECIPE has tuples; any other difference means the recipe changed
    # after training and the card's accuracy no longer describes these canvases.
    assert card["recipe"] == {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items()}
    assert {"seed", "command", "heldout_accuracy", "train_seconds", "date", "torch"} <= set(card)
    assert card["command"].startswith("python tools/train_proxy.py")
    state = torch.load(os.path.join(ASSETS, CHECKPOINT), weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert set(state) == set(build_proxy_model().state_dict())
    assert os.path.getsize(os.path.join(ASSETS, CHECKPOINT)) < 4 * 2 ** 20
    assert os.path.exists(os.path.join(ASSETS, CARD)) and proxy_card() == card


def test_unpruned_accuracy_matches_the_card(shipped):
    """The card's accuracy is over heldout_n canvases; these N are its first N, so they agree
    within sampling error (binomial sd at 95% and N=300: 1.3 points; allowed: 5)."""
    model, card, pixels, labels, _ = shipped
    acc, _ = accuracy(model, pixels, labels)
    assert card["heldout_accuracy"] >= 0.9
    assert abs(acc - card["heldout_accuracy"]) < 0.05, acc


# ----- the second regime: a large digit -------------------------------------------------------

@pytest.fixture(scope="module")
def large():
    model, card = load_proxy_model("large")
    images, labels, boxes = heldout_set(N, card)
    return model, card, preprocess()(images), labels, object_patches(boxes)


def test_large_card_describes_its_checkpoint(large):
    model, card, *_ = large
    regime = REGIMES["large"]
    assert card["regime"] == "large" and card["arch"] == ARCH
    assert card["recipe"] == {k: list(v) if isinstance(v, tuple) else v
                              for k, v in regime.recipe.items()}
    assert card["recipe"]["scale"] > RECIPE["scale"]  # the only change: a larger digit
    assert {k: v for k, v in card["recipe"].items() if k != "scale"} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items() if k != "scale"}
    assert card["command"].startswith("python tools/train_proxy.py --regime large")
    path = os.path.join(ASSETS, regime.checkpoint)
    state = torch.load(path, weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert set(state) == set(build_proxy_model().state_dict())
    assert os.path.getsize(path) < 4 * 2 ** 20
    assert proxy_card("large") == card
    # A different model from the small regime's.
    small = torch.load(os.path.join(ASSETS, CHECKPOINT), weights_only=True)
    assert not torch.equal(state["conv1.weight"], small["conv1.weight"])


def test_large_unpruned_accuracy_matches_the_card(large):
    """As for the small regime: the first N of the card's heldout_n canvases agree with its
    accuracy within sampling error (allowed: 5 points); the card claims at least 85%."""
    model, card, pixels, labels, _ = large
    acc, _ = accuracy(model, pixels, labels)
    assert card["heldout_accuracy"] >= 0.85
    assert abs(acc - card["heldout_accuracy"]) < 0.05, acc


def test_large_digit_covers_a_fifth_of_the_patches_as_the_card_says():
    card = proxy_card("large")
    _, _, boxes = heldout_set(card["heldout_n"], card)
    objects = object_patches(boxes)
    per_canvas = objects.sum(1).float()
    fraction = per_canvas.mean().item() / objects.shape[1]
    assert fraction >= 0.2
    assert round(fraction, 4) == card["object_patches_fraction"]
    assert [per_canvas.min().item(), per_canvas.max().item()] == card["object_patches_range"]
    # And the small regime's digit stays a small minority of the patches.
    _, _, small_boxes = heldout_set(200, regime="small")
    assert object_patches(small_boxes).sum(1).float().mean() < 0.1 * 64


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="regime must be one of 'small', 'large', got 'medium'"):
        regime_of("medium")
    with pytest.raises(ValueError, match="got 'medium'"):
        load_proxy_model("medium")


# ----- the data recipe ----------------------------------------------------------------------

def test_canvases_are_deterministic_in_the_seed():
    a = make_canvas_digits(8, 3, split="train")
    b = make_canvas_digits(8, 3, split="train")
    c = make_canvas_digits(8, 4, split="train")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # The first n canvases do not depend on how many are drawn (heldout_set relies on it).
    assert torch.equal(make_canvas_digits(3, 3, split="train")[0], a[0][:3])


def test_training_and_heldout_digits_are_disjoint():
    train, _ = _source_digits("train", RECIPE["heldout_fraction"], RECIPE["split_seed"])
    test, _ = _source_digits("test", RECIPE["heldout_fraction"], RECIPE["split_seed"])
    assert len(train) + len(test) == 1797
    pairs = (train.reshape(len(train), 1, -1) == test.reshape(1, len(test), -1)).all(-1)
    # load_digits has a few exact duplicate images; no more than those may coincide.
    assert pairs.sum() <= 10
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        make_canvas_digits(1, 0, split="val")
    with pytest.raises(ValueError, match="unknown recipe parameters"):
        make_canvas_digits(1, 0, noise=0.1)


def test_box_is_the_digits_ink_and_object_patches_cover_it():
    # Without noise and lines, every non-zero pixel is the digit's: all inside the box, and
    # ink on each of the box's four edges.
    images, _, boxes = make_canvas_digits(20, 5, noise_std=0.0, lines=(0, 0))
    for image, (x0, y0, x1, y1) in zip(images[:, 0], boxes.tolist()):
        inside = torch.zeros_like(image, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (image[~inside] == 0).all()
        ink = image[y0:y1, x0:x1] > 0
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
    # A box from pixel (15, 16) to (33, 20) (ends exclusive) overlaps patch columns 0-2 of
    # row 1 on the 8x8 grid of 16-px patches.
    mask = object_patches(torch.tensor([[15, 16, 33, 20]]), image_size=128, patch_size=16)
    assert mask[0].nonzero().flatten().tolist() == [8, 9, 10]


# ----- selection on trained attention ------------------------------------------------------

# A quarter of the 64 patches at the middle block (index 1 of 4): at the last block the class
# token has already read the digit and even the random control keeps ~92% (bench/fidelity.md).
K, M, LAYER = 4, 12, 1
# Measured on these N canvases (2-core CPU, torch 2.14.1, 2026-11-28): the seed's selection
# 0.950 accuracy and 0.84 of the digit's patches kept; the random control, seeds 0-4, 0.600-0.633
# and 0.23-0.27. The smallest gap, 0.317 in accuracy and 0.57 in recall, halved (a safety factor
# of 2) gives the margins. A reversed sort (top_indices picking the smallest) scored 0.493 and
# 0.04: it fails both. Taking the anchors from the last patch's row of P instead of the class
# token's scored 0.953 and 0.82: on this model the patches attend to the digit too, so this
# test cannot see that bug (test_reference.py's worked example does).
MARGIN = 0.15
RECALL_MARGIN = 0.25


def test_seed_selection_keeps_more_accuracy_than_random(shipped):
    model, _, pixels, labels, objects = shipped
    score, keep = accuracy(model, pixels, labels, PruneConfig(k_anchors=K, top_m=M, layer=LAYER,
                                                              backend="reference"))
    random, keep_random = accuracy(model, pixels, labels, PruneConfig(
        k_anchors=K, top_m=M, layer=LAYER, selection="random", seed=0, backend="reference"))
    assert keep.shape == keep_random.shape == (N, K + M)
    assert score - random >= MARGIN, (score, random)
    # And it is the digit's patches that the selection keeps.
    recall = objects.gather(1, keep - 1).sum() / objects.sum()
    recall_random = objects.gather(1, keep_random - 1).sum() / objects.sum()
    assert recall - recall_random >= RECALL_MARGIN, (recall, recall_random)


# The large digit at the middle block, 16 of 64 patches: the case where the selections part
# (docs/choosing-settings.md). Measured on these N canvases (2-core CPU, torch 2.14.1,
# 2026-11-30): the seed's default selection 0.487, cls 0.717, mmr (its default lambda 0.8)
# 0.723, random 0.390 (on all 2000: 0.4755, 0.6890, 0.7110, 0.3509). The smallest gap the docs rest on,
# 0.230 (cls over the seed's default), halved (a safety factor of 2) gives the margin. A cls or
# mmr that kept the wrong patches would fall towards random and fail it.
LARGE_MARGIN = 0.11


def test_on_the_large_digit_cls_and_mmr_keep_more_than_the_seeds_default(large):
    model, _, pixels, labels, _ = large
    kept = dict(k_anchors=4, top_m=12, layer=1, backend="reference")
    score, _ = accuracy(model, pixels, labels, PruneConfig(**kept))
    for selection in ("cls", "mmr"):
        other, keep = accuracy(model, pixels, labels, PruneConfig(**kept, selection=selection))
        assert keep.shape == (N, 16)
        assert other - score >= LARGE_MARGIN, (selection, other, score)
