"""bench/fidelity.py, the accuracy-retention benchmark on the two shipped small ViTs: its grid holds
the controls as `tokenprune sweep` defines them, its accuracy and recall through the sweep
engine equal those of the patched model computed directly, and its summary pools the random
control's seeds into mean and range."""
import importlib.util
import json
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
                           mmr_lambdas=(0.5, 0.9), layers=(1, 3), seeds=(0, 5, 7), depth=4,
                           patches=64)
    assert grid[0].kind == "unpruned" and grid[0].config is None
    kinds = [p.kind for p in grid[1:]]
    assert kinds.count("score") == 2 * 2 * 2  # budgets x alphas x layers
    assert kinds.count("mmr") == 2 * 2 * 2  # budgets x lambdas x layers
    assert kinds.count("cls") == 2 * 2  # once per (budget, layer), whatever the seeds
    assert kinds.count("random") == 2 * 2 * 3  # and the random control once per seed
    for p in grid[1:]:
        c = p.config
        assert c.kept_patches in (8, 16) and c.layer in (1, 3) and c.backend == "reference"
        assert c.selection == p.kind
        if p.kind == "mmr":
            assert c.mmr_lambda in (0.5, 0.9) and (c.k_anchors, c.top_m) in ((2, 6), (4, 12))
        if p.kind == "random":
            assert c.seed in (0, 5, 7)
    assert len(set(grid)) == len(grid)
    # No lambdas: no mmr rows.
    assert "mmr" not in [p.kind for p in fidelity.points(
        budgets=((2, 6),), alphas=(0.5,), score_norms=("none",), mmr_lambdas=(), layers=(1,),
        seeds=(0,), depth=4, patches=64)]


@pytest.fixture(scope="module", params=["small", "large"])
def canvases(request):
    model, card = load_proxy_model(request.param)
    images, labels, boxes = heldout_set(N, card)
    return model, preprocess()(images), labels, object_patches(boxes), request.param


@torch.no_grad()
def direct(model, pixels, labels, objects, config):
    """(accuracy, recall, on-object fraction) from the patched model, batch by batch as the
    benchmark batches."""
    replace_last_block(model, config=config)
    try:
        correct, kept = 0, 0
        for start in range(0, N, BATCH):
            stop = start + BATCH
            correct += (model(pixels[start:stop]).argmax(-1) == labels[start:stop]).sum().item()
            keep = pruned_block(model).last_keep_idx
            kept += objects[start:stop].gather(1, keep - 1).sum().item()
        return correct / N, kept / objects.sum().item(), kept / (N * config.kept_patches)
    finally:
        remove_pruning(model)


def test_accuracy_and_recall_equal_the_patched_models(canvases):
    model, pixels, labels, objects, regime = canvases
    grid = fidelity.points(budgets=((4, 12),), alphas=(0.5,), score_norms=("minmax",),
                           mmr_lambdas=(0.5,), layers=(1,), seeds=(3,), depth=4, patches=64)
    rows = fidelity.evaluate(model, pixels, labels, objects, grid, batch=BATCH)
    assert sorted(r["method"] for r in rows) == ["cls", "mmr", "random", "score", "unpruned"]
    assert rows[0]["method"] == "unpruned"
    with torch.no_grad():
        unpruned = (model(pixels).argmax(-1) == labels).float().mean().item()
    assert rows[0]["accuracy"] == pytest.approx(unpruned) and rows[0]["recall"] == 1.0
    for row, point in zip(rows[1:], grid[1:]):
        expected = direct(model, pixels, labels, objects, point.config)
        assert (row["accuracy"], row["recall"], row["on_object"]) == pytest.approx(expected), row
        assert row["kept_patches"] == 16 and row["block"] == 1
    by = {r["method"]: r for r in rows}
    # The selections keep more of the digit than random, which keeps about its share, 16 of 64
    # (on the large digit no selection can keep most of its ~18 patches in 16).
    for method in ("score", "mmr", "cls"):
        assert by[method]["recall"] > by["random"]["recall"] + 0.1, (method, regime)
    if regime == "small":
        assert by["score"]["recall"] > 0.5 > by["random"]["recall"]


def row(method, accuracy, recall, seed=None, alpha=None, mmr_lambda=None):
    kept = 64 if method == "unpruned" else 8
    return {"method": method, "block": None if method == "unpruned" else 1,
            "k_anchors": 2, "top_m": 6, "kept_patches": kept,
            "alpha": alpha, "score_norm": None if alpha is None else "none",
            "mmr_lambda": mmr_lambda, "seed": seed,
            "accuracy": accuracy, "recall": recall, "on_object": recall / 4}


META = {"regime": "large", "images": 200, "object_patches_mean": 18.0, "patches": 64,
        "model": "m", "blocks": 4, "digit_pixels": 64, "dtype": "float32",
        "backend": "reference", "batch": 3, "date": "d", "machine": "x", "torch": "t"}


