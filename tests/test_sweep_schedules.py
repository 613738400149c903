"""Sweeps over pruning schedules: the engine (tokenprune.sweep.GridEncoder) against a model
patched with replace_last_block(schedule=...), the grid, the budget (mean tokens per block) and
the summary's winner at each budget, and `tokenprune sweep --schedule` on the tiny model.
Towers of 4 blocks built in code (random weights); the tiny OpenCLIP ViT of tests/helpers.py."""
import json

import pytest
import torch
from open_clip.transformer import VisionTransformer

from tokenprune import PruneConfig, pruned_blocks, remove_pruning, replace_last_block
from tokenprune import sweep
from tokenprune.cli import sweep_report

from helpers import TINY, run_main

timm = pytest.importorskip("timm")

# A single cut as a one-stage schedule, two stages with a block between them, three stages
# with a negative layer; the random control's schedule (its generator carries across batches)
# and mmr, on 36 patches.
CONFIGS = [None,
           PruneConfig(schedule=[(2, 3, 9)]),
           PruneConfig(schedule=[(1, 5, 15), (3, 2, 6)], alpha=0.7),
           PruneConfig(schedule=[(0, 5, 15), (2, 3, 7), (-1, 2, 3)]),
           PruneConfig(schedule=[(0, 20, 0), (2, 8, 0)], selection="random", seed=3),
           PruneConfig(schedule=[(1, 4, 16), (2, 3, 5)], selection="mmr", mmr_lambda=0.4)]


def build(name):
    torch.manual_seed(0)
    if name == "openclip":
        return VisionTransformer(image_size=48, patch_size=8, width=64, layers=4, heads=2,
                                 mlp_ratio=2.0, output_dim=32).eval(), 48
    # Rotary positions: each stage's kept rows must follow it into the blocks after it.
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=4,
                             img_size=84).eval(), 84


@pytest.mark.parametrize("name", ["openclip", "eva02"])
def test_engine_schedules_equal_the_patched_model(name):
    """Every stage's output and kept indices, batch after batch, are those of the tower patched
    with replace_last_block(schedule=...): a stage put at the wrong block or in the wrong order,
    the first stage fed the wrong block's input, or indices not in the original numbering,
    would differ."""
    model, size = build(name)
    torch.manual_seed(1)
    batches = [torch.randn(3, 3, size, size), torch.randn(2, 3, size, size)]
    encoder = sweep.GridEncoder(model, CONFIGS)
    with torch.no_grad():
        got = [encoder(images) for images in batches]
    for i, config in enumerate(CONFIGS):
        remove_pruning(model)
        if config is not None:
            replace_last_block(model, config=config)
        with torch.no_grad():
            for images, outputs in zip(batches, got):
                expected = model(images)
                assert torch.equal(outputs[i].output, expected), (name, config)
                stages = [block.last_keep_idx for block in pruned_blocks(model)]
                if config is None:
                    assert outputs[i].keep_idx is None and stages == []
                    continue
                assert len(outputs[i].stage_keep_idx) == len(config.stages) == len(stages)
                for kept, expected_kept in zip(outputs[i].stage_keep_idx, stages):
                    assert torch.equal(kept, expected_kept), (name, config)
                assert torch.equal(outputs[i].keep_idx, stages[-1])
    remove_pruning(model)
    # The stages kept fewer and fewer of the original patches, each among the ones before.
    first, last = got[0][3].stage_keep_idx[0], got[0][3].stage_keep_idx[-1]
    assert last.shape == (3, 5) and all(set(last[b].tolist()) <= set(first[b].tolist())
                                        for b in range(3))
    # Only the first stage's block input is recorded; the tower is left as it was.
    assert encoder.layers == [0, 1, 2]
    assert not pruned_blocks(model)


