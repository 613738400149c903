"""`tokenprune eval` and `tokenprune sweep` on the shipped ViTs and their held-out canvases
(tokenprune:proxy-vit-large on tokenprune:digits-large): their top-1 is the head's own argmax,
pruned and unpruned, as bench/fidelity.py computes it; mismatched combinations are refused
before anything loads. The first CANVASES held-out canvases keep the test fast."""
import functools
import json

import pytest
import torch

from tokenprune import PruneConfig, replace_last_block
from tokenprune.cli import shipped
from tokenprune.proxy import heldout_set, load_proxy_model, preprocess

from helpers import run_main

CANVASES = 192
BATCH = 64
MODEL, DATASET = "tokenprune:proxy-vit-large", "tokenprune:digits-large"
PRUNING = {"k_anchors": 4, "top_m": 12, "layer": 1}  # 16 of 64 patches at the middle block


@pytest.fixture
def few_canvases(monkeypatch):
    monkeypatch.setattr(shipped, "build_shipped_dataset",
                        functools.partial(shipped.build_shipped_dataset, count=CANVASES))


@pytest.fixture(scope="module")
def direct():
    """The head's top-1 on the first CANVASES canvases, computed directly as bench/fidelity.py
    does (float32, argmax of the logits): {"unpruned": ..., "pruned": ...}."""
    model, card = load_proxy_model("large")
    images, labels, _ = heldout_set(CANVASES, card)
    pixels = preprocess()(images)

    @torch.no_grad()
    def top1():
        predicted = torch.cat([model(pixels[i:i + BATCH]).argmax(-1)
                               for i in range(0, CANVASES, BATCH)])
        return (predicted == labels).sum().item() / CANVASES

    unpruned = top1()
    replace_last_block(model, config=PruneConfig(**PRUNING))
    return {"unpruned": unpruned, "pruned": top1()}


def pruning_flags():
    return [f for name, value in PRUNING.items() for f in (f"--{name}", str(value))]


def eval_acc1(tmp_path, capsys, *extra):
    out = tmp_path / "out.json"
    status, _, err = run_main(["eval", "--model", MODEL, "--dataset", DATASET, "--no_amp",
                               "--quiet", "--num_workers", "0", "--batch_size", str(BATCH),
                               "--output", str(out), *extra], capsys)
    assert status == 0, err
    return json.loads(out.read_text())


def test_eval_top1_is_the_heads_argmax_with_and_without_pruning(tmp_path, capsys, direct,
                                                                few_canvases):
    assert direct["pruned"] != direct["unpruned"]  # else the pruned run would prove nothing
    unpruned = eval_acc1(tmp_path, capsys)
    assert unpruned["metrics"]["acc1"] == direct["unpruned"]
    assert unpruned["pretrained"] == "shipped" and unpruned["tokens_after"] == 65
    pruned = eval_acc1(tmp_path, capsys, "--enable_pruning", *pruning_flags())
    assert pruned["metrics"]["acc1"] == direct["pruned"]
    assert pruned["tokens_after"] == 17 and pruned["pruning"]["block"] == 1


def test_sweep_rows_are_the_heads_argmax(tmp_path, capsys, direct, few_canvases):
    out = tmp_path / "sweep"
    status, _, err = run_main(["sweep", "--model", MODEL, "--dataset", DATASET, "--no_amp",
                               "--quiet", "--num_workers", "0", "--batch_size", str(BATCH),
                               "--controls", "none", "--no_speed", "--alpha", "0.5",
                               *pruning_flags(), "--output_dir", str(out)], capsys)
    assert status == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["acc1"] for row in rows] == [direct["unpruned"], direct["pruned"]]


@pytest.fixture
def nothing_loads(no_loading, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a shipped model or dataset was loaded")
    monkeypatch.setattr(shipped, "load_shipped_model", refuse)
    monkeypatch.setattr(shipped, "build_shipped_dataset", refuse)


@pytest.mark.parametrize("command", ["eval", "sweep"])
@pytest.mark.parametrize("argv, message", [
    (["--model", MODEL, "--dataset", "cifar10"],
     "--dataset cifar10: the shipped models read only their digit canvases; use --dataset "
     "tokenprune:digits or tokenprune:digits-large"),
    (["--model", "ViT-B-16", "--pretrained", "openai", "--dataset", DATASET],
     f"--dataset {DATASET}: the shipped digit canvases are read by the shipped models only"),
    (["--model", MODEL, "--pretrained", "openai", "--dataset", DATASET],
     f"--pretrained openai: {MODEL} brings its own trained weights"),
    (["--model", "tokenprune:proxy-vit-larg", "--dataset", DATASET],
     "unknown model 'tokenprune:proxy-vit-larg': the shipped models are tokenprune:proxy-vit "
     "and tokenprune:proxy-vit-large. Did you mean tokenprune:proxy-vit-large?"),
    # issue 28: each shipped model reads the canvases of its own regime only
    (["--model", "tokenprune:proxy-vit", "--dataset", DATASET],
     f"--dataset {DATASET}: tokenprune:proxy-vit was trained on the small-digit canvases, "
     f"tokenprune:digits; {DATASET} holds the large-digit ones, which {MODEL} reads. Use "
     f"--dataset tokenprune:digits, or --model {MODEL}"),
    (["--model", MODEL, "--dataset", "tokenprune:digits"],
     f"--dataset tokenprune:digits: {MODEL} was trained on the large-digit canvases, {DATASET}"),
    (["--model", MODEL, "--dataset", "tokenprune:digit-large"],
     "unknown dataset 'tokenprune:digit-large': not a CLIP_benchmark or tokenprune dataset. Did "
     "you mean tokenprune:digits-large"),
])
def test_mismatched_combinations_are_refused_before_loading(tmp_path, capsys, nothing_loads,
                                                            command, argv, message):
    out = ["--output", str(tmp_path / "o.json")] if command == "eval" else \
        ["--output_dir", str(tmp_path / "o")]
    status, _, err = run_main([command, *argv, *out], capsys)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tokenprune: error: {message}"), err
