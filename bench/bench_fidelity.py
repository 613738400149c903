"""Accuracy retention of the shipped small ViTs (bench/fidelity.py), a small version: the first
250 held-out canvases of each regime, the three budgets at both blocks, alpha 0.5, mmr lambda
0.5, two random seeds; under TOKENPRUNE_BENCH_SMOKE=1, 16 canvases and one budget at the middle
block. The time is that of the whole evaluation of both regimes; the accuracies and recalls go
into `extra_info` (kind `fidelity`, which report.py leaves out of RESULTS.md). The full run is
`python bench/fidelity.py`.
"""
import importlib.util
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tokenprune_bench_fidelity", HERE / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)

SMALL = dict(n=250, batch=250, budgets=fidelity.BUDGETS, alphas=(0.5,), score_norms=("none",),
             mmr_lambdas=(0.5,), layers=fidelity.LAYERS, seeds=(0, 1))
SMOKE = dict(n=16, batch=8, budgets=((4, 12),), alphas=(0.5,), score_norms=("none",),
             mmr_lambdas=(0.5,), layers=(1,), seeds=(0,))
REGIMES = ("small", "large")


def test_fidelity(env, benchmark, tmp_path):
    settings = SMOKE if env.smoke else SMALL
    result = {}

    def run():
        result["results"] = [fidelity.run(regime, **settings) for regime in REGIMES]

    benchmark.group = f"fidelity, shipped small ViTs, {settings['n']} canvases per regime"
    benchmark.pedantic(run, rounds=1, iterations=1)  # minutes: one round is the measurement
    results = result["results"]
    budgets = len(settings["budgets"]) * len(settings["layers"])
    for meta, rows in results:
        assert len(rows) == 1 + budgets * (len(settings["alphas"]) * len(settings["score_norms"])
                                           + len(settings["mmr_lambdas"]) + 1
                                           + len(settings["seeds"]))
        assert all(0.0 <= r[key] <= 1.0 for r in rows for key in fidelity.KEYS)
    fidelity.write(results, tmp_path / "fidelity.md", tmp_path / "fidelity.png",
                   tmp_path / "fidelity.json")
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    benchmark.extra_info.update(
        kind="fidelity", device="cpu", torch_threads=torch.get_num_threads(),
        images=settings["n"], regimes={meta["regime"]: rows for meta, rows in results})