def test_budget_and_cost_of_a_schedule():
    """mean_tokens counts as bench/token_merging.py's schedule_tokens does; a one-stage
    schedule costs what the single cut costs."""
    # 12 blocks, 197 tokens: stages at blocks 3 and 6 keeping 1 + 100 and 1 + 60.
    assert sweep.mean_tokens(197, [(3, 101), (6, 61)], 12) == (3 * 197 + 3 * 101 + 6 * 61) / 12
    assert sweep.mean_tokens(197, [(11, 61)], 12) == (11 * 197 + 61) / 12
    single = sweep.relative_cost(197, 61, 6, 12, 768, 3072)
    assert sweep.relative_cost(197, None, None, 12, 768, 3072, stages=[(6, 61)]) == single
    two = sweep.relative_cost(197, None, None, 12, 768, 3072, stages=[(3, 101), (6, 61)])
    assert two < single
    # The second stage pays its selection on the 101 tokens that reach it, not on all 197.
    block = lambda n: n * (4 * 768 ** 2 + 2 * 768 * 3072) + 2 * n ** 2 * 768  # noqa: E731
    pruned = lambda T, n: (3 * T * 768 ** 2 + T ** 2 * 768 + n * (768 ** 2 + 2 * 768 * 3072)  # noqa: E731
                           + 2 * n ** 2 * 768)
    assert two == pytest.approx((3 * block(197) + pruned(197, 101) + 2 * block(101)
                                 + pruned(101, 61) + 5 * block(61)) / (12 * block(197)))


def test_grid_points_over_schedules():
    """Each schedule is one place of the grid, multiplied by the selections' own settings; its
    layers become block indices; the controls keep the same counts at the same blocks."""
    points = sweep.grid_points([4], [12], [0.3, 0.7], ["none"], [-1], ["cls", "random"], 4, 64,
                               "reference", 2, selections=["score", "mmr"], mmr_lambdas=[0.5],
                               schedules=[((1, 4, 20), (-1, 2, 6)), ((3, 4, 12),)])
    score = [p.config for p in points if p.kind == "score"]
    assert [(c.stages, c.alpha) for c in score] == [
        (((1, 4, 20), (3, 2, 6)), 0.3), (((1, 4, 20), (3, 2, 6)), 0.7),
        (((3, 4, 12),), 0.3), (((3, 4, 12),), 0.7)]
    assert score[2] == PruneConfig(k_anchors=4, top_m=12, layer=3, alpha=0.3,
                                   backend="reference")  # a one-stage schedule: the single cut
    assert [p.config.stages for p in points if p.kind == "mmr"] == [((1, 4, 20), (3, 2, 6)),
                                                                     ((3, 4, 12),)]
    for kind in ("cls", "random"):
        assert [p.config.stages for p in points if p.kind == kind] == [
            ((1, 24, 0), (3, 8, 0)), ((3, 16, 0),)]
    assert len(points) == 1 + 4 + 2 + 2 + 2


# ----- the summary: which schedule wins at each budget ----------------------------------------

def winner_row(kind, acc1, schedule, mean, alpha=None):
    return {"kind": kind, "block": schedule[-1][0], "num_blocks": 12, "k_anchors": schedule[-1][1],
            "top_m": schedule[-1][2], "alpha": alpha, "score_norm": "none" if alpha else None,
            "seed": None, "pruned": True, "kept_tokens": 1 + sum(schedule[-1][1:]),
            "tokens": 197, "acc1": acc1, "acc1_retained": acc1 / 0.8, "relative_cost": 0.5,
            "schedule": [list(s) for s in schedule] if len(schedule) > 1 else [],
            "mean_tokens": mean}


def test_summary_names_the_winner_at_each_budget():
    """Budgets are the rows' mean tokens per block; at each, the best row among those that run
    on at most that many: the cheaper schedule wins at its own budget, the better one from its
    budget on, and a row at a budget below wins there even when a dearer one scores more."""
    rows = [{**winner_row("unpruned", 0.8, [(0, 0, 0)], 197.0), "block": None, "pruned": False,
             "kept_tokens": 197, "schedule": None, "relative_cost": 1.0},
            winner_row("score", 0.60, [(3, 10, 90), (6, 10, 50)], 96.0, alpha=0.5),
            winner_row("score", 0.70, [(6, 10, 50)], 129.0, alpha=0.5),
            winner_row("score", 0.65, [(3, 10, 90), (6, 10, 50)], 96.0, alpha=0.7),
            winner_row("cls", 0.50, [(3, 100, 0), (6, 60, 0)], 96.0),
            winner_row("score", 0.62, [(11, 10, 50)], 185.7, alpha=0.5)]
    result = {"rows": rows, "primary": "acc1", "images": 1000, "tokens": 197, "num_blocks": 12}
    lines = sweep_report.schedule_winners(result)
    assert [line.split(":")[0] for line in lines] == ["at most 96.0 tokens per block",
                                                      "at most 129.0 tokens per block",
                                                      "at most 185.7 tokens per block"]
    assert "schedule 3:10:90,6:10:50, k=10, m=50, alpha=0.7" in lines[0].split(";")[0]
    assert "0.6500" in lines[0] and "next: schedule 3:10:90,6:10:50, k=10, m=50, alpha=0.5" \
        in lines[0]
    assert "block 7 of 12 (index 6), k=10, m=50, alpha=0.5" in lines[1].split(";")[0]
    assert "block 7 of 12 (index 6)" in lines[2].split(";")[0]  # 0.70 beats the last block's
    summary = sweep_report.summary_markdown(
        {"model": "m", "pretrained": "p", "dataset": "d", "date": "today", "device": "cpu",
         "amp": False, "batch_size": 8}, result)
    assert "## Which cut or schedule wins at each budget" in summary
    assert all(f"- {line}." in summary for line in lines)


