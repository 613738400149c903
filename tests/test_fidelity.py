"""bench/fidelity.py, the accuracy-retention benchmark on the shipped small ViT: its grid holds
the controls as `tokenprune sweep` defines them, its accuracy and recall through the sweep
engine equal those of the patched model computed directly, and its summary pools the random
control's seeds into mean and range."""
import importlib.util
from pathlib import Path

import pytest
import torch

from tokenprune import pruned_block, remove_pruning, replace_last_block
from tokenprune.proxy import heldout_set, load_proxy_model, object_patches, preprocess

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("tokenprune_bench_fidelity", BENCH / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)

N, BATCH = 24, 10  # batches of 10, 10, 4: the counts must add up across uneven batches


def test_points_hold_the_grid_and_both_controls_per_budget():
    grid = fidelity.points(budgets=((2, 6), (4, 12)), alphas=(0.3, 0.7), score_norms=("none",),
                           layers=(1, 3), seeds=(0, 5, 7), depth=4, patches=64)
    assert grid[0].kind == "unpruned" and grid[0].config is None
    kinds = [p.kind for p in grid[1:]]
    assert kinds.count("score") == 2 * 2 * 2  # budgets x alphas x layers
    assert kinds.count("cls") == 2 * 2  # once per (budget, layer), whatever the seeds
    assert kinds.count("random") == 2 * 2 * 3  # and the random control once per seed
    for p in grid[1:]:
        c = p.config
        assert c.kept_patches in (8, 16) and c.layer in (1, 3) and c.backend == "reference"
        if p.kind == "cls":
            assert c.selection == "score" and c.top_m == 0
        if p.kind == "random":
            assert c.selection == "random" and c.seed in (0, 5, 7)
    assert len(set(grid)) == len(grid)


@pytest.fixture(scope="module")
def canvases():
    model, card = load_proxy_model()
    images, labels, boxes = heldout_set(N, card)
    return model, preprocess()(images), labels, object_patches(boxes)


@torch.no_grad()
def direct(model, pixels, labels, objects, config):
    """(accuracy, recall) from the patched model, batch by batch as the benchmark batches."""
    replace_last_block(model, config=config)
    try:
        correct, kept = 0, 0
        for start in range(0, N, BATCH):
            stop = start + BATCH
            correct += (model(pixels[start:stop]).argmax(-1) == labels[start:stop]).sum().item()
            keep = pruned_block(model).last_keep_idx
            kept += objects[start:stop].gather(1, keep - 1).sum().item()
        return correct / N, kept / objects.sum().item()
    finally:
        remove_pruning(model)


def test_accuracy_and_recall_equal_the_patched_models(canvases):
    model, pixels, labels, objects = canvases
    grid = fidelity.points(budgets=((4, 12),), alphas=(0.5,), score_norms=("minmax",),
                           layers=(1,), seeds=(3,), depth=4, patches=64)
    rows = fidelity.evaluate(model, pixels, labels, objects, grid, batch=BATCH)
    assert [r["method"] for r in rows] == ["unpruned", "score", "random", "cls"]
    with torch.no_grad():
        unpruned = (model(pixels).argmax(-1) == labels).float().mean().item()
    assert rows[0]["accuracy"] == pytest.approx(unpruned) and rows[0]["recall"] == 1.0
    for row, point in zip(rows[1:], grid[1:]):
        acc, recall = direct(model, pixels, labels, objects, point.config)
        assert (row["accuracy"], row["recall"]) == pytest.approx((acc, recall)), row
        assert row["kept_patches"] == 16 and row["block"] == 1
    # The selection keeps most of the digit; random keeps about its share, 16 of 64.
    assert rows[1]["recall"] > 0.5 > rows[2]["recall"]


def row(method, accuracy, recall, seed=None, alpha=None):
    return {"method": method, "block": None if method == "unpruned" else 1,
            "k_anchors": 2, "top_m": 6, "kept_patches": 64 if method == "unpruned" else 8,
            "alpha": alpha, "score_norm": None if alpha is None else "none", "seed": seed,
            "accuracy": accuracy, "recall": recall}


def test_summary_pools_the_random_seeds_and_the_page_shows_them():
    rows = [row("unpruned", 0.9, 1.0), row("score", 0.85, 0.8, alpha=0.3),
            row("score", 0.87, 0.7, alpha=0.7), row("cls", 0.88, 0.75),
            row("random", 0.5, 0.1, seed=0), row("random", 0.6, 0.2, seed=1),
            row("random", 0.7, 0.15, seed=2)]
    (entry,) = fidelity.summary(rows)
    assert (entry["block"], entry["kept_patches"]) == (1, 8)
    assert entry["random"]["accuracy"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}
    assert entry["random"]["recall"]["mean"] == pytest.approx(0.15)
    assert entry["score"]["accuracy"]["max"] == 0.87 and entry["cls"]["accuracy"]["min"] == 0.88
    meta = {"images": 3, "object_patches_mean": 2.0, "patches": 64, "model": "m", "blocks": 4,
            "dtype": "float32", "backend": "reference", "batch": 3, "date": "d", "machine": "x",
            "torch": "t"}
    page = fidelity.markdown(meta, rows)
    assert ("| 1 of 4 | 8 (2 + 6) | 87.00% (recall 0.70; alpha 0.7, none) | "
            "86.00% [85.00-87.00] (recall 0.75 [0.70-0.80]) | 88.00% (recall 0.75) | "
            "60.00% [50.00-70.00] (recall 0.15 [0.10-0.20]) |") in page
    assert "| 1 | 8 | 2 | 6 | random | - | - | 2 | 70.00% | 0.778 | 0.15 |" in page
