"""`tokenprune sweep` and its engine: the same numbers as `tokenprune eval` for every grid
point, the controls, the output files, bad input before any model loads, Ctrl-C.
Offline: the tiny random-weight (briefly trained) OpenCLIP ViT and WebDataset of helpers.py."""
import contextlib
import csv
import io
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tokenprune import PruneConfig, pruned_block, remove_pruning, replace_last_block  # noqa: E402
from tokenprune import sweep  # noqa: E402
from tokenprune.config import MMR_LAMBDA  # noqa: E402
from tokenprune.cli import sweep as sweep_command  # noqa: E402
from tokenprune.cli import main  # noqa: E402

from helpers import CLASSES, TINY, class_images, run_main, write_webdataset  # noqa: E402

# Two layers (blocks 0 and 1 of 2), two budgets per layer, and one point that prunes nothing
# (4 + 60 >= 64 patches); the seed's score and mmr at each, and cls, which is the cls control.
GRID = ["--k_anchors", "4", "--top_m", "12", "20", "60", "--alpha", "0.3",
        "--score_norm", "minmax", "--layer", "0", "-1", "--selection", "score", "mmr", "cls",
        "--mmr_lambda", "0.6"]


def data_args(tiny, data=None):
    return ["--dataset", "wds/tiny", "--dataset_root", data or tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0"]




@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    """One sweep over GRID with both controls (no speed measurement: see the NaN test);
    (folder, stderr)."""
    out = tmp_path_factory.mktemp("sweep") / "results"
    err = io.StringIO()  # module scope has no capsys
    with contextlib.redirect_stderr(err):
        status = main(["sweep", *data_args(tiny), *GRID, "--no_speed", "--output_dir", str(out)])
    assert status == 0, err.getvalue()
    return out, err.getvalue()


def rows_of(folder):
    return json.loads((folder / "results.json").read_text())["rows"]


def eval_metrics(tiny, tmp_path, *pruning):
    output = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
    assert main(["eval", *data_args(tiny), "--quiet", "--output", str(output), *pruning]) == 0
    return json.loads(output.read_text())["metrics"]


def test_every_point_equals_tokenprune_eval(tiny, swept, tmp_path):
    rows = rows_of(swept[0])
    unpruned = eval_metrics(tiny, tmp_path)
    metric_names = list(unpruned)
    assert rows[0]["kind"] == "unpruned"
    assert {name: rows[0][name] for name in metric_names} == unpruned
    checked = 0
    for row in rows:
        if row["kind"] == "random" or row["kind"] == "unpruned":
            continue
        if row["kind"] == "mmr" and (row["block"], row["top_m"]) != (0, 12):
            continue  # one mmr point through eval is enough: the rest differ only in k, m, layer
        flags = ["--enable_pruning", "--k_anchors", str(row["k_anchors"]), "--top_m",
                 str(row["top_m"]), "--layer", str(row["block"])]
        if row["kind"] == "score":
            flags += ["--alpha", str(row["alpha"]), "--score_norm", row["score_norm"]]
        elif row["kind"] == "mmr":
            flags += ["--selection", "mmr", "--mmr_lambda", str(row["mmr_lambda"])]
        # The cls rows go through eval's score selection with k = k + m, m = 0: the same tokens.
        expected = eval_metrics(tiny, tmp_path, *flags)
        assert {name: row[name] for name in metric_names} == expected, row  # float for float
        checked += 1
    # Score points that prune, the two that do not, cls (the grid's and the controls': one row
    # per budget, and the grid's two that prune nothing), one mmr point.
    assert checked == 4 + 2 + 4 + 2 + 1
    # The grid's settings really changed the predictions (the comparison is not blind).
    assert len({tuple(row[name] for name in metric_names) for row in rows}) > 2


def test_rows_layers_controls_and_not_pruned(swept):
    rows = rows_of(swept[0])
    score = [row for row in rows if row["kind"] == "score"]
    assert sorted((r["block"], r["top_m"]) for r in score) == \
        [(0, 12), (0, 20), (0, 60), (1, 12), (1, 20), (1, 60)]
    assert all(r["num_blocks"] == 2 and r["tokens"] == 65 for r in rows)
    for row in score:
        assert row["pruned"] == (row["top_m"] < 60)
        assert row["kept_tokens"] == (1 + 4 + row["top_m"] if row["pruned"] else 65)
        if not row["pruned"]:  # the unpruned model's numbers, not an error
            assert (row["acc1"], row["relative_cost"]) == (rows[0]["acc1"], 1.0)
    budgets = {(r["block"], r["kept_tokens"]) for r in score if r["pruned"]}
    for kind in ("cls", "random"):
        controls = [r for r in rows if r["kind"] == kind and r["pruned"]]
        assert {(r["block"], r["kept_tokens"]) for r in controls} == budgets
        assert all(r["k_anchors"] == r["kept_tokens"] - 1 and r["top_m"] == 0 for r in controls)
    assert {r["seed"] for r in rows if r["kind"] == "random"} == {0}
    mmr = [row for row in rows if row["kind"] == "mmr"]
    assert sorted((r["block"], r["top_m"]) for r in mmr) == \
        [(0, 12), (0, 20), (0, 60), (1, 12), (1, 20), (1, 60)]
    assert all(r["mmr_lambda"] == 0.6 and r["alpha"] is None and r["selection"] == "mmr"
               for r in mmr)
    assert all(r["mmr_lambda"] is None for r in rows if r["kind"] != "mmr")
    assert {r["selection"] for r in rows} == {None, "score", "mmr", "cls", "random"}
    # Costs fall with fewer tokens and an earlier layer; retained is relative to unpruned.
    by_budget = {(r["block"], r["kept_tokens"]): r for r in score if r["pruned"]}
    assert by_budget[(0, 17)]["relative_cost"] < by_budget[(0, 25)]["relative_cost"] \
        < by_budget[(1, 25)]["relative_cost"] < 1
    for row in rows:
        assert row["acc1_retained"] == pytest.approx(row["acc1"] / rows[0]["acc1"])
        assert row["images_per_s"] is None  # --no_speed


def test_output_files(swept):
    folder, err = swept
    assert sorted(os.listdir(folder)) == sorted(sweep_command.OUTPUT_FILES)
    rows = rows_of(folder)
    with open(folder / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(rows[0])
    assert [r["kind"] for r in table] == [r["kind"] for r in rows]
    meta = json.loads((folder / "results.json").read_text())
    assert (meta["dataset"], meta["model"], meta["images"]) == ("wds/tiny", TINY, 30)
    summary = (folder / "summary.md").read_text()
    assert "wds/tiny" in summary and TINY in summary and "30 images" in summary
    # One row per budget and selection of the grid (score, mmr); blocks counted from 1, the
    # 0-based index beside.
    assert summary.count("\n| 1 of 2 (index 0) |") + summary.count("\n| 2 of 2 (index 1) |") == 8
    assert Image.open(folder / "accuracy_vs_tokens.png").size[0] > 400
    # One progress bar, with a total: 5 class names + 30 images.
    assert re.search(r"\b35/35\b", err), err
    assert "wrote results.csv" in err


def test_engine_matches_patched_model(tiny):
    """encode_grid's outputs and keep_idx are the patched model's, batch after batch (the
    random control's draws continue across batches as in one patched model)."""
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=tiny["checkpoint"])
    model.eval()
    configs = [None, PruneConfig(k_anchors=3, top_m=9, layer=0),
               PruneConfig(k_anchors=5, top_m=20, alpha=0.7, layer=1),
               PruneConfig(k_anchors=12, top_m=0, layer=1, selection="random", seed=3),
               PruneConfig(k_anchors=4, top_m=60, layer=0),  # 64 >= 64 patches: unpruned
               PruneConfig(k_anchors=3, top_m=9, layer=0, selection="mmr", mmr_lambda=0.3),
               PruneConfig(k_anchors=2, top_m=10, layer=1, selection="cls")]
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    encoder = sweep.GridEncoder(model.visual, configs)
    with torch.no_grad():  # as in CLIP_benchmark (nn.MultiheadAttention's fast path)
        got = [encoder(images) for images in batches]
    for i, config in enumerate(configs):
        remove_pruning(model)
        if config is not None:
            replace_last_block(model, config=config)
        with torch.no_grad():
            for images, outputs in zip(batches, got):
                expected = model.visual(images)
                assert torch.equal(outputs[i].output, expected), (config, i)
                block = pruned_block(model)
                keep = None if block is None else block.last_keep_idx
                if keep is None:
                    assert outputs[i].keep_idx is None
                else:
                    assert torch.equal(outputs[i].keep_idx, keep)
    remove_pruning(model)
    assert got[0][3].keep_idx.shape == (4, 12) and not torch.equal(
        got[0][3].keep_idx[:3], got[1][3].keep_idx)
    # The tower is left as it was, and a pruned tower is refused.
    assert all(type(b).__name__ == "ResidualAttentionBlock"
               for b in model.visual.transformer.resblocks)
    replace_last_block(model, k_anchors=2, top_m=2)
    with pytest.raises(ValueError, match="remove_pruning"):
        sweep.encode_grid(model.visual, batches[0], configs)


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "1.5"], "--alpha must be a finite number in [0, 1], got 1.5"),
    (["--k_anchors", "0"], "--k_anchors must be an integer >= 1, got 0"),
    (["--top_m", "5", "-1"], "--top_m must be an integer >= 0, got -1"),
    (["--layer", "40"], "--layer must be in [-2, 1] for tokenprune-test-tiny's 2-block image "
                        "tower, got 40"),
    (["--alpha"], "--alpha: give at least one value (numbers in [0, 1])"),
    (["--score_norm", "zscore"], "--score_norm must be one of 'none', 'minmax', got 'zscore'"),
    (["--controls", "random", "shuffled"], "--controls random shuffled: give random and/or cls"),
    (["--selection", "score", "fastervlm"],
     "--selection must be one of 'score', 'cls', 'mmr', 'random', got 'fastervlm'"),
    (["--selection"], "--selection: give at least one value (any of score, cls, mmr, random"),
    (["--mmr_lambda", "0.5", "-0.1"], "--mmr_lambda must be a finite number in [0, 1], got -0.1"),
    (["--task", "zeroshot_retrieval"], "--task zeroshot_retrieval (of --dataset wds/tiny): "
                                       "tokenprune sweep evaluates zero-shot classification only"),
    (["--language", "en", "fr"], "tokenprune sweep takes exactly one language"),
    (["--model", "RN50", "--pretrained", "openai"], "ResNet image tower"),
])
def test_bad_input_is_refused_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch, extra,
                                                     message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_loading)
    monkeypatch.setattr(open_clip, "create_model", no_loading)
    argv = ["sweep", *data_args(tiny), "--output_dir", str(tmp_path / "out"), *extra]
    status, _, err = run_main(argv, capsys)
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenprune: error: "), err
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_interrupted_run_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    calls = []
    encode = sweep.GridEncoder.__call__

    def interrupted(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(self, images)
    monkeypatch.setattr(sweep.GridEncoder, "__call__", interrupted)
    out = tmp_path / "out"
    status, _, err = run_main(["sweep", *data_args(tiny), *GRID, "--no_speed", "--quiet",
                               "--output_dir", str(out)], capsys)
    assert status == 130 and len(calls) == 2
    assert f"nothing was written to {out}" in err
    assert not out.exists()


def test_interrupted_while_writing_leaves_no_half_written_file(tiny, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def interrupted_plot(meta, result, path):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep_command, "plot", interrupted_plot)
    status, _, err = run_main(["sweep", *data_args(tiny), "--k_anchors", "4", "--top_m", "12",
                               "--alpha", "0.5", "--no_speed", "--quiet",
                               "--output_dir", str(out)], capsys)
    assert status == 130 and "nothing was written" in err
    assert os.listdir(out) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind


def test_non_finite_metrics_are_null_and_speed(tiny, tmp_path, capsys):
    # Four classes: CLIP_benchmark reports acc5 as NaN.
    images, labels = class_images(12, seed=3)
    keep = [i for i, label in enumerate(labels) if label < 4]
    data = write_webdataset(tmp_path / "four", [images[i] for i in keep],
                            [labels[i] for i in keep], classes=CLASSES[:4])
    out = tmp_path / "out"
    status, _, err = run_main(["sweep", *data_args(tiny, data), "--k_anchors", "4", "--top_m",
                               "12", "--alpha", "0.5", "--controls", "none",
                               "--output_dir", str(out)], capsys)
    assert status == 0, err
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    rows = json.loads(text)["rows"]
    assert [r["kind"] for r in rows] == ["unpruned", "score"]
    assert all(r["acc5"] is None and r["images_per_s"] > 0 for r in rows)
    # The bar's total: 4 class names + the images (the speed needs no steps of its own).
    assert re.search(rf"\b{4 + len(keep)}/{4 + len(keep)}\b", err), err
    assert all(0 <= r["acc1"] <= 1 for r in rows)
    with open(out / "results.csv", newline="") as f:
        assert {r["acc5"] for r in csv.DictReader(f)} == {""}


# ----- where a simpler choice wins -----------------------------------------------------------

def finding_row(kind, acc1, kept=17, block=1, alpha=None, **extra):
    return {"kind": kind, "block": block, "num_blocks": 4, "k_anchors": 4, "top_m": kept - 5,
            "alpha": alpha, "score_norm": None if alpha is None else "none", "seed": None,
            "pruned": True, "kept_tokens": kept, "tokens": 65, "acc1": acc1, **extra}


def test_summary_table_takes_the_best_of_every_selection_in_the_grid():
    """A grid of mmr points only (no score points) still gets its table, and where mmr beats the
    seed's score, the best setting is the mmr one."""
    meta = {"model": "tiny", "pretrained": "none", "dataset": "wds/tiny", "date": "today",
            "device": "cpu", "amp": False, "batch_size": 8}
    unpruned = {**finding_row("unpruned", 0.9), "block": None, "pruned": False,
                "kept_tokens": 65, "acc1_retained": 1.0, "relative_cost": 1.0}

    def grid_row(kind, acc1, **extra):
        return {**finding_row(kind, acc1, **extra), "acc1_retained": acc1 / 0.9,
                "relative_cost": 0.8}

    mmr_only = [unpruned, grid_row("mmr", 0.7, mmr_lambda=0.8), grid_row("cls", 0.6)]
    result = {"rows": mmr_only, "primary": "acc1", "images": 100, "tokens": 65, "num_blocks": 4}
    table = [line for line in sweep_command.summary_markdown(meta, result).splitlines()
             if line.startswith("| 2 of 4 (index 1) |")]
    assert len(table) == 1 and "| mmr, k=4, m=12, lambda=0.8 | 0.7000 |" in table[0], table
    # Where mmr wins, the seed's best score setting keeps its row, above mmr's: the best of
    # every selection of the grid, not only the best of all.
    both = mmr_only + [grid_row("score", 0.5, alpha=0.5), grid_row("score", 0.55, alpha=0.7)]
    result["rows"] = both
    table = [line for line in sweep_command.summary_markdown(meta, result).splitlines()
             if line.startswith("| 2 of 4 (index 1) |")]
    assert len(table) == 2, table
    assert "| k=4, m=12, alpha=0.7, none | 0.5500 |" in table[0], table
    assert "| mmr, k=4, m=12, lambda=0.8 | 0.7000 |" in table[1], table


def test_summary_states_the_noise_when_nothing_wins():
    """100 images, the best score setting at 0.28 and cls at 0.30: inside the noise, which the
    summary states, 2 sqrt(0.28 * 0.72 / 100) = 8.98 points (9.17 at 0.3 for another budget)."""
    meta = {"model": "tiny", "pretrained": "none", "dataset": "wds/tiny", "date": "today",
            "device": "cpu", "amp": False, "batch_size": 8}
    rows = [{**finding_row("unpruned", 0.3), "block": None, "pruned": False, "kept_tokens": 65}]
    for kept, score in ((17, 0.28), (25, 0.30)):
        rows += [finding_row("score", score - 0.02, kept=kept, alpha=0.3),
                 finding_row("score", score, kept=kept, alpha=0.7),
                 finding_row("cls", score + 0.02, kept=kept)]
    for row in rows:
        row.update(acc1_retained=row["acc1"] / 0.3, relative_cost=0.8)
    result = {"rows": rows, "primary": "acc1", "images": 100, "tokens": 65, "num_blocks": 4}
    summary = sweep_command.summary_markdown(meta, result)
    assert sweep_command.simpler_choice_findings(result) == []
    assert ("by more than the noise (two binomial standard errors of the best score setting's "
            "value p, 2 sqrt(p (1 - p) / n), at least one image: here 9.0 to 9.2 points at "
            "n = 100 images).") in summary, summary
    assert "95 % Wilson intervals" in summary


def test_simpler_choice_findings_name_a_win_beyond_the_noise_only():
    n = 1000
    rows = [{**finding_row("unpruned", 0.9), "block": None, "pruned": False, "kept_tokens": 65},
            # 17 tokens: cls 4 points above the best score setting (0.82); the noise there is
            # 2 sqrt(0.82 * 0.18 / 1000) = 2.43 points. random is below.
            finding_row("score", 0.80, alpha=0.3), finding_row("score", 0.82, alpha=0.7),
            finding_row("cls", 0.86), finding_row("random", 0.50),
            # 25 tokens: cls 2 points above 0.80, inside the noise (2.53 points): no line.
            finding_row("score", 0.80, kept=25, alpha=0.5), finding_row("cls", 0.82, kept=25),
            # 33 tokens: another selection of the grid wins, and so does cls, by less; a row
            # with no metric is skipped.
            finding_row("score", 0.60, kept=33, alpha=0.5),
            finding_row("mmr", 0.70, kept=33, selection="mmr", mmr_lambda=0.7),
            finding_row("cls", 0.66, kept=33), finding_row("random", None, kept=33)]
    result = {"rows": rows, "primary": "acc1", "images": n, "num_blocks": 4}
    lines = sweep_command.simpler_choice_findings(result)
    assert len(lines) == 2, lines
    assert lines[0].startswith("at block 2 of 4 (index 1), 17 tokens, cls keeps 4.0 points more acc1 "
                               "than the best score setting (k=4, m=12, alpha=0.7, none: "
                               "0.8200 against 0.8600; n = 1000, one image = 0.1 points, "
                               "noise 2.4 points)"), lines[0]
    assert "random" not in lines[0]
    assert lines[1].startswith("at block 2 of 4 (index 1), 33 tokens, mmr with lambda 0.7 keeps 10.0 "
                               "points more"), lines[1]
    assert lines[1].endswith("; so do cls (+6.0)"), lines[1]
    # With all the seed's settings at least as good, nothing is said.
    rows[3] = finding_row("cls", 0.82)
    rows[8] = finding_row("score", 0.70, kept=33, alpha=0.7)
    rows[10] = finding_row("cls", 0.60, kept=33)
    assert sweep_command.simpler_choice_findings(result) == []


def test_sweep_states_its_findings_in_summary_and_output(swept):
    folder, err = swept
    meta = json.loads((folder / "results.json").read_text())
    result = {"rows": meta["rows"], "primary": meta["primary_metric"], "images": meta["images"],
              "num_blocks": meta["num_blocks"]}
    lines = sweep_command.simpler_choice_findings(result)
    summary = (folder / "summary.md").read_text()
    assert "## Where a simpler choice wins" in summary
    for line in lines:
        assert f"- {line}." in summary and f"tokenprune: {line}" in err
    if not lines:
        assert "At no budget does a control" in summary
    assert err.count("tokenprune: at block") == len(lines)


def test_grid_points_multiply_each_selection_by_its_own_parameters():
    """`--selection score mmr cls random --mmr_lambda 0.3 0.5 0.7`: lambda multiplies the mmr
    points only, alpha and score_norm the score points only; cls and random depend on k + m
    alone (as the controls do), and nothing is listed twice."""
    points = sweep.grid_points([2], [6, 10], [0.3, 0.7], ["none", "minmax"], [1, -3],
                               ["cls", "random"], 4, 64, "reference", 3,
                               selections=["score", "mmr", "cls", "random", "mmr"],
                               mmr_lambdas=[0.3, 0.5, 0.7])
    kinds = [p.kind for p in points]
    assert kinds[0] == "unpruned" and len(set(points)) == len(points)
    # Layers 1 and -3 are the same block of 4: one layer.
    assert {p.config.layer for p in points[1:]} == {1}
    score = [p.config for p in points if p.kind == "score"]
    assert len(score) == 2 * 2 * 2  # alphas x score_norms x (k, m)
    assert {(c.alpha, c.score_norm) for c in score} == {(a, n) for a in (0.3, 0.7)
                                                       for n in ("none", "minmax")}
    assert all(c.selection == "score" and c.mmr_lambda == MMR_LAMBDA for c in score)
    mmr = [p.config for p in points if p.kind == "mmr"]
    assert sorted((c.mmr_lambda, c.top_m) for c in mmr) == \
        [(lam, m) for lam in (0.3, 0.5, 0.7) for m in (6, 10)]
    assert all(c.selection == "mmr" and (c.alpha, c.score_norm) == (0.5, "none") for c in mmr)
    # One cls and one random row per budget (8 and 12 patches): the grid's are the controls.
    for kind in ("cls", "random"):
        rows = [p.config for p in points if p.kind == kind]
        assert sorted((c.k_anchors, c.top_m) for c in rows) == [(8, 0), (12, 0)]
        assert all(c.selection == kind and c.seed == 3 for c in rows)
    assert len(points) == 1 + 8 + 6 + 2 + 2


def test_grid_points_controls_stay_for_every_selection():
    points = sweep.grid_points([4], [12], [0.5], ["none"], [-1], ["cls", "random"], 2, 64,
                               "auto", 0, selections=["mmr"], mmr_lambdas=[0.2])
    assert [p.kind for p in points] == ["unpruned", "mmr", "random", "cls"]
    assert all(p.config.kept_patches == 16 for p in points[1:])
    # The controls alone, when asked for none.
    assert [p.kind for p in sweep.grid_points([4], [12], [0.5], ["none"], [-1], [], 2, 64,
                                              "auto", 0, selections=["mmr"])] == \
        ["unpruned", "mmr"]
