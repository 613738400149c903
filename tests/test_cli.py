"""The command line: `tokenprune eval` against CLIP_benchmark's own eval, its JSON, its errors,
and `tokenprune visualize`. Offline: a tiny random-weight OpenCLIP ViT saved as a checkpoint and a
tiny WebDataset, both made here."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tokenprune import visualize  # noqa: E402
from tokenprune.block import PrunedResidualAttentionBlock  # noqa: E402
from tokenprune.cli import build_parser, main  # noqa: E402
from tokenprune.evaluate import accuracy  # noqa: E402

from helpers import TINY, make_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No download attempts, whatever imported huggingface_hub before HF_HUB_OFFLINE was set."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registered tiny architecture, its checkpoint, and a 30-image WebDataset."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def eval_args(tiny, output, *extra):
    return ["eval", "--dataset", "wds/tiny", "--dataset_root", tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0",
            "--output", str(output), "--quiet", *extra]


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of an in-process `tokenprune ...`."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


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
            # give it the same workaround tokenprune eval uses (see tokenprune/evaluate.py).
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
    ours = build_parser().parse_args(seed_command + ["--score_norm", "minmax", "--layer", "-2"])
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *seed_command[:7]])
    _, theirs = cb_cli.get_parser_args()
    assert vars(theirs).items() <= vars(ours).items()  # every CLIP_benchmark flag, same value
    assert (ours.enable_pruning, ours.k_anchors, ours.top_m, ours.alpha) == (True, 5, 30, 0.6)
    assert (ours.score_norm, ours.layer, ours.backend) == ("minmax", -2, "auto")
    defaults = build_parser().parse_args(["eval"])
    assert (defaults.enable_pruning, defaults.k_anchors, defaults.top_m, defaults.alpha) == \
        (False, 10, 50, 0.5)


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
                                 "backend": "auto", "block": 1, "num_blocks": 2,
                                 "backend_used": "reference"}
    assert (result["tokens_before"], result["tokens_after"]) == (65, 25)
    assert result["throughput"]["images_per_second"] > 0
    # CLIP_benchmark's evaluation really ran the pruned block: 4 batches of 8, 6 left over.
    assert kept == [(8, 25, 64)] * 3 + [(6, 25, 64)]
    assert "65 -> 25 tokens" in err


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
     "could not load dataset 'wds/missing'"),
    (["--enable_pruning", "--alpha", "1.5"], "--alpha must be a finite number in [0, 1]"),
    (["--enable_pruning", "--k_anchors", "0"], "--k_anchors must be an integer >= 1"),
    (["--enable_pruning", "--top_m", "-1"], "--top_m must be an integer >= 0"),
    (["--enable_pruning", "--layer", "5"], "--layer must be in [-2, 1]"),
    (["--enable_pruning", "--k_anchors", "ten"], "invalid int value: 'ten'"),
    (["--enable_pruning", "--score_norm", "zscore"], "invalid choice: 'zscore'"),
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


def test_visualize_runs_with_no_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, err = run_main(["visualize"], capsys)
    assert status == 0, err
    assert "random weights" in err and "--pretrained openai" in err
    assert "ViT-B-16: 197 -> 61 tokens" in stdout and "kept.png" in stdout
    geo = visualize.layout(224, 224)
    assert Image.open(tmp_path / "kept.png").size == geo["size"]