# ----- the command --------------------------------------------------------------------------

def data_args(tiny):
    return ["--dataset", "wds/tiny", "--dataset_root", tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0"]


def test_sweep_over_schedules_writes_rows_and_the_winners(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = run_main(["sweep", *data_args(tiny), "--schedule", "0:4:20,1:2:6", "1:2:6",
                               "0:8:40,-1:4:12", "--alpha", "0.5", "--controls", "cls",
                               "--no_speed", "--quiet", "--output_dir", str(out)], capsys)
    assert status == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    score = [r for r in rows if r["kind"] == "score"]
    assert [r["schedule"] for r in score] == [[[0, 4, 20], [1, 2, 6]], [],
                                              [[0, 8, 40], [1, 4, 12]]]
    assert [(r["block"], r["kept_tokens"]) for r in score] == [(1, 9), (1, 9), (1, 17)]
    assert [r["mean_tokens"] for r in score] == [(25 + 9) / 2, (65 + 9) / 2, (49 + 17) / 2]
    assert [r["schedule"] for r in rows if r["kind"] == "cls"] == [
        [[0, 24, 0], [1, 8, 0]], [], [[0, 48, 0], [1, 16, 0]]]
    # The plot: the schedules at blocks 0 and 1 are a series of their own, beside the cut.
    meta = json.loads((out / "results.json").read_text())
    figure = sweep_report.plot_figure(meta, {**meta, "primary": meta["primary_metric"]})
    labels = {line.get_label(): line for line in figure.axes[0].get_lines()}
    schedules = labels["blocks 1, 2 of 2 (a schedule), alpha 0.5, none"]
    assert list(schedules.get_xdata()) == [9, 17]
    assert list(labels["block 2 of 2 (index 1), alpha 0.5, none"].get_xdata()) == [9]
    assert "cls control, blocks 1, 2 of 2 (a schedule)" in labels
    # The winner at each budget, from the rows themselves.
    summary = (out / "summary.md").read_text()
    pruned = [r for r in rows if r["pruned"]]
    for budget in sorted({r["mean_tokens"] for r in pruned}):
        best = max((r for r in pruned if r["mean_tokens"] <= budget),
                   key=lambda r: (r["acc1"], -r["mean_tokens"]))
        line = next(line for line in summary.splitlines()
                    if line.startswith(f"- at most {budget:.1f} tokens per block: "))
        assert f"{sweep_report._placed_label(best)} ({best['acc1']:.4f}" in line, line


@pytest.mark.parametrize("extra, message", [
    (["--schedule", "0:4:20,1:2:6", "--layer", "0"],
     "--schedule gives every point's blocks and counts: leave out --layer"),
    (["--schedule", "0:4:20,1:2:30"], "--schedule stage 2 must keep fewer patches than the 24"),
    (["--schedule", "0:4:20,2:2:6"], "--schedule 0:4:20,2:2:6: schedule stage 2 layer must be in "
                                     "[-2, 1] for this 2-block tower, got 2"),
    (["--schedule", "1:4"], "argument --schedule: must be stages LAYER:K_ANCHORS:TOP_M"),
])
def test_bad_schedules_are_refused_before_any_model_loads(tiny, tmp_path, capsys, no_loading,
                                                          extra, message):
    status, _, err = run_main(["sweep", *data_args(tiny), "--output_dir", str(tmp_path / "o"),
                               *extra], capsys)
    assert status in (1, 2) and message in err and len(err.strip().splitlines()) == 1, err
