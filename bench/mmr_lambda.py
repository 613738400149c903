"""The evidence for mmr_lambda's default (SPEC.md, "mmr"): on both shipped small ViTs, the
accuracy of the seed's score and of mmr at several lambdas, each against the cls selection on
the same held-out canvases, as a paired difference with two standard errors.

    python bench/mmr_lambda.py            # 2000 canvases per regime, about 3 minutes each on
                                          # 2 CPU cores: one line per (regime, block, budget)
    python bench/mmr_lambda.py --n 500 --regimes large --lambdas 0.5 0.7

The settings are those of bench/fidelity.py (its budgets and blocks, the reference backend),
run through the sweep's engine. "+5.1 +- 2.0" is the mean over the canvases of (correct under
the method) - (correct under cls), in points, and twice its standard error: the two runs see the
same canvases, so the paired difference is the one to test.
"""
import argparse
import math

import torch

from tokenprune.proxy import heldout_set, load_proxy_model, preprocess
from tokenprune.sweep import GridEncoder, grid_points, tower_blocks, tower_patches

BUDGETS = ((2, 6), (4, 12), (8, 24))
LAYERS = (1, 3)  # the middle and the last of the models' 4 blocks
LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.9)
BATCH = 250


@torch.no_grad()
def paired(regime, n, lambdas):
    model, card = load_proxy_model(regime)
    images, labels, _ = heldout_set(n, card, regime)
    pixels = preprocess()(images)
    depth, patches = len(tower_blocks(model)), tower_patches(model)
    points = []
    for k, m in BUDGETS:
        for point in grid_points([k], [m], [0.5], ["none"], LAYERS, ["cls"], depth, patches,
                                 "reference", 0, selections=("score", "mmr"),
                                 mmr_lambdas=lambdas):
            if point.kind != "unpruned" and point not in points:
                points.append(point)
    encoder = GridEncoder(model, [point.config for point in points])
    right = [[] for _ in points]
    for start in range(0, n, BATCH):
        for i, out in enumerate(encoder(pixels[start:start + BATCH])):
            right[i].append((out.output.argmax(-1) == labels[start:start + BATCH]).float())
    right = [torch.cat(r) for r in right]
    lines = []
    for layer in LAYERS:
        for k, m in BUDGETS:
            here = {(p.kind, p.config.mmr_lambda if p.kind == "mmr" else None): r
                    for p, r in zip(points, right)
                    if p.config.layer == layer and p.config.kept_patches == k + m}
            cls = here.pop(("cls", None))
            line = f"{regime} block {layer} kept {k + m:2d}: cls {100 * cls.mean():.1f}"
            for (kind, lam), r in here.items():
                diff = r - cls
                two_se = 2 * diff.std() / math.sqrt(n)
                name = kind if lam is None else f"mmr {lam}"
                line += (f" | {name} {100 * r.mean():.1f} "
                         f"({100 * diff.mean():+.1f} +- {100 * two_se:.1f})")
            lines.append(line)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="held-out canvases per regime")
    parser.add_argument("--regimes", nargs="*", default=["large", "small"])
    parser.add_argument("--lambdas", nargs="*", type=float, default=list(LAMBDAS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for regime in args.regimes:
        for line in paired(regime, args.n, tuple(args.lambdas)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
