"""The command line: `tokenprune eval` against CLIP_benchmark's own eval, its JSON, its errors,
and `tokenprune visualize`. Offline: a tiny random-weight OpenCLIP ViT saved as a checkpoint and a
tiny WebDataset, both made here."""
import json
import os
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tokenprune.cli import clip_benchmark_flags, visualize  # noqa: E402
from tokenprune.block import PrunedResidualAttentionBlock  # noqa: E402
from tokenprune.cli import build_parser, main  # noqa: E402
from tokenprune.cli.evaluate import accuracy, eval_parser  # noqa: E402

from helpers import TINY, run_main  # noqa: E402


def eval_args(tiny, output, *extra):
    return ["eval", "--dataset", "wds/tiny", "--dataset_root", tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0",
            "--output", str(output), "--quiet", *extra]




@pytest.fixture(scope="module")
def unpruned(tiny, tmp_path_factory):
    """The same evaluation by `python -m clip_benchmark.cli eval` and by `tokenprune eval`."""
    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification
    out = tmp_path_factory.mktemp("unpruned")
    argv = eval_args(tiny, out / "clip_benchmark.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["clip_benchmark", *argv])
        if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
            # CLIP_benchmark 1.6.2 cannot compute accuracy on numpy >= 2.4 (a TypeError):
            # give it the same workaround tokenprune eval uses (see tokenprune/cli/evaluate.py).
            mp.setattr(zeroshot_classification, "accuracy", accuracy)
        cb_cli.main()
    assert main(eval_args(tiny, out / "tokenprune.json")) == 0
    return [json.loads((out / name).read_text())
            for name in ("clip_benchmark.json", "tokenprune.json")]


def test_eval_flags_are_clip_benchmarks_plus_pruning(monkeypatch):
    from clip_benchmark import cli as cb_cli
    seed_command = ["eval", "--dataset", "cifar10", "--model", "ViT-B-32", "--pretrained",
                    "openai", "--enable_pruning", "--k_anchors", "5", "--top_m", "30",
                    "--alpha", "0.6"]
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *seed_command[:7]])
    _, theirs = cb_cli.get_parser_args()
    # The light parser (its copy of CLIP_benchmark's flags) and the one eval runs with.
    for parser in (build_parser(), eval_parser()):
        ours = parser.parse_args(seed_command + ["--score_norm", "minmax", "--layer", "-2",
                                                 "--selection", "mmr", "--mmr_lambda", "0.3"])
        assert vars(theirs).items() <= vars(ours).items()  # every CLIP_benchmark flag, same value
        assert (ours.enable_pruning, ours.k_anchors, ours.top_m, ours.alpha) == (True, 5, 30, 0.6)
        assert (ours.score_norm, ours.layer, ours.backend) == ("minmax", -2, "auto")
        assert (ours.selection, ours.mmr_lambda) == ("mmr", 0.3)
        defaults = parser.parse_args(["eval"])
        assert (defaults.enable_pruning, defaults.k_anchors, defaults.top_m, defaults.alpha) == \
            (False, 10, 50, 0.5)
        assert (defaults.selection, defaults.mmr_lambda) == ("score", 0.8)
    # CLIP_benchmark's help for --no_amp ("whether to use mixed precision") says the opposite.
    evaluate = eval_parser()._subparsers._group_actions[0].choices["eval"]
    no_amp = next(action for action in evaluate._actions if "--no_amp" in action.option_strings)
    assert no_amp.help.startswith("turn off mixed precision")


def test_copy_of_clip_benchmark_flags_matches_its_parser(monkeypatch):
    """tokenprune/cli/clip_benchmark_flags.py must equal the installed CLIP_benchmark's eval flags."""
    import argparse
    from importlib.metadata import version

    from clip_benchmark import cli as cb_cli
    monkeypatch.setattr(sys, "argv", ["clip_benchmark"])
    parser, _ = cb_cli.get_parser_args()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    theirs = tuple(clip_benchmark_flags.describe(action)
                   for action in subparsers.choices["eval"]._actions
                   if not isinstance(action, argparse._HelpAction))
    assert theirs == clip_benchmark_flags.EVAL_FLAGS
    assert version("clip-benchmark") == clip_benchmark_flags.VERSION
    assert clip_benchmark_flags.flags_trusted()