def test_summary_pools_the_random_seeds_and_the_page_shows_them():
    rows = [row("unpruned", 0.9, 1.0), row("score", 0.85, 0.8, alpha=0.3),
            row("score", 0.87, 0.7, alpha=0.7), row("mmr", 0.89, 0.72, mmr_lambda=0.5),
            row("cls", 0.88, 0.75),
            row("random", 0.5, 0.1, seed=0), row("random", 0.6, 0.2, seed=1),
            row("random", 0.7, 0.15, seed=2)]
    (entry,) = fidelity.summary(rows)
    assert (entry["block"], entry["kept_patches"]) == (1, 8)
    assert entry["random"]["accuracy"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}
    assert entry["random"]["recall"]["mean"] == pytest.approx(0.15)
    assert entry["score"]["accuracy"]["max"] == 0.87 and entry["cls"]["accuracy"]["min"] == 0.88
    assert entry["score"]["best"]["alpha"] == 0.7 and entry["mmr"]["best"]["mmr_lambda"] == 0.5
    page = fidelity.markdown([(META, rows)])
    assert ("| 2 of 4 (index 1) | 8 (2 + 6) | large digit | 87.00% (0.70 / 0.17; alpha 0.7, none) | "
            "86.00% [85.00-87.00] (0.75 [0.70-0.80] / 0.19 [0.17-0.20]) | 89.00% (0.72 / 0.18) "
            "| 88.00% (0.75 / 0.19) | 60.00% [50.00-70.00] (0.15 [0.10-0.20] / "
            "0.04 [0.03-0.05]) |") in page
    assert "| 1 | 8 | 2 | 6 | random | - | - | - | 2 | 70.00% | 0.778 | 0.15 | 0.04 |" in page
    assert "| 1 | 8 | 2 | 6 | mmr | - | - | 0.5 | - | 89.00% | 0.989 | 0.72 | 0.18 |" in page
    # 200 canvases: one image is 0.5 points; the unpruned accuracy's binomial standard error
    # sqrt(0.9 * 0.1 / 200) = 2.12 points; the random seeds span 20 points.
    assert ("one image = 0.50 points, binomial standard error of the unpruned accuracy 2.12 "
            "points, the random control's widest range over its seeds 20.00 points") in page
    # mmr's 2 points over the best score setting (0.87) are inside the sweep's noise at n = 200
    # (2 sqrt(0.87 * 0.13 / 200) = 4.8 points): no finding.
    assert "- large digit: at no budget does another selection" in page


def test_findings_are_the_sweeps_on_these_rows():
    rows = [row("unpruned", 0.9, 1.0), row("score", 0.70, 0.5, alpha=0.5),
            row("mmr", 0.80, 0.7, mmr_lambda=0.7), row("cls", 0.78, 0.7),
            row("random", 0.5, 0.1, seed=0), row("random", 0.9, 0.1, seed=1)]
    lines = fidelity.findings(META, rows)
    # The random control counts as its mean over the seeds (0.70, not 0.90).
    assert len(lines) == 1 and lines[0].startswith(
        "at block 2 of 4 (index 1), 9 tokens, mmr with lambda 0.7 keeps 10.0 points more acc1 than the "
        "best score setting"), lines
    assert lines[0].endswith("; so do cls (+8.0)")
    page = fidelity.markdown([(META, rows)])
    assert f"- large digit: {lines[0]}." in page


def test_both_regimes_run_and_write(tmp_path):
    """The benchmark's smallest version on both shipped models: both regimes on the page, in
    the JSON and the plot."""
    grid = dict(n=12, batch=6, budgets=((4, 12),), alphas=(0.5,), score_norms=("none",),
                mmr_lambdas=(0.5,), layers=(1,), seeds=(0, 1))
    results = [fidelity.run(regime, **grid) for regime in ("small", "large")]
    for meta, rows in results:
        assert [r["method"] for r in rows].count("mmr") == 1
        assert sorted({r["method"] for r in rows}) == ["cls", "mmr", "random", "score",
                                                      "unpruned"]
    small, large = (meta for meta, _ in results)
    assert small["object_patches_mean"] < 5 < 0.2 * 64 <= large["object_patches_mean"]
    fidelity.write(results, tmp_path / "f.md", tmp_path / "f.png", tmp_path / "f.json", "cmd")
    page = (tmp_path / "f.md").read_text()
    assert "| 2 of 4 (index 1) | 16 (4 + 12) | small digit |" in page
    assert "| 2 of 4 (index 1) | 16 (4 + 12) | large digit |" in page
    saved = json.loads((tmp_path / "f.json").read_text())
    assert [r["regime"] for r in saved["regimes"]] == ["small", "large"]
    assert saved["regimes"][1]["noise_points"]["one_image"] == pytest.approx(100 / 12)
    assert (tmp_path / "f.png").stat().st_size > 0
