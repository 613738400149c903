"""`tokenprune sweep`'s outputs for people: blocks counted from 1 (the 0-based index beside it)
in summary.md, the plot and the rows; a plot where every series can be seen and the legend
matches; the speed measured once per token budget, not once per setting.
Offline: the tiny OpenCLIP ViT and WebDataset of tests/helpers.py."""
import contextlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tokenprune.cli import main  # noqa: E402
from tokenprune.cli import sweep_report  # noqa: E402

from helpers import TINY  # noqa: E402

# Blocks 0 and 1 of 2; two alphas at each of two budgets per block; both controls.
GRID = ["--k_anchors", "4", "--top_m", "12", "20", "--alpha", "0.3", "0.7", "--layer", "0", "-1"]


def data_args(tiny):
    return ["--dataset", "wds/tiny", "--dataset_root", tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0"]


@pytest.fixture(scope="module")
def timed(tiny, tmp_path_factory):
    """A sweep with the default speed timing, counting the encode_image calls it makes."""
    import open_clip.model
    calls = []
    encode_image = open_clip.model.CLIP.encode_image

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return encode_image(self, images, *args, **kwargs)
    out = tmp_path_factory.mktemp("sweep") / "out"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(open_clip.model.CLIP, "encode_image", counted)
        status = main(["sweep", *data_args(tiny), *GRID, "--output_dir", str(out)])
    assert status == 0, err.getvalue()
    return out, calls


# ----- point 5: the default speed timing costs little -------------------------------------

def test_speed_comes_from_the_sweeps_own_passes(timed):
    """No encode_image call is made for the timing: per batch, one unpruned call and one per
    setting that prunes, as with --no_speed; yet every row has its speed."""
    out, calls = timed
    meta = json.loads((out / "results.json").read_text())
    rows = meta["rows"]
    pruning = [r for r in rows if r["pruned"]]
    assert len(rows) == 1 + 8 + 2 * 4 and len(pruning) == 16
    batches = [8, 8, 8, 6]  # 30 images in batches of 8
    assert calls == [n for n in batches for _ in range(1 + len(pruning))]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert meta["speed_images"] == 30 - 8  # the first batch warms up


# ----- point 7: blocks counted from 1 for people --------------------------------------------

def test_blocks_count_from_one_in_summary_rows_and_plot(timed):
    out, _ = timed
    meta = json.loads((out / "results.json").read_text())
    rows = meta["rows"]
    assert all(r["block_number"] == r["block"] + 1 for r in rows if r["block"] is not None)
    assert {r["block"] for r in rows if r["kind"] == "score"} == {0, 1}
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| 1 of 2 (index 0) |") == 2
    assert summary.count("\n| 2 of 2 (index 1) |") == 2
    assert "| 0 of 2" not in summary
    figure = sweep_report.plot_figure(meta, {**meta, "primary": meta["primary_metric"]})
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert sum("block 1 of 2" in label for label in labels) == 2 + 2  # alphas, controls
    assert sum("block 2 of 2" in label for label in labels) == 2 + 2
    assert not any("block 0" in label or "/2" in label for label in labels)


# ----- point 8: every series visible, the legend matching ---------------------------------

def flat_result(blocks=(10, 11), alphas=(0.3, 0.5, 0.7), budgets=(40, 60)):
    """A sweep's result where every series has the same values: the case that hid them."""
    rows = [{"kind": "unpruned", "block": None, "block_number": None, "alpha": None,
             "score_norm": None, "seed": None, "kept_tokens": 197, "pruned": False,
             "acc1": 0.5}]
    for block in blocks:
        for alpha in alphas:
            rows += [{"kind": "score", "block": block, "block_number": block + 1, "alpha": alpha,
                      "score_norm": "none", "seed": None, "kept_tokens": kept, "pruned": True,
                      "acc1": 0.4} for kept in budgets]
        for kind in ("cls", "random"):
            rows += [{"kind": kind, "block": block, "block_number": block + 1, "alpha": None,
                      "score_norm": None, "seed": 0 if kind == "random" else None,
                      "kept_tokens": kept, "pruned": True, "acc1": 0.4} for kept in budgets]
    return {"rows": rows, "primary": "acc1", "tokens": 197, "num_blocks": 12, "images": 60}


def style(line):
    return (line.get_color(), line.get_marker(), line.get_linestyle())


def test_plot_shows_every_series_and_the_legend_matches():
    import matplotlib.colors as mcolors
    meta = {"model": "ViT-B-16", "pretrained": "x.pt", "dataset": "wds/toy"}
    figure = sweep_report.plot_figure(meta, flat_result())
    ax = figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    score = [line for label, line in lines.items() if "alpha" in label]
    controls = [line for label, line in lines.items() if "control" in label]
    assert len(score) == 2 * 3 and len(controls) == 2 * 2
    # Lying on top of each other, they still differ in colour, marker or line style, and a
    # series drawn later has smaller markers, so the earlier ones show around it.
    styles = [style(line) for line in score + controls]
    assert len(set(styles)) == len(styles)
    drawn = [line for line in ax.get_lines() if line in score + controls]
    sizes = [line.get_markersize() for line in drawn]
    for block in ("block 11 of 12", "block 12 of 12"):
        same_block = [line for line in drawn if block in line.get_label()]
        assert len({line.get_linestyle() for line in same_block
                    if "alpha" in line.get_label()}) == 3
        assert len({mcolors.to_hex(line.get_color()) for line in same_block}) == 1
        block_sizes = [line.get_markersize() for line in same_block]
        assert block_sizes == sorted(block_sizes, reverse=True) and \
            len(set(block_sizes)) == len(block_sizes)
    assert len(sizes) == len(drawn)
    # The controls wear their block's colour; the blocks differ.
    colour = {block: {mcolors.to_hex(line.get_color()) for line in score
                      if block in line.get_label()} for block in ("11 of 12", "12 of 12")}
    assert all(len(c) == 1 for c in colour.values()) and colour["11 of 12"] != colour["12 of 12"]
    for line in controls:
        block = "11 of 12" if "11 of 12" in line.get_label() else "12 of 12"
        assert {mcolors.to_hex(line.get_color())} == colour[block]
    # Every series is in the legend, drawn as it is in the plot.
    legend = ax.get_legend()
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    assert set(entries) == set(lines)
    for label, handle in entries.items():
        line = lines[label]
        assert mcolors.to_hex(handle.get_color()) == mcolors.to_hex(line.get_color()), label
        assert (handle.get_marker(), handle.get_linestyle()) == \
            (line.get_marker(), line.get_linestyle()), label
        assert mcolors.to_hex(handle.get_markerfacecolor()) == \
            mcolors.to_hex(line.get_markerfacecolor()), label


# ----- the legend beside the points, binomial intervals on them -------------------------------

def test_legend_covers_no_point():
    """The legend lies beside the axes (so over no point, wherever the points are), inside the
    saved figure."""
    meta = {"model": "ViT-B-16", "pretrained": "x.pt", "dataset": "wds/toy"}
    figure = sweep_report.plot_figure(meta, flat_result())
    figure.canvas.draw()
    ax = figure.axes[0]
    legend = ax.get_legend().get_window_extent()
    axes = ax.get_window_extent()
    assert legend.x0 >= axes.x1 or legend.y1 <= axes.y0, (legend, axes)
    whole = figure.bbox
    assert whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and legend.y1 <= whole.y1


def test_points_carry_95_percent_wilson_intervals():
    """acc1 = 0.4 on 60 images: Wilson's 95 % interval is (0.2857, 0.5263) (as
    scipy.stats.binomtest(24, 60).proportion_ci(method="wilson") gives it); the unpruned 0.5
    gets a band, (0.3774, 0.6226)."""
    import numpy as np
    meta = {"model": "ViT-B-16", "pretrained": "x.pt", "dataset": "wds/toy"}
    result = flat_result()
    figure = sweep_report.plot_figure(meta, result)
    ax = figure.axes[0]
    series = [line for line in ax.get_lines() if "alpha" in line.get_label()
              or "control" in line.get_label()]
    bars = ax.collections
    assert len(bars) == len(series) == 10
    for collection in bars:
        for segment in collection.get_segments():
            (x0, low), (x1, high) = segment
            assert x0 == x1 and min(abs(x0 - 40), abs(x0 - 60)) < 2  # beside its budget
            np.testing.assert_allclose((low, high), (0.2857, 0.5263), atol=2e-4)
    band = list(ax.patches)
    assert len(band) == 1
    corners = band[0].get_path().transformed(band[0].get_patch_transform()).vertices[:, 1]
    np.testing.assert_allclose((corners.min(), corners.max()), (0.3774, 0.6226), atol=2e-4)
    assert "95 % Wilson intervals" in ax.get_title()


# ----- issue 28, a new user's findings: the smallest sweep's plot ----------------------------

def one_budget_result():
    """The sweep a newcomer runs first: one setting at one budget, and the controls."""
    return {**flat_result(blocks=(3,), alphas=(0.5,), budgets=(17,)), "num_blocks": 4,
            "tokens": 65, "images": 2000}


@pytest.mark.parametrize("meta", [
    {"model": "tokenprune:proxy-vit", "pretrained": "shipped", "dataset": "tokenprune:digits"},
    # a long name and path: the title wraps instead of running off the figure
    {"model": "hf-hub:timm/ViT-SO400M-14-SigLIP2-378-a-long-name-for-the-title",
     "pretrained": "/data/checkpoints/some/long/path/open_clip_pytorch_model.bin",
     "dataset": "wds/imagenet1k-validation-subset"},
])
def test_a_one_budget_sweep_draws_a_readable_plot(tmp_path, meta):
    """One budget: x limits around it (not 16.985 to 17.015), whole tick labels without an
    offset, every error bar on its marker, and the title inside the figure."""
    figure = sweep_report.plot_figure(meta, one_budget_result())
    figure.canvas.draw()
    ax = figure.axes[0]
    left, right = ax.get_xlim()
    assert left <= 17 - 5 and right >= 17 + 5 and right - left <= 65
    assert ax.xaxis.get_offset_text().get_text() == ""
    ticks = [tick for tick in ax.get_xticks() if left <= tick <= right]
    assert len(ticks) >= 3 and all(float(tick).is_integer() for tick in ticks)
    for collection in ax.collections:  # the error bars, a little apart: within 1 % of the axis
        for (x0, _), (x1, _) in collection.get_segments():
            assert x0 == x1 and abs(x0 - 17) <= 0.01 * (right - left)
    title = ax.title.get_window_extent()
    assert figure.bbox.x0 <= title.x0 and title.x1 <= figure.bbox.x1
    assert figure.bbox.y0 <= title.y0 and title.y1 <= figure.bbox.y1
    assert "tokens: " in ax.title.get_text()
    figure.savefig(tmp_path / "plot.png")  # the objects tested are those the file is drawn from