def test_eval_unpruned_matches_clip_benchmark(unpruned):
    theirs, ours = unpruned
    assert ours["metrics"] == theirs["metrics"]
    assert {k: ours[k] for k in theirs} == theirs  # CLIP_benchmark's fields, unchanged
    assert ours["pruning"] == {"enabled": False}
    assert ours["tokens_before"] == ours["tokens_after"] == 65
    speed = ours["throughput"]
    assert speed["images_per_second"] > 0 and speed["images"] == 30 - 8  # first batch: warm-up
    assert (speed["device"], speed["batch_size"]) == ("cpu", 8)


def test_eval_pruned_json(tiny, unpruned, tmp_path, capsys, monkeypatch):
    kept = []
    forward = PrunedResidualAttentionBlock.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        kept.append(tuple(out.shape))
        return out
    monkeypatch.setattr(PrunedResidualAttentionBlock, "forward", spy)
    from tokenprune.cli import evaluate
    monkeypatch.setattr(evaluate, "cpu_has_native_bfloat16", lambda: False)  # the advice's case
    status, _, err = run_main(eval_args(tiny, tmp_path / "pruned.json", "--enable_pruning",
                                        "--k_anchors", "4", "--top_m", "20", "--alpha", "0.3",
                                        "--score_norm", "minmax"), capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "pruned.json").read_text())
    theirs = unpruned[0]
    assert {k: result[k] for k in theirs if k != "metrics"} == \
        {k: v for k, v in theirs.items() if k != "metrics"}
    assert result["metrics"].keys() == theirs["metrics"].keys()
    assert result["pruning"] == {"enabled": True, "applied": True, "k_anchors": 4, "top_m": 20,
                                 "alpha": 0.3, "score_norm": "minmax", "layer": -1,
                                 "backend": "auto", "selection": "score", "mmr_lambda": 0.8,
                                 "schedule": [], "block": 1, "num_blocks": 2,
                                 "backend_used": "reference"}
    assert (result["tokens_before"], result["tokens_after"]) == (65, 25)
    assert result["throughput"]["images_per_second"] > 0
    # CLIP_benchmark's evaluation really ran the pruned block: 4 batches of 8, 6 left over.
    assert kept == [(8, 25, 64)] * 3 + [(6, 25, 64)]
    assert "65 -> 25 tokens" in err
    # Prose counts blocks from 1, the JSON's "block" is the 0-based index: both said.
    assert "pruned at block 2 of 2 (index 1)" in err
    # No --no_amp on a CPU without native bfloat16: one line says that autocast is on and how
    # to turn it off.
    assert len([line for line in err.splitlines() if "--no_amp" in line]) == 1


@pytest.mark.parametrize("selection", ["mmr", "cls"])
def test_eval_other_selections_reach_the_block_and_the_json(tiny, tmp_path, capsys, monkeypatch,
                                                            selection):
    seen = []
    forward = PrunedResidualAttentionBlock.forward

    def spy(self, *args, **kwargs):
        seen.append(self.config)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(PrunedResidualAttentionBlock, "forward", spy)
    status, _, err = run_main(eval_args(tiny, tmp_path / "out.json", "--enable_pruning",
                                        "--k_anchors", "3", "--top_m", "9", "--layer", "0",
                                        "--selection", selection, "--mmr_lambda", "0.25"),
                              capsys)
    assert status == 0, err
    pruning = json.loads((tmp_path / "out.json").read_text())["pruning"]
    assert (pruning["selection"], pruning["mmr_lambda"]) == (selection, 0.25)
    assert seen and all((c.selection, c.mmr_lambda, c.kept_patches) == (selection, 0.25, 12)
                        for c in seen)


