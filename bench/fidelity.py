"""Accuracy retention on trained attention: the shipped small ViT (tokenprune/proxy.py), pruned,
on its held-out canvases. The seed's selection against the controls `cls` and `random`.

    python bench/fidelity.py   # all 2000 held-out canvases (2-3 minutes on 2 CPU cores):
                               # bench/fidelity.md, fidelity.png, results/fidelity.json
    python bench/fidelity.py --n 200 --md /tmp/f.md --plot /tmp/f.png --json /tmp/f.json

Every setting runs through the sweep's engine (`tokenprune.sweep.GridEncoder`) batch by batch,
with the grid and the controls made by `tokenprune.sweep.grid_points`, the same as
`tokenprune sweep`: the seed's selection at each (k, m) budget, alpha and score_norm, at the
middle and the last block; `cls`, the k + m patches the class token attends to most; `random`,
k + m patches drawn at random (several seeds: mean and range). For each: the accuracy, and the
selection recall, the fraction of the digit's patches (those overlapping its ink box,
`object_patches`) that the pruned block kept, pooled over all canvases.
`pytest bench/` runs a small version (bench_fidelity.py).
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tokenprune.proxy import heldout_set, load_proxy_model, object_patches, preprocess  # noqa: E402
from tokenprune.sweep import GridEncoder, grid_points, tower_blocks, tower_patches  # noqa: E402

# (k, m): 8, 16 and 32 of the 64 patches kept, a quarter of them anchors.
BUDGETS = ((2, 6), (4, 12), (8, 24))
ALPHAS = (0.3, 0.5, 0.7)
SCORE_NORMS = ("none", "minmax")
LAYERS = (1, 3)  # the middle and the last of the model's 4 blocks (0-based)
SEEDS = (0, 1, 2, 3, 4)  # of the random control
N = 2000  # the whole held-out set the card's accuracy was measured on
BATCH = 250
METHODS = ("score", "cls", "random")
METHOD_NAMES = {"score": "seed's selection", "cls": "`cls` control", "random": "`random` control"}


def points(budgets=BUDGETS, alphas=ALPHAS, score_norms=SCORE_NORMS, layers=LAYERS, seeds=SEEDS,
           depth=4, patches=64):
    """The unpruned model, then the grid and both controls per budget, as `tokenprune sweep`
    makes them; the random control once per seed (the cls control does not use the seed)."""
    found = []
    for k, m in budgets:
        for i, seed in enumerate(seeds):
            for point in grid_points([k], [m], alphas, score_norms, layers, ("cls", "random"),
                                     depth, patches, "reference", seed):
                if point not in found and (i == 0 or point.kind == "random"):
                    found.append(point)
    return found


@torch.no_grad()
def evaluate(model, pixels, labels, objects, grid, batch=BATCH):
    """One row per point of `grid`: accuracy and selection recall over the canvases."""
    encoder = GridEncoder(model, [point.config for point in grid])
    correct = [0] * len(grid)
    kept = [0] * len(grid)
    for start in range(0, len(labels), batch):
        stop = start + batch
        obj = objects[start:stop]
        for i, out in enumerate(encoder(pixels[start:stop])):
            correct[i] += (out.output.argmax(-1) == labels[start:stop]).sum().item()
            kept[i] += obj.sum().item() if out.keep_idx is None \
                else obj.gather(1, out.keep_idx - 1).sum().item()
    total = objects.sum().item()
    rows = []
    for point, right, hits in zip(grid, correct, kept):
        c = point.config
        rows.append({"method": point.kind,
                     "block": None if c is None else c.layer,
                     "k_anchors": None if c is None else c.k_anchors,
                     "top_m": None if c is None else c.top_m,
                     "kept_patches": objects.shape[1] if c is None else c.kept_patches,
                     "alpha": c.alpha if point.kind == "score" else None,
                     "score_norm": c.score_norm if point.kind == "score" else None,
                     "seed": c.seed if point.kind == "random" else None,
                     "accuracy": right / len(labels),
                     "recall": hits / total})
    return rows


def run(n=N, batch=BATCH, **grid):
    """Load the shipped model and its held-out canvases, evaluate the grid; (meta, rows)."""
    model, card = load_proxy_model()
    images, labels, boxes = heldout_set(n, card)
    depth, patches = len(tower_blocks(model)), tower_patches(model)
    objects = object_patches(boxes)
    rows = evaluate(model, preprocess()(images), labels, objects,
                    points(depth=depth, patches=patches, **grid), batch)
    meta = {"model": "tokenprune/assets/proxy_vit.pt", "card_accuracy": card["heldout_accuracy"],
            "images": n, "batch": batch, "blocks": depth, "patches": patches,
            "object_patches_mean": objects.sum(1).float().mean().item(),
            "backend": "reference", "dtype": "float32",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{torch.get_num_threads()} torch threads",
            "torch": torch.__version__}
    return meta, rows


def summary(rows):
    """Per (block, kept patches): the unpruned row, then per method the rows; the random
    control's seeds summarised as mean, min and max."""
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    budgets = {}
    for row in rows:
        if row["method"] != "unpruned":
            budgets.setdefault((row["block"], row["kept_patches"]), {}).setdefault(
                row["method"], []).append(row)
    out = []
    for (block, kept), methods in sorted(budgets.items()):
        entry = {"block": block, "kept_patches": kept, "unpruned": unpruned}
        for method, members in methods.items():
            entry[method] = {key: {"mean": mean(r[key] for r in members),
                                   "min": min(r[key] for r in members),
                                   "max": max(r[key] for r in members)}
                             for key in ("accuracy", "recall")}
            entry[method]["rows"] = members
        out.append(entry)
    return out


