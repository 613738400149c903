"""Accuracy against speed on the two shipped small ViTs (small and large digit, docs/shipped-model.md):
the unpruned model, tokenprune's single cut, schedules, and the token-merging baseline
(bench/token_merging.py, from ToMe's paper) at several r, on the same held-out canvases, in one
run. Writes a JSON of the rows and a plot of accuracy against images/s per regime, with each
regime's Pareto front (no other point both faster and more accurate) marked.

    python bench/merging_accuracy.py [--canvases 2000] [--threads 2] [--out bench/results/merging_accuracy]

The shipped ViTs have 4 blocks and 65 tokens (a class token and 8 x 8 patches of 16 px), so the
images/s here are those of a small model on the CPU: overheads weigh more than at ViT-B/16
shapes (bench/tome_side_by_side.py has those). Accuracy: top-1 of the model's head; its
binomial standard error at 2000 canvases is about 1 point near 80%.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (token_merging.py)
from token_merging import (apply_token_merging, merging_tokens,  # noqa: E402
                           remove_token_merging, schedule_tokens)

from tokenprune import remove_pruning, replace_last_block  # noqa: E402
from tokenprune.proxy import REGIMES, heldout_set, load_proxy_model, preprocess  # noqa: E402

TOKENS, BLOCKS = 65, 4
R_VALUES = (4, 8, 12, 16)
# (name, schedule): stages are (block index, k_anchors, top_m); blocks counted from 1 in names.
PRUNINGS = (
    ("cut at block 2, 32 kept", [(1, 8, 24)]),
    ("cut at block 2, 16 kept", [(1, 4, 12)]),
    ("cut at block 3, 16 kept", [(2, 4, 12)]),
    ("schedule 2/3 (40, 20)", [(1, 8, 32), (2, 4, 16)]),
    ("schedule 2/3 (32, 12)", [(1, 8, 24), (2, 4, 8)]),
    ("schedule 1/2/3 (48, 32, 16)", [(0, 8, 40), (1, 8, 24), (2, 4, 12)]),
    ("schedule 1/2/3 (40, 24, 12)", [(0, 8, 32), (1, 6, 18), (2, 4, 8)]),
)
SELECTIONS = ("cls", "mmr")  # the ones docs/choosing-settings.md recommends on large objects


def measure(model, pixels, labels, batch, repeats):
    """(accuracy, images/s): accuracy over every canvas; speed the median of `repeats` passes
    over the first batch, after three warm-up passes."""
    with torch.inference_mode():
        correct = sum(int((model(pixels[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
                      for i in range(0, len(pixels), batch))
        first = pixels[:batch]
        for _ in range(3):
            model(first)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(first)
            times.append(time.perf_counter() - start)
    return correct / len(pixels), len(first) / statistics.median(times)


def pareto(rows):
    """The names of the rows that no other row beats in both accuracy and images/s."""
    return {a["name"] for a in rows
            if not any(b["accuracy"] >= a["accuracy"] and b["images_per_s"] >= a["images_per_s"]
                       and (b["accuracy"], b["images_per_s"]) != (a["accuracy"], a["images_per_s"])
                       for b in rows)}


def run_regime(regime, canvases, batch, repeats, say=print):
    model, card = load_proxy_model(regime)
    images, labels, _ = heldout_set(canvases, card)
    pixels = preprocess()(images)
    rows = []

    def add(name, kind, tokens, **extra):
        accuracy, speed = measure(model, pixels, labels, batch, repeats)
        rows.append(dict(regime=regime, name=name, kind=kind, accuracy=accuracy,
                         images_per_s=speed, mean_tokens_per_block=statistics.mean(tokens),
                         **extra))
        say(f"{regime:5s} {name:36s} accuracy {100 * accuracy:5.1f}%  {speed:8.1f} images/s  "
            f"{statistics.mean(tokens):5.1f} tokens/block")

    add("unpruned", "unpruned", [TOKENS] * BLOCKS)
    for r in R_VALUES:
        apply_token_merging(model, r)
        add(f"merging r={r}", "merging baseline", merging_tokens(TOKENS, BLOCKS, r), r=r)
        remove_token_merging(model)
    for name, schedule in PRUNINGS:
        for selection in SELECTIONS:
            replace_last_block(model, schedule=schedule, selection=selection)
            add(f"{name}, {selection}", "tokenprune", schedule_tokens(TOKENS, BLOCKS, schedule),
                schedule=[list(stage) for stage in schedule], selection=selection)
            remove_pruning(model)
    front = pareto(rows)
    for row in rows:
        row["pareto"] = row["name"] in front
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    regimes = list(dict.fromkeys(row["regime"] for row in rows))
    figure, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
    styles = {"unpruned": ("k", "*"), "merging baseline": ("tab:red", "s"),
              "tokenprune": ("tab:blue", "o")}
    for ax, regime in zip(axes[0], regimes):
        mine = [row for row in rows if row["regime"] == regime]
        for kind, (colour, marker) in styles.items():
            points = [row for row in mine if row["kind"] == kind]
            ax.scatter([p["images_per_s"] for p in points], [100 * p["accuracy"] for p in points],
                       c=colour, marker=marker, s=60 if marker == "*" else 28, label=kind,
                       zorder=3)
        front = sorted((row for row in mine if row["pareto"]), key=lambda r: r["images_per_s"])
        ax.plot([p["images_per_s"] for p in front], [100 * p["accuracy"] for p in front],
                "--", c="gray", zorder=2, label="Pareto front")
        ax.set_title(f"{regime} digit")
        ax.set_xlabel("images/s (CPU)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvases", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="OUT.json and OUT.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for regime in REGIMES
            for row in run_regime(regime, args.canvases, args.batch, args.repeats)]
    if args.out:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "threads": args.threads, "canvases": args.canvases, "batch": args.batch,
                "torch": torch.__version__, "standard_error_at_80_percent":
                math.sqrt(0.8 * 0.2 / args.canvases),
                "command": " ".join(["python", "bench/merging_accuracy.py"] + sys.argv[1:])}
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                            + "\n")
        plot(rows, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