def test_eval_schedule_prunes_at_each_stage_and_the_json_says_so(tiny, tmp_path, capsys,
                                                                 monkeypatch):
    seen = []
    forward = PrunedResidualAttentionBlock.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append((self.stage, tuple(out.shape[1:])))
        return out
    monkeypatch.setattr(PrunedResidualAttentionBlock, "forward", spy)
    status, _, err = run_main(eval_args(tiny, tmp_path / "out.json", "--enable_pruning",
                                        "--schedule", "0:4:20,-1:2:6"), capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["pruning"]["schedule"] == [[0, 4, 20], [-1, 2, 6]]
    assert (result["tokens_before"], result["tokens_after"]) == (65, 9)
    assert "(pruned at blocks 1, 2 of 2 (a schedule))" in err and "65 -> 9 tokens" in err
    # Block 0 keeps CLS + 24 of the 64 patches, block 1 CLS + 8 of those 24.
    assert set(seen) == {(0, (25, 64)), (1, (9, 64))}


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "0:4"], "argument --schedule: must be stages LAYER:K_ANCHORS:TOP_M separated "
                            "by commas, e.g. 3:4:20,6:2:10, got '0:4'"),
    (["--schedule", "1:4:20,0:2:6"], "--schedule blocks must be strictly increasing, got stage 1 "
                                     "at block 1 and stage 2 at block 0"),
    (["--schedule", "0:4:20,1:2:30"], "--schedule stage 2 must keep fewer patches than the 24 "
                                      "that stage 1 keeps"),
    (["--schedule", "0:4:20,1:2:6", "--top_m", "6"], "--schedule gives every stage's block and "
                                                     "counts: leave out --top_m 6"),
])
def test_eval_bad_schedules_are_refused_before_loading(tiny, tmp_path, capsys, no_loading, flags,
                                                       message):
    status, _, err = run_main(eval_args(tiny, tmp_path / "out.json", "--enable_pruning", *flags),
                              capsys)
    assert status != 0 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, required", [
    ("generate", ["--model", "m", "--image", "a.png", "--prompt", "p"])])
def test_commands_without_a_schedule_say_which_takes_it(capsys, command, required):
    status, _, err = run_main([command, *required, "--schedule", "0:4:20,1:2:6"], capsys)
    assert status == 2
    assert (f"tokenprune {command}: error: unrecognized arguments: --schedule 0:4:20,1:2:6; "
            f"tokenprune {command} takes no schedule yet (one pruned block, --layer); "
            "`tokenprune eval` takes --schedule") in err


def test_eval_schedule_outside_the_tower_is_one_line(tiny, tmp_path, capsys):
    status, _, err = run_main(eval_args(tiny, tmp_path / "out.json", "--enable_pruning",
                                        "--schedule", "0:4:20,2:2:6"), capsys)
    assert status == 1
    assert "--schedule stage 2 layer must be in [-2, 1] for this 2-block tower, got 2" in err


def test_visualize_other_selections_say_what_kept_the_patches(tiny, tmp_path, capsys):
    for selection, line in (("cls", "CLS + 24 kept by CLS attention"),
                            ("mmr", "CLS + 4 anchors + 20 kept by MMR"),
                            ("random", "CLS + 24 kept by chance")):
        status, stdout, err = run_main(visualize_args(tiny, tmp_path, "--pretrained",
                                                      tiny["checkpoint"], "--selection",
                                                      selection), capsys)
        assert status == 0, err
        assert f"65 -> 25 tokens at block 2 of 2 (index 1): {line}; 40 pruned" in stdout


def test_eval_noop_warns_and_runs_unpruned(tiny, unpruned, tmp_path, capsys):
    # 10 + 60 >= 64 patches: like the seed's defaults on ViT-B-32 at 224 px (49 patches).
    status, _, err = run_main(eval_args(tiny, tmp_path / "noop.json", "--enable_pruning",
                                        "--top_m", "60"), capsys)
    assert status == 0, err
    assert "warning: k_anchors + top_m = 70 >= 64 patches" in err and "unpruned" in err
    result = json.loads((tmp_path / "noop.json").read_text())
    assert result["pruning"]["enabled"] and not result["pruning"]["applied"]
    assert result["tokens_before"] == result["tokens_after"] == 65
    assert result["metrics"] == unpruned[1]["metrics"]