def _pct(value):
    return f"{100 * value:.2f}%"


def _stat(stats, key):
    """mean, and [min-max] when the members differ: `93.10% [92.80-93.40]`."""
    s = stats[key]
    if s["min"] == s["max"]:
        return _pct(s["mean"]) if key == "accuracy" else f"{s['mean']:.2f}"
    if key == "accuracy":
        return f"{_pct(s['mean'])} [{100 * s['min']:.2f}-{100 * s['max']:.2f}]"
    return f"{s['mean']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def markdown(meta, rows, plot_name=None, command=None):
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    depth, patches = meta["blocks"], meta["patches"]
    seeds = sorted({r["seed"] for r in rows if r["method"] == "random"})
    alphas = sorted({r["alpha"] for r in rows if r["method"] == "score"})
    norms = sorted({r["score_norm"] for r in rows if r["method"] == "score"})
    lines = [
        "# Accuracy retention on trained attention: the shipped small ViT",
        "",
        f"{meta['images']} held-out canvases of `tokenprune/proxy.py` (a digit on noise and "
        f"lines; on average {meta['object_patches_mean']:.2f} of the {patches} patches overlap "
        f"the digit), the shipped model `{meta['model']}` ({depth} blocks) in {meta['dtype']}, "
        f"{meta['backend']} backend, batch {meta['batch']}; measured {meta['date']} on "
        f"{meta['machine']}, torch {meta['torch']}"
        + (f", with `{command}`" if command else "") + ". "
        f"Unpruned accuracy: **{_pct(unpruned['accuracy'])}**.",
        "",
        "Methods, at the same number of kept patches (k + m of " + str(patches) + "): the seed's "
        "selection (k anchors by the class token's attention, m more by the importance/"
        "diversity score); `cls`, the k + m patches the class token attends to most "
        "(`k_anchors = k + m, top_m = 0`); `random`, k + m patches drawn at random per image "
        f"(seeds {', '.join(map(str, seeds))}: mean [min-max]). Recall: the fraction of the "
        "digit's patches (those overlapping its ink box) that the pruned block kept, over all "
        "canvases. Retained: accuracy / unpruned accuracy. Blocks are 0-based indices. "
        f"\"All settings\": the seed's selection over alpha {', '.join(map(str, alphas))} and "
        f"score_norm {', '.join(norms)}, mean [min-max].",
        "",
        "## Summary",
        "",
        "| block | kept patches (k + m) | seed's selection, best setting | "
        "seed's selection, all settings | `cls` | `random` |",
        "|---|---|---|---|---|---|",
    ]
    entries = summary(rows)
    for e in entries:
        score = e["score"]["rows"]
        best = max(score, key=lambda r: (r["accuracy"], r["recall"]))
        kk = f"{e['kept_patches']} ({best['k_anchors']} + {best['top_m']})"
        lines.append(
            f"| {e['block']} of {depth} | {kk} | {_pct(best['accuracy'])} (recall "
            f"{best['recall']:.2f}; alpha {best['alpha']}, {best['score_norm']}) | "
            f"{_stat(e['score'], 'accuracy')} (recall {_stat(e['score'], 'recall')}) | "
            f"{_stat(e['cls'], 'accuracy')} (recall {_stat(e['cls'], 'recall')}) | "
            f"{_stat(e['random'], 'accuracy')} (recall {_stat(e['random'], 'recall')}) |")
    if plot_name:
        lines += ["", f"![accuracy and recall against kept patches]({plot_name})"]
    lines += ["", "## Every setting", "",
              "| block | kept patches | k | m | method | alpha | score_norm | seed | accuracy | "
              "retained | recall |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| - | {patches} | - | - | unpruned | - | - | - | {_pct(unpruned['accuracy'])} | "
              f"1.000 | 1.00 |"]
    order = {method: i for i, method in enumerate(METHODS)}
    dash = lambda v: "-" if v is None else v  # noqa: E731
    for r in sorted((r for r in rows if r["method"] != "unpruned"),
                    key=lambda r: (r["block"], r["kept_patches"], order[r["method"]],
                                   r["alpha"] or 0, r["score_norm"] or "", r["seed"] or 0)):
        lines.append(f"| {r['block']} | {r['kept_patches']} | {r['k_anchors']} | {r['top_m']} | "
                     f"{r['method']} | {dash(r['alpha'])} | {dash(r['score_norm'])} | "
                     f"{dash(r['seed'])} | {_pct(r['accuracy'])} | "
                     f"{r['accuracy'] / unpruned['accuracy']:.3f} | {r['recall']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(meta, rows, path):
    """A 2 x blocks grid: accuracy (top) and recall (bottom) against kept patches, one column
    per pruned block; one line per (alpha, score_norm) of the seed's selection, the cls control,
    the random control's mean with its range over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unpruned = next(r for r in rows if r["method"] == "unpruned")
    entries = summary(rows)
    blocks = sorted({e["block"] for e in entries})
    fig, axes = plt.subplots(2, len(blocks), figsize=(6 * len(blocks), 9), squeeze=False,
                             sharex=True)
    alphas = sorted({r["alpha"] for r in rows if r["method"] == "score"})
    colors = {a: f"C{i}" for i, a in enumerate(alphas)}
    styles = {"none": "-", "minmax": "--"}
    for col, block in enumerate(blocks):
        mine = [e for e in entries if e["block"] == block]
        for row, key in enumerate(("accuracy", "recall")):
            ax = axes[row][col]
            series = {}
            for e in mine:
                for r in e["score"]["rows"]:
                    series.setdefault((r["alpha"], r["score_norm"]), []).append(r)
            for (alpha, norm), members in sorted(series.items()):
                members.sort(key=lambda r: r["kept_patches"])
                ax.plot([r["kept_patches"] for r in members], [r[key] for r in members],
                        linestyle=styles.get(norm, ":"), marker="o", color=colors[alpha],
                        fillstyle="none" if norm == "minmax" else "full",
                        alpha=0.8, zorder=3, label=f"seed's selection, alpha {alpha}, {norm}")
            xs = [e["kept_patches"] for e in mine]
            # Drawn under the seed's selection, hollow: the two often coincide.
            ax.plot(xs, [e["cls"][key]["mean"] for e in mine], marker="s", color="black",
                    markersize=11, fillstyle="none", zorder=1,
                    label="cls control (k + m top class-token patches)")
            spread = [e["random"][key] for e in mine]
            means = [s["mean"] for s in spread]
            ax.errorbar(xs, means, yerr=[[s["mean"] - s["min"] for s in spread],
                                         [s["max"] - s["mean"] for s in spread]],
                        marker="X", color="grey", markersize=8, capsize=4,
                        label="random control (mean, range over seeds)")
            ax.axhline(unpruned[key], color="black", linestyle=":", linewidth=1,
                       label=f"unpruned ({meta['patches']} patches)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            where = "last" if block == meta["blocks"] - 1 else "middle"
            ax.set_title(f"{key}, pruned at block {block} of {meta['blocks']} ({where})",
                         fontsize=10)
            ax.set_ylabel("held-out accuracy" if key == "accuracy"
                          else "fraction of the digit's patches kept")
            if row == 1:
                ax.set_xlabel(f"kept patches (k + m, of {meta['patches']})")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"The shipped small ViT pruned, {meta['images']} held-out canvases "
                 f"({meta['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(meta, rows, md_path, plot_path, json_path, command=None):
    md_path, plot_path, json_path = Path(md_path), Path(plot_path), Path(json_path)
    for path in (md_path, plot_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    plot(meta, rows, plot_path)
    try:
        plot_name = os.path.relpath(plot_path.resolve(), md_path.resolve().parent)
    except ValueError:  # another drive
        plot_name = plot_path.resolve().as_posix()
    md_path.write_text(markdown(meta, rows, Path(plot_name).as_posix(), command), encoding="utf-8")
    json_path.write_text(json.dumps({**meta, "command": command, "rows": rows}, indent=2,
                                    allow_nan=False) + "\n", encoding="utf-8")


def _pairs(text):
    k, m = text.split(",")
    return int(k), int(m)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N, help="held-out canvases (the first n)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--budgets", nargs="+", type=_pairs, default=list(BUDGETS),
                        metavar="K,M")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    parser.add_argument("--score_norms", nargs="+", default=list(SCORE_NORMS))
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--md", default=HERE / "fidelity.md", type=Path)
    parser.add_argument("--plot", default=HERE / "fidelity.png", type=Path)
    parser.add_argument("--json", default=HERE / "results" / "fidelity.json", type=Path)
    args = parser.parse_args(argv)
    meta, rows = run(args.n, args.batch, budgets=args.budgets, alphas=args.alphas,
                     score_norms=args.score_norms, layers=args.layers, seeds=args.seeds)
    command = "python bench/fidelity.py" + (" " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])).rstrip()
    write(meta, rows, args.md, args.plot, args.json, command)
    print(f"wrote {args.md}, {args.plot} and {args.json} ({len(rows)} settings, "
          f"{meta['images']} canvases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
