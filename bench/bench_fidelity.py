"""Accuracy retention of the shipped small ViT (bench/fidelity.py), a small version: the first
250 held-out canvases, the three budgets at both blocks, alpha 0.5, two random seeds; under
TOKENPRUNE_BENCH_SMOKE=1, 16 canvases and one budget at the middle block. The time is that of
the whole evaluation; the accuracies and recalls go into `extra_info` (kind `fidelity`, which
report.py leaves out of RESULTS.md). The full run is `python bench/fidelity.py`.
"""
import importlib.util
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tokenprune_bench_fidelity", HERE / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)

SMALL = dict(n=250, batch=250, budgets=fidelity.BUDGETS, alphas=(0.5,), score_norms=("none",),
             layers=fidelity.LAYERS, seeds=(0, 1))
SMOKE = dict(n=16, batch=8, budgets=((4, 12),), alphas=(0.5,), score_norms=("none",),
             layers=(1,), seeds=(0,))


def test_fidelity(env, benchmark, tmp_path):
    settings = SMOKE if env.smoke else SMALL
    result = {}

    def run():
        result["meta"], result["rows"] = fidelity.run(**settings)

    benchmark.group = f"fidelity, shipped small ViT, {settings['n']} canvases"
    benchmark.pedantic(run, rounds=1, iterations=1)  # minutes: one round is the measurement
    meta, rows = result["meta"], result["rows"]
    budgets = len(settings["budgets"]) * len(settings["layers"])
    assert len(rows) == 1 + budgets * (len(settings["alphas"]) * len(settings["score_norms"])
                                       + 1 + len(settings["seeds"]))
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 for r in rows)
    fidelity.write(meta, rows, tmp_path / "fidelity.md", tmp_path / "fidelity.png",
                   tmp_path / "fidelity.json")
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    benchmark.extra_info.update(
        kind="fidelity", device="cpu", torch_threads=torch.get_num_threads(),
        images=meta["images"], rows=rows)