@pytest.mark.parametrize("extra, message", [
    (["--model", "NoSuchNet"], "unknown model 'NoSuchNet'"),
    (["--model", "ViT-B-32", "--pretrained", "openai"], "--pretrained /path/to/"),
    (["--model", "ViT-B-32", "--pretrained", "no_such_tag"], "unknown pretrained tag"),
    (["--model", "RN50", "--pretrained", "openai", "--enable_pruning"], "ResNet image tower"),
    (["--dataset", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--dataset", "wds/missing", "--dataset_root", "/nonexistent/wds"],
     "--dataset wds/missing: no folder /nonexistent/wds (--dataset_root /nonexistent/wds)"),
    (["--dataset", "wds/missing"], "(no --dataset_root given, so CLIP_benchmark's default, the "
                                   "folder 'root' here)"),
    (["--enable_pruning", "--alpha", "1.5"], "--alpha must be a finite number in [0, 1]"),
    (["--enable_pruning", "--k_anchors", "0"], "--k_anchors must be an integer >= 1"),
    (["--enable_pruning", "--top_m", "-1"], "--top_m must be an integer >= 0"),
    (["--enable_pruning", "--layer", "5"], "--layer must be in [-2, 1]"),
    (["--enable_pruning", "--k_anchors", "ten"], "invalid int value: 'ten'"),
    (["--enable_pruning", "--score_norm", "zscore"], "invalid choice: 'zscore'"),
    (["--enable-pruning", "--top-m", "-1"], "--top_m must be an integer >= 0"),
    (["--enable_pruning", "--alhpa", "0.3"], "did you mean --alpha instead of --alhpa?"),
    (["--dataset-rot", "x"], "did you mean --dataset_root instead of --dataset-rot?"),
])
def test_eval_bad_input_is_one_line(tiny, tmp_path, capsys, extra, message):
    argv = eval_args(tiny, tmp_path / "out.json")
    if "--model" in extra:  # these need no checkpoint: replace the tiny model's pair
        i = argv.index("--model")
        del argv[i:i + 4]
    if "--dataset" in extra:
        i = argv.index("--dataset")
        del argv[i:i + 4]
    status, _, err = run_main(argv + extra + ["--model_cache_dir", str(tmp_path / "cache")],
                              capsys)
    assert status not in (0, None)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("tokenprune"), err
    assert message in errors[0]
    assert not (tmp_path / "out.json").exists()


def test_python_m_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tokenprune.cli", "eval", "--enable_pruning",
                           "--alpha", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("tokenprune: error: --alpha must be a finite number in "
                                   "[0, 1], got 2.0")


def test_visualize_draws_kept_and_pruned_patches(tiny, tmp_path, capsys):
    rng = np.random.default_rng(1)
    image = tmp_path / "in.png"  # not square: OpenCLIP resizes and crops it to 32 x 32
    Image.fromarray(rng.integers(90, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "figures" / "kept.png"
    status, stdout, err = run_main(["visualize", "--image", str(image), "--model", TINY,
                                    "--pretrained", tiny["checkpoint"], "--k_anchors", "4",
                                    "--top_m", "20", "--out", str(out)], capsys)
    assert status == 0, err
    assert "65 -> 25 tokens" in stdout and str(out) in stdout

    figure = np.asarray(Image.open(out).convert("RGB")).astype(float)
    geo = visualize.layout(32, 32)
    assert figure.shape == (geo["size"][1], geo["size"][0], 3)
    step = 4 * geo["scale"]  # one patch on screen
    inner = slice(4, step - 4)  # the patch without its outline
    kinds = {"pruned": 0, "kept": 0}
    edges = {"anchor": 0, "kept": 0}
    for row in range(8):
        for col in range(8):
            def patch(box):
                y, x = box[1] + row * step, box[0] + col * step
                return figure[y:y + step, x:x + step]
            before, after = patch(geo["original"]), patch(geo["kept"])
            ratio = after[inner, inner].mean() / before[inner, inner].mean()
            if ratio < 0.5:
                kinds["pruned"] += 1
                gray = before.mean(axis=2, keepdims=True)
                dimmed = ((1 - visualize.DESATURATE) * before + visualize.DESATURATE * gray)
                np.testing.assert_allclose(after, dimmed * visualize.DIM, atol=0.51)
            else:
                assert ratio == pytest.approx(1.0)
                kinds["kept"] += 1
                corner = tuple(after[0, 0].astype(int))
                edges["anchor" if corner == visualize.ANCHOR_RGB else "kept"] += 1
                assert corner in (visualize.ANCHOR_RGB, visualize.KEPT_RGB)
    assert kinds == {"pruned": 64 - 24, "kept": 24}
    assert edges == {"anchor": 4, "kept": 20}


def test_visualize_runs_with_no_arguments_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    """The demo: score (the seed's default), cls and mmr side by side on one held-out canvas,
    each with its prediction; the caption says why score keeps background."""
    monkeypatch.chdir(tmp_path)
    drawn = []
    render_panels = visualize.render_panels
    monkeypatch.setattr(visualize, "render_panels",
                        lambda *args: drawn.append(args) or render_panels(*args))
    status, stdout, err = run_main(["visualize"], capsys)
    assert status == 0, err
    assert "random weights" not in err
    assert stdout.startswith("model: a small ViT (4 blocks, width 128, 8x8 patches of 16 px) "
                             "trained on scikit-learn's digits")
    assert ("shipped ViT: 65 -> 17 tokens at block 4 of 4 (index 3), on held-out canvas #0 (a 4)"
            in stdout)
    lines = stdout.splitlines()
    assert lines[2].startswith("  score (default, alpha 0.5): CLS + 4 anchors + 12 kept by score")
    assert lines[3].startswith("  cls: CLS + 16 kept by CLS attention")
    assert lines[4].startswith("  mmr (lambda 0.8): CLS + 4 anchors + 12 kept by MMR")
    assert all(line.split("; prediction ")[1] == "4" for line in lines[2:5])
    (_, _, panels, _, _, _, caption, _), = drawn
    assert [p.heading.split("\n")[0] for p in panels] == ["score (default, alpha 0.5)", "cls",
                                                          "mmr (lambda 0.8)"]
    assert all(p.heading.endswith("predicts 4 (right)") and len(p.keep) == 16 for p in panels)
    assert panels[0].keep != panels[1].keep  # three selections, not one drawn three times
    assert "diversity" in " ".join(caption) and "background" in caption[0]
    geo = visualize.layout(128, 128, 3, visualize.COMPARE_PANEL, True, len(caption))
    assert Image.open(tmp_path / "kept.png").size == geo["size"]


def test_visualize_shipped_model_with_a_selection_draws_that_one(tmp_path, capsys):
    out = tmp_path / "kept.png"
    status, stdout, err = run_main(["visualize", "--selection", "cls", "--out", str(out)], capsys)
    assert status == 0, err
    assert "shipped ViT: 65 -> 17 tokens at block 4 of 4 (index 3): CLS + 16 kept by CLS" in stdout
    assert Image.open(out).size == visualize.layout(128, 128)["size"]


def test_visualize_model_vit_b_16_keeps_the_random_weight_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, err = run_main(["visualize", "--model", "ViT-B-16"], capsys)
    assert status == 0, err
    assert "random weights" in err and "--pretrained openai" in err
    assert "ViT-B-16: 197 -> 61 tokens" in stdout and "kept.png" in stdout
    geo = visualize.layout(224, 224)
    assert Image.open(tmp_path / "kept.png").size == geo["size"]


# ----- a fast start: what must not import torch, open_clip or clip_benchmark ----------------

FAST_CHECK = r"""
import json, sys
from tokenprune.cli import main
argv = json.loads(sys.argv[1])
try:
    status = main(argv)
except SystemExit as exc:
    status = exc.code
heavy = sorted(m for m in ("torch", "open_clip", "clip_benchmark") if m in sys.modules)
print(json.dumps({"status": status, "heavy": heavy}))
"""


def write_results(path, metrics, **fields):
    path.write_text(json.dumps({"dataset": "wds/toy", "model": "ViT-B-16", "pretrained": "x.pt",
                                "task": "zeroshot_classification", "metrics": metrics,
                                "language": "en", **fields}))
    return str(path)


@pytest.mark.parametrize("argv, status, message", [
    ([], 0, "visualize"),
    (["--help"], 0, "visualize"),
    (["visualize", "--help"], 0, "--k_anchors"),
    (["build", "--help"], 0, "--output"),
    (["eval", "--alpha", "2"], 1, "--alpha must be a finite number in [0, 1], got 2.0"),
    (["eval", "--enable-pruning", "--k-anchors", "0"], 1, "--k_anchors must be an integer >= 1"),
    (["visualize", "--layer", "x"], 2, "argument --layer: invalid int value: 'x'"),
    (["visualize", "--top_m", "-3"], 1, "--top_m must be an integer >= 0, got -3"),
    (["eval", "--dataset", "cifar10", "--enable_pruning", "--alhpa", "0.3"], 2,
     "did you mean --alpha instead of --alhpa?"),
    (["visualize", "--enable-pruning"], 2, "tokenprune visualize always prunes"),
    (["build", "a.json", "b.json", "--output", "out.csv"], 0, "wrote out.csv (2 rows)"),
    (["sweep", "--help"], 0, "--controls"),
    (["sweep", "--help"], 0, "--mmr_lambda"),
    (["visualize", "--help"], 0, "--selection {score,cls,mmr,random}"),
    (["eval", "--selection", "fastervlm"], 2,
     "argument --selection: invalid choice: 'fastervlm'"),
    (["eval", "--enable_pruning", "--selection", "mmr", "--mmr_lambda", "1.5"], 1,
     "--mmr_lambda must be a finite number in [0, 1], got 1.5"),
    (["visualize", "--mmr-lambda", "-1"], 1, "--mmr_lambda must be a finite number in [0, 1]"),
    (["sweep", "--output_dir", "o", "--selection", "score", "cls", "best"], 1,
     "--selection must be one of 'score', 'cls', 'mmr', 'random', got 'best'"),
    (["sweep", "--output_dir", "o", "--alpha", "0.5", "1.5"], 1,
     "--alpha must be a finite number in [0, 1], got 1.5"),
    ([], 0, "generate"),
    (["generate", "--help"], 0, "--compare"),
    (["generate", "--model", "m", "--image", "x.png", "--prompt", "p", "--alpha", "2"], 1,
     "--alpha must be a finite number in [0, 1], got 2.0"),
    (["generate", "--model", "./m", "--image", "missing.png", "--prompt", "p"], 1,
     "--image missing.png: no such file"),
])
def test_fast_paths_import_no_torch(tmp_path, argv, status, message):
    """`--help`, bad pruning values, misspelled flags and `build` are answered without importing
    torch, open_clip or clip_benchmark (importing those took 10-35 s on a 2-core machine)."""
    if argv[:1] == ["build"]:
        write_results(tmp_path / "a.json", {"acc1": 0.5})
        write_results(tmp_path / "b.json", {"acc1": 0.25})
    proc = subprocess.run([sys.executable, "-c", FAST_CHECK, json.dumps(argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": status, "heavy": []}, proc.stderr
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_writes_nested_fields_as_json_and_nan_as_empty(tmp_path, capsys):
    # A file of the old kind, with a bare NaN (Python's json reads it), and one with null.
    (tmp_path / "old.json").write_text(
        '{"dataset": "wds/toy", "model": "ViT-B-16", "pretrained": "x.pt", "metrics": '
        '{"acc1": 0.5, "acc5": NaN}, "pruning": {"enabled": false}, "throughput": null}')
    new = write_results(tmp_path / "new.json", {"acc1": 0.25, "acc5": None},
                        pruning={"enabled": True, "k_anchors": 4, "alpha": 0.5},
                        throughput={"images_per_second": 12.5, "amp": False})
    out = tmp_path / "results.csv"
    status, stdout, err = run_main(["build", str(tmp_path / "old.json"), new, "--output",
                                    str(out)], capsys)
    assert status == 0, err
    import csv
    rows = list(csv.DictReader(out.open()))
    assert [row["acc1"] for row in rows] == ["0.5", "0.25"]
    assert [row["acc5"] for row in rows] == ["", ""]
    assert [json.loads(row["pruning"]) for row in rows] == \
        [{"enabled": False}, {"enabled": True, "k_anchors": 4, "alpha": 0.5}]
    assert json.loads(rows[1]["throughput"]) == {"images_per_second": 12.5, "amp": False}
    assert rows[0]["model_fullname"] == "ViT-B-16 x.pt"


# ----- loading: classified by what failed ---------------------------------------------------

def visualize_args(tiny, tmp_path, *extra):
    return ["visualize", "--model", TINY, "--out", str(tmp_path / "kept.png"), "--k_anchors", "4",
            "--top_m", "20", *extra]


def test_device_without_cuda_is_said_before_loading(tiny, tmp_path, capsys, monkeypatch):
    """Not "could not download": torch's no-driver error used to be read as a download one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *args, **kwargs: loads.append(args))
    status, _, err = run_main(visualize_args(tiny, tmp_path, "--pretrained", tiny["checkpoint"],
                                             "--device", "cuda"), capsys)
    assert status == 1
    assert err.strip().splitlines()[-1] == (
        "tokenprune: error: --device cuda: no CUDA device is available on this machine "
        "(torch.cuda.is_available() is False); use --device cpu")
    assert loads == []  # checked before anything was loaded
    status, _, err = run_main(visualize_args(tiny, tmp_path, "--device", "gpu0"), capsys)
    assert status == 1 and "--device gpu0: not a torch device" in err


@pytest.mark.parametrize("command", ["visualize", "eval"])
def test_corrupt_checkpoint_names_the_file(tiny, tmp_path, capsys, command):
    if command == "visualize":
        argv = visualize_args(tiny, tmp_path, "--pretrained", tiny["corrupt"])
    else:
        argv = eval_args(tiny, tmp_path / "out.json")[:-1]  # without --quiet
    if command == "eval":
        argv[argv.index(tiny["checkpoint"])] = tiny["corrupt"]
    status, _, err = run_main(argv, capsys)
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tokenprune: error: --pretrained {tiny['corrupt']}: not a readable "
                           "checkpoint file (")
    assert "Traceback" not in err


def test_checkpoint_of_another_architecture_says_what_does_not_fit(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    argv = visualize_args(tiny, tmp_path, "--pretrained", tiny["other"])
    status, _, err = run_main(argv, capsys)
    assert status == 1
    last = err.strip().splitlines()[-1]
    # OTHER has one block of 8 px patches: block 1's weights are missing, conv1 is 8 x 8.
    block_keys = [k for k in open_clip.create_model(TINY).state_dict()
                  if k.startswith("visual.transformer.resblocks.1.")]
    assert f"--pretrained {tiny['other']} does not fit --model {TINY}: " in last
    assert f"{len(block_keys)} missing, 0 unexpected and 1 wrong-shape weights (missing: " \
        "visual.transformer.resblocks.1." in last
    assert f"and {len(block_keys) - 3} more; wrong shape: visual.conv1.weight is [64, 3, 8, 8] " \
        "in the file, [64, 3, 4, 4] in the model)" in last
    assert "checkpoint of another architecture" in last
    assert "Traceback" not in err

    # TOKENPRUNE_DEBUG=1: the original error's full traceback, then the same line.
    monkeypatch.setenv("TOKENPRUNE_DEBUG", "1")
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert "Traceback" in err and "Error(s) in loading state_dict for CLIP" in err
    assert "size mismatch for visual.conv1.weight" in err
    assert err.strip().splitlines()[-1] == last


def test_debug_shows_the_traceback_of_every_translated_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOKENPRUNE_DEBUG", "1")
    status, _, err = run_main(["visualize", "--alpha", "1.5"], capsys)
    assert status == 1
    assert "Traceback" in err and "ValueError: alpha must be a finite number" in err
    assert err.strip().splitlines()[-1].startswith("tokenprune: error: --alpha must be")


# ----- eval output: JSON, warnings, progress ------------------------------------------------

def test_eval_json_is_strict_and_the_run_quiet(tiny, tmp_path, capsys):
    """Four classes: acc5 (NaN in CLIP_benchmark) is null. Known-harmless third-party warnings
    are hidden unless --verbose; the WebDataset progress bar has a total."""
    def run(*extra):
        out = tmp_path / f"four{len(extra)}.json"
        argv = eval_args(tiny, out, "--no_amp", "--enable_pruning", "--k_anchors", "4",
                         "--top_m", "20", *extra)
        argv[argv.index(tiny["data"])] = tiny["data4"]
        argv[argv.index("--batch_size") + 1] = "4"
        argv.remove("--quiet")  # CLIP_benchmark's verbose output, its classification report
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)  # as Python's default filters
            status, stdout, err = run_main(argv, capsys)
        assert status == 0, err
        return out.read_text(), stdout, err, [f"{w.category.__name__}: {w.message}"
                                              for w in caught]

    text, stdout, err, shown = run()
    result = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert result["metrics"]["acc5"] is None and 0 <= result["metrics"]["acc1"] <= 1
    assert "acc5 n/a" in err
    assert shown == [] and "Warning" not in err, shown
    assert "--no_amp" not in err  # given: no note
    assert "Dataset size: 9" in stdout and "IterableDataset has no len()" not in stdout
    assert "3/3" in err  # three batches of 4, 4, 1 images: the bar knows its total
    *_, shown = run("--verbose")
    assert any("shardshuffle" in w for w in shown), shown
    assert any(w.startswith("UndefinedMetricWarning") for w in shown), shown


# ----- visualize ----------------------------------------------------------------------------

def test_visualize_says_what_it_does_and_counts_blocks_from_one(tiny, tmp_path, capsys):
    status, stdout, err = run_main(visualize_args(tiny, tmp_path, "--pretrained",
                                                  tiny["checkpoint"], "--top-m", "10"), capsys)
    assert status == 0, err
    steps = [line for line in err.splitlines() if line.endswith("...")]
    assert [line.split()[1] for line in steps] == ["loading", "running", "drawing"]
    assert "65 -> 15 tokens at block 2 of 2 (index 1)" in stdout


def test_visualize_with_nothing_to_prune_says_so(tiny, tmp_path, capsys, monkeypatch):
    titles = []
    render = visualize.render
    monkeypatch.setattr(visualize, "render",
                        lambda *args: titles.append(args[4]) or render(*args))
    status, stdout, err = run_main(visualize_args(tiny, tmp_path, "--k_anchors", "60",
                                                  "--top_m", "10"), capsys)
    assert status == 0, err
    assert "nothing pruned" in titles[0] and "block" not in titles[0]
    assert f"{TINY}: nothing pruned, all 65 tokens kept" in stdout


def test_visualize_random_weights_are_seeded(tiny, tmp_path, capsys):
    pictures = []
    for run in range(2):
        out = tmp_path / f"kept{run}.png"
        status, _, err = run_main(["visualize", "--model", TINY, "--out", str(out),
                                   "--k_anchors", "4", "--top_m", "20"], capsys)
        assert status == 0, err
        assert "seeded: the same picture every run" in err
        pictures.append(out.read_bytes())
    assert pictures[0] == pictures[1]


def test_visualize_on_a_resnet_names_its_own_flag(tmp_path, capsys):
    status, _, err = run_main(["visualize", "--model", "RN50", "--out",
                               str(tmp_path / "x.png")], capsys)
    assert status == 1
    assert err.strip().splitlines()[-1].startswith(
        "tokenprune: error: --model RN50: RN50 has a ResNet image tower, which cannot be pruned")
    assert "--enable_pruning" not in err


def test_another_clip_benchmark_version_leaves_unknown_flags_to_its_parser(capsys, monkeypatch):
    """With a clip-benchmark other than the copied one, a flag our copy does not know may be
    new: CLIP_benchmark's own parser judges it (still one line)."""
    monkeypatch.setattr(clip_benchmark_flags, "VERSION", "0.0")
    status, _, err = run_main(["eval", "--enable_pruning", "--alhpa", "0.3"], capsys)
    assert status == 2
    assert err.strip() == ("tokenprune: error: unrecognized arguments: --alhpa 0.3 (see "
                           "`tokenprune --help`)")


def test_no_library_module_imports_the_command_line():
    """The library (tokenprune/*.py, tokenprune/towers/) never imports tokenprune.cli: the
    commands sit on the library, so deleting a command module breaks no library import. Within
    tokenprune/cli/, no command module imports the package's __init__ (main) back."""
    import ast
    import tokenprune
    package = os.path.dirname(tokenprune.__file__)
    importers = []
    for folder, _, files in os.walk(package):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, package)
            in_cli = rel.startswith("cli" + os.sep)
            if not name.endswith(".py") or name == "__main__.py" or rel == os.path.join(
                    "cli", "__init__.py"):
                continue
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if in_cli:  # `from . import common` is a sibling; `from . import main` is not
                        bad = module == "tokenprune.cli" or (node.level == 1 and not module and any(
                            not os.path.exists(os.path.join(folder, a.name + ".py"))
                            for a in node.names))
                    else:
                        bad = (module.startswith("tokenprune.cli")
                               or (node.level == 1 and module.split(".")[0] == "cli")
                               or (node.level == 1 and not module
                                   and any(a.name == "cli" for a in node.names)))
                elif isinstance(node, ast.Import):
                    bad = not in_cli and any(a.name.startswith("tokenprune.cli") for a in node.names)
                else:
                    continue
                if bad:
                    importers.append(rel)
    assert importers == []
    assert os.path.exists(os.path.join(package, "cli", "sweep.py"))  # the walk saw the commands


def test_version_has_one_source(capsys):
    """`tokenprune --version`, tokenprune.__version__ and the installed metadata agree."""
    from importlib.metadata import version
    import tokenprune
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokenprune {tokenprune.__version__}"
    assert version("tokenprune") == tokenprune.__version__
