"""Accuracy retention on trained attention: the shipped small ViTs (tokenprune/proxy.py), pruned,
on their held-out canvases, in two regimes side by side: a small digit (about 2 of the 64
patches) and a large one (about 18 of 64). The seed's selection against the other selections
(`mmr`, `cls`) and the `random` control.

    python bench/fidelity.py   # all 2000 held-out canvases of each regime (20 minutes on the
                               # 2-core VM shared with other jobs, 2026-11-30):
                               # bench/fidelity.md, fidelity.png, results/fidelity.json
    python bench/fidelity.py --n 200 --md /tmp/f.md --plot /tmp/f.png --json /tmp/f.json

Every setting runs through the sweep's engine (`tokenprune.sweep.GridEncoder`) batch by batch,
with the grid and the controls made by `tokenprune.sweep.grid_points`, the same as
`tokenprune sweep`: at each (k, m) budget, at the middle and the last block, the seed's
selection for each alpha and score_norm; `mmr` for each lambda; `cls`, the k + m patches the
class token attends to most; `random`, k + m patches drawn at random (several seeds: mean and
range). For each: the accuracy; the selection recall, the fraction of the digit's patches
(those overlapping its ink box, `object_patches`) that the pruned block kept, pooled over all
canvases; and the fraction of the kept patches that lie on the digit. The noise: one image is
100 / n points, the binomial standard error of the unpruned accuracy, and the random control's
range over its seeds. `pytest bench/` runs a small version (bench_fidelity.py).
"""
import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

import torch

HERE = Path(__file__).resolve().parent
from tokenprune.proxy import (REGIMES, heldout_set, load_proxy_model, object_patches,
                              preprocess, regime_of)
from tokenprune.sweep import GridEncoder, grid_points, tower_blocks, tower_patches

# (k, m): 8, 16 and 32 of the 64 patches kept, a quarter of them anchors.
BUDGETS = ((2, 6), (4, 12), (8, 24))
# alpha 1.0 (importance alone) is in the grid: it tests whether dropping the diversity term
# closes a gap to cls.
ALPHAS = (0.3, 0.5, 0.7, 1.0)
SCORE_NORMS = ("none", "minmax")
# 0.8 is mmr's default (SPEC.md says why; bench/mmr_lambda.py sweeps lambda against cls).
MMR_LAMBDAS = (0.5, 0.8)
LAYERS = (1, 3)  # the middle and the last of the model's 4 blocks (0-based)
SEEDS = (0, 1, 2, 3, 4)  # of the random control
N = 2000  # the whole held-out set each card's accuracy was measured on
BATCH = 250
METHODS = ("score", "mmr", "cls", "random")
METHOD_NAMES = {"score": "seed's selection", "mmr": "`mmr`", "cls": "`cls`",
                "random": "`random` control"}
REGIME_NAMES = {"small": "small digit", "large": "large digit"}


def points(budgets=BUDGETS, alphas=ALPHAS, score_norms=SCORE_NORMS, mmr_lambdas=MMR_LAMBDAS,
           layers=LAYERS, seeds=SEEDS, depth=4, patches=64):
    """The unpruned model, then per budget the grid over the selections (the seed's score for
    each alpha and score_norm, mmr for each lambda) and both controls, as `tokenprune sweep`
    makes them; the random control once per seed (nothing else uses the seed)."""
    found = []
    for k, m in budgets:
        for i, seed in enumerate(seeds):
            for point in grid_points([k], [m], alphas, score_norms, layers, ("cls", "random"),
                                     depth, patches, "reference", seed,
                                     **_selection_grid(mmr_lambdas)):
                if point not in found and (i == 0 or point.kind == "random"):
                    found.append(point)
    return found


@torch.no_grad()
def evaluate(model, pixels, labels, objects, grid, batch=BATCH):
    """One row per point of `grid`: accuracy, selection recall and on-object fraction."""
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
        method = point.kind  # its selection, or "unpruned"
        kept_patches = objects.shape[1] if c is None else c.kept_patches
        rows.append({"method": method,
                     "block": None if c is None else c.layer,
                     "k_anchors": None if c is None else c.k_anchors,
                     "top_m": None if c is None else c.top_m,
                     "kept_patches": kept_patches,
                     "alpha": c.alpha if method == "score" else None,
                     "score_norm": c.score_norm if method == "score" else None,
                     "mmr_lambda": c.mmr_lambda if method == "mmr" else None,
                     "seed": c.seed if method == "random" else None,
                     "accuracy": right / len(labels),
                     "recall": hits / total,
                     "on_object": hits / (len(labels) * kept_patches)})
    return rows


def run(regime="small", n=N, batch=BATCH, **grid):
    """Load a regime's shipped model and its held-out canvases, evaluate the grid;
    (meta, rows)."""
    model, card = load_proxy_model(regime)
    images, labels, boxes = heldout_set(n, card)
    depth, patches = len(tower_blocks(model)), tower_patches(model)
    objects = object_patches(boxes)
    rows = evaluate(model, preprocess()(images), labels, objects,
                    points(depth=depth, patches=patches, **grid), batch)
    meta = {"regime": regime, "model": f"tokenprune/assets/{regime_of(regime).checkpoint}",
            "digit_pixels": 8 * card["recipe"]["scale"],
            "card_accuracy": card["heldout_accuracy"],
            "images": n, "batch": batch, "blocks": depth, "patches": patches,
            "object_patches_mean": objects.sum(1).float().mean().item(),
            "backend": "reference", "dtype": "float32",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{torch.get_num_threads()} torch threads",
            "torch": torch.__version__}
    return meta, rows


def _selection_grid(mmr_lambdas):
    """grid_points' arguments for the selections besides the seed's score (none: no mmr)."""
    if not mmr_lambdas:
        return {}
    return {"selections": ("score", "mmr"), "mmr_lambdas": tuple(mmr_lambdas)}


# ----- summaries ----------------------------------------------------------------------------

KEYS = ("accuracy", "recall", "on_object")


def summary(rows):
    """Per (block, kept patches): the unpruned row, then per method its rows, pooled as mean,
    min and max (the random control's seeds; the settings of score and mmr)."""
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
                             for key in KEYS}
            entry[method]["rows"] = members
            entry[method]["best"] = max(members, key=lambda r: (r["accuracy"], r["recall"]))
        out.append(entry)
    return out


def noise(meta, rows):
    """What one point of accuracy is worth on these canvases: one image (points), the binomial
    standard error of the unpruned accuracy (points), and the random control's widest range
    over its seeds at any budget (points; None with one seed)."""
    n = meta["images"]
    p = next(r for r in rows if r["method"] == "unpruned")["accuracy"]
    spreads = [e["random"]["accuracy"]["max"] - e["random"]["accuracy"]["min"]
               for e in summary(rows) if "random" in e and len(e["random"]["rows"]) > 1]
    return {"one_image": 100 / n, "binomial_se": 100 * math.sqrt(p * (1 - p) / n),
            "random_range": 100 * max(spreads) if spreads else None}


def findings(meta, rows):
    """The lines `tokenprune sweep` would print for this regime (where a control or another
    selection keeps more than every setting of the seed's score, beyond the noise), from its
    own function on these rows."""
    from tokenprune.cli import sweep_report as sweep_command

    sweep_rows = [{"kind": "unpruned", "pruned": False, "block": None,
                   "kept_tokens": 1 + meta["patches"], "acc1": rows[0]["accuracy"]}]
    pooled = [r for r in rows[1:] if r["method"] != "random"]
    for e in summary(rows):  # the random control as one row: its mean over the seeds
        if "random" in e:
            pooled.append({**e["random"]["rows"][0], "seed": None,
                           "accuracy": e["random"]["accuracy"]["mean"]})
    for r in pooled:
        sweep_rows.append({"kind": r["method"],
                           "pruned": True, "block": r["block"],
                           "kept_tokens": 1 + r["kept_patches"],
                           "k_anchors": r["k_anchors"], "top_m": r["top_m"], "alpha": r["alpha"],
                           "score_norm": r["score_norm"], "mmr_lambda": r["mmr_lambda"],
                           "seed": r["seed"], "acc1": r["accuracy"]})
    return sweep_command.simpler_choice_findings(
        {"rows": sweep_rows, "primary": "acc1", "images": meta["images"],
         "num_blocks": meta["blocks"]})


# ----- the page -----------------------------------------------------------------------------

def _pct(value):
    return f"{100 * value:.2f}%"


def _range(stats, key):
    """mean, and [min-max] when the members differ: `93.10% [92.80-93.40]`."""
    s = stats[key]
    if key == "accuracy":
        text = _pct(s["mean"])
        return text if s["min"] == s["max"] else \
            f"{text} [{100 * s['min']:.2f}-{100 * s['max']:.2f}]"
    text = f"{s['mean']:.2f}"
    return text if s["min"] == s["max"] else f"{text} [{s['min']:.2f}-{s['max']:.2f}]"


def _setting(row):
    if row["method"] == "score":
        return f"alpha {row['alpha']}, {row['score_norm']}"
    if row["method"] == "mmr":
        return f"lambda {row['mmr_lambda']}"
    return ""


def _best(stats):
    """The best setting's accuracy (recall, on-object fraction; the setting)."""
    best = stats["best"]
    setting = _setting(best)
    return (f"{_pct(best['accuracy'])} ({best['recall']:.2f} / {best['on_object']:.2f}"
            + (f"; {setting}" if setting and len(stats["rows"]) > 1 else "") + ")")


def _pooled(stats):
    return (f"{_range(stats, 'accuracy')} ({_range(stats, 'recall')} / "
            f"{_range(stats, 'on_object')})")


def _noise_text(meta, rows):
    z = noise(meta, rows)
    text = (f"one image = {z['one_image']:.2f} points, binomial standard error of the unpruned "
            f"accuracy {z['binomial_se']:.2f} points")
    if z["random_range"] is not None:
        text += f", the random control's widest range over its seeds {z['random_range']:.2f} points"
    return text


def markdown(results, plot_name=None, command=None):
    """The page: `results` is a list of (meta, rows), one per regime."""
    first = results[0][0]
    patches, depth = first["patches"], first["blocks"]
    lines = [
        "# Accuracy retention on trained attention: the shipped small ViTs, two regimes",
        "",
        f"The held-out canvases of `tokenprune/proxy.py` (a digit on noise and lines) and each "
        f"regime's shipped model ({depth} blocks, {patches} patches) in {first['dtype']}, "
        f"{first['backend']} backend, batch {first['batch']}; measured {first['date']} on "
        f"{first['machine']}, torch {first['torch']}"
        + (f", with `{command}`" if command else "") + ".",
        "",
        "| regime | model | digit | patches on the digit (mean, of " f"{patches}) | canvases | "
        "unpruned accuracy | noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for meta, rows in results:
        unpruned = next(r for r in rows if r["method"] == "unpruned")
        lines.append(f"| {REGIME_NAMES[meta['regime']]} | `{meta['model']}` | "
                     f"{meta['digit_pixels']} px | {meta['object_patches_mean']:.2f} "
                     f"({100 * meta['object_patches_mean'] / patches:.0f}%) | {meta['images']} | "
                     f"{_pct(unpruned['accuracy'])} | {_noise_text(meta, rows)} |")
    seeds = sorted({r["seed"] for _, rows in results for r in rows if r["method"] == "random"})
    alphas = sorted({r["alpha"] for _, rows in results for r in rows if r["method"] == "score"})
    norms = sorted({r["score_norm"] for _, rows in results for r in rows
                    if r["method"] == "score"})
    lambdas = sorted({r["mmr_lambda"] for _, rows in results for r in rows
                      if r["method"] == "mmr"})
    lines += [
        "",
        f"Methods, at the same number of kept patches (k + m of {patches}): the seed's "
        "selection (k anchors by the class token's attention, m more by the importance/"
        f"diversity score; alpha {', '.join(map(str, alphas))}, score_norm {', '.join(norms)}); "
        + (f"`mmr` (the k anchors, then m patches one at a time by maximal marginal relevance, "
           f"diversity against every patch kept; lambda {', '.join(map(str, lambdas))}); "
           if lambdas else "")
        + "`cls`, the k + m patches the class token attends to most; `random`, k + m patches "
        f"drawn at random per image (seeds {', '.join(map(str, seeds))}). Each cell: accuracy "
        "(recall / on-object), where recall is the fraction of the digit's patches (those "
        "overlapping its ink box) that the pruned block kept and on-object the fraction of the "
        "kept patches that overlap the digit, both over all canvases. \"Best\": the setting "
        "with the highest accuracy; \"all\": mean [min-max] over the settings (for `random`, "
        "over the seeds). Blocks are 0-based. The noise column: one image is 100 / n "
        "points; the binomial standard error is that of one accuracy over the n canvases; the "
        "random control's range shows how far a change of seed alone moves it.",
        "",
        "## Summary",
        "",
        "| block | kept patches (k + m) | regime | seed's selection, best | seed's selection, all "
        "| `mmr`, best | `cls` | `random` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    entries = {meta["regime"]: summary(rows) for meta, rows in results}
    order = sorted({(e["block"], e["kept_patches"]) for es in entries.values() for e in es})
    for block, kept in order:
        for regime, es in entries.items():
            e = next((e for e in es if (e["block"], e["kept_patches"]) == (block, kept)), None)
            if e is None:
                continue
            some = e["score"]["best"]
            cell = lambda method, fn: fn(e[method]) if method in e else "-"  # noqa: E731
            lines.append(f"| {block + 1} of {depth} (index {block}) | {kept} "
                         f"({some['k_anchors']} + {some['top_m']}) "
                         f"| {REGIME_NAMES[regime]} | {cell('score', _best)} | "
                         f"{cell('score', _pooled)} | {cell('mmr', _best)} | "
                         f"{cell('cls', _pooled)} | {cell('random', _pooled)} |")
    lines += ["", "## Where a simpler choice wins", "",
              "What `tokenprune sweep` says on these rows (tokens = kept patches + the class "
              "token; `random` as its mean over the seeds; the noise as the sweep defines it: "
              "two binomial standard errors of the best score setting's accuracy, at least one "
              "image):", ""]
    for meta, rows in results:
        found = findings(meta, rows)
        lines += [f"- {REGIME_NAMES[meta['regime']]}: {line}." for line in found] or [
            f"- {REGIME_NAMES[meta['regime']]}: at no budget does another selection or a "
            "control keep more than the best setting of the seed's score by more than the "
            "noise."]
    if plot_name:
        lines += ["", f"![accuracy, recall and on-object fraction against kept patches]"
                      f"({plot_name})"]
    lines += ["", "## Every setting"]
    rank = {method: i for i, method in enumerate(METHODS)}
    dash = lambda v: "-" if v is None else v  # noqa: E731
    for meta, rows in results:
        unpruned = next(r for r in rows if r["method"] == "unpruned")
        lines += ["", f"### {REGIME_NAMES[meta['regime']]}", "",
                  "| block | kept patches | k | m | method | alpha | score_norm | lambda | seed | "
                  "accuracy | retained | recall | on-object |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| - | {patches} | - | - | unpruned | - | - | - | - | "
                  f"{_pct(unpruned['accuracy'])} | 1.000 | 1.00 | "
                  f"{unpruned['on_object']:.2f} |"]
        for r in sorted((r for r in rows if r["method"] != "unpruned"),
                        key=lambda r: (r["block"], r["kept_patches"], rank[r["method"]],
                                       r["alpha"] or 0, r["score_norm"] or "",
                                       r["mmr_lambda"] or 0, r["seed"] or 0)):
            lines.append(f"| {r['block']} | {r['kept_patches']} | {r['k_anchors']} | "
                         f"{r['top_m']} | {r['method']} | {dash(r['alpha'])} | "
                         f"{dash(r['score_norm'])} | {dash(r['mmr_lambda'])} | "
                         f"{dash(r['seed'])} | {_pct(r['accuracy'])} | "
                         f"{r['accuracy'] / unpruned['accuracy']:.3f} | {r['recall']:.2f} | "
                         f"{r['on_object']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Rows: accuracy, recall; columns: one per (regime, pruned block). Lines: each setting of
    the seed's selection (colour by alpha, dashed for minmax), mmr per lambda, cls, and the
    random control's mean with its range over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(meta, rows, block) for meta, rows in results
              for block in sorted({r["block"] for r in rows if r["method"] != "unpruned"})]
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 9), squeeze=False,
                             sharex=True)
    alphas = sorted({r["alpha"] for _, rows in results for r in rows if r["method"] == "score"})
    lambdas = sorted({r["mmr_lambda"] for _, rows in results for r in rows
                      if r["method"] == "mmr"})
    colors = {a: plt.cm.Blues(0.45 + 0.5 * i / max(1, len(alphas) - 1))
              for i, a in enumerate(alphas)}
    mmr_colors = {lam: plt.cm.Oranges(0.45 + 0.5 * i / max(1, len(lambdas) - 1))
                  for i, lam in enumerate(lambdas)}
    for col, (meta, rows, block) in enumerate(panels):
        unpruned = next(r for r in rows if r["method"] == "unpruned")
        mine = [e for e in summary(rows) if e["block"] == block]
        xs = [e["kept_patches"] for e in mine]
        for row, key in enumerate(("accuracy", "recall")):
            ax = axes[row][col]
            series = {}
            for e in mine:
                for method in ("score", "mmr"):
                    for r in e.get(method, {}).get("rows", []):
                        series.setdefault((method, r["alpha"], r["score_norm"],
                                           r["mmr_lambda"]), []).append(r)
            for (method, alpha, norm, lam), members in sorted(
                    series.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
                members.sort(key=lambda r: r["kept_patches"])
                if method == "score":
                    style = dict(color=colors[alpha], linestyle="--" if norm == "minmax" else "-",
                                 marker="o", label=f"seed's selection, alpha {alpha}, {norm}")
                else:
                    style = dict(color=mmr_colors[lam], linestyle="-", marker="D",
                                 label=f"mmr, lambda {lam}")
                ax.plot([r["kept_patches"] for r in members], [r[key] for r in members],
                        alpha=0.85, zorder=3, **style)
            ax.plot(xs, [e["cls"][key]["mean"] for e in mine if "cls" in e], marker="s",
                    color="black", markersize=10, fillstyle="none", zorder=4, label="cls")
            spread = [e["random"][key] for e in mine if "random" in e]
            means = [s["mean"] for s in spread]
            ax.errorbar(xs[:len(means)], means,
                        yerr=[[s["mean"] - s["min"] for s in spread],
                              [s["max"] - s["mean"] for s in spread]],
                        marker="X", color="grey", markersize=8, capsize=4,
                        label="random control (mean, range over seeds)")
            if key == "accuracy":
                ax.axhline(unpruned[key], color="black", linestyle=":", linewidth=1,
                           label=f"unpruned ({meta['patches']} patches)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            where = "last" if block == meta["blocks"] - 1 else "middle"
            ax.set_title(f"{REGIME_NAMES[meta['regime']]} "
                         f"({meta['object_patches_mean']:.1f} of {meta['patches']} patches): "
                         f"{key},\npruned at block {block + 1} of {meta['blocks']} (index {block}, {where})",
                         fontsize=10)
            ax.set_ylabel("held-out accuracy" if key == "accuracy"
                          else "fraction of the digit's patches kept")
            if row == 1:
                ax.set_xlabel(f"kept patches (k + m, of {meta['patches']})")
    axes[0][0].legend(fontsize=7, loc="lower right")
    first = results[0][0]
    counts = sorted({meta["images"] for meta, _ in results})
    fig.suptitle(f"The shipped small ViTs pruned, {', '.join(map(str, counts))} held-out "
                 f"canvases per regime ({first['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results, md_path, plot_path, json_path, command=None):
    """The page, the plot and the JSON ({command, regimes: [{meta..., rows}]})."""
    md_path, plot_path, json_path = Path(md_path), Path(plot_path), Path(json_path)
    for path in (md_path, plot_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, plot_path)
    try:
        plot_name = os.path.relpath(plot_path.resolve(), md_path.resolve().parent)
    except ValueError:  # another drive
        plot_name = plot_path.resolve().as_posix()
    md_path.write_text(markdown(results, Path(plot_name).as_posix(), command), encoding="utf-8")
    json_path.write_text(json.dumps(
        {"command": command,
         "regimes": [{**meta, "noise_points": noise(meta, rows), "rows": rows}
                     for meta, rows in results]},
        indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _pairs(text):
    k, m = text.split(",")
    return int(k), int(m)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=list(REGIME_NAMES))
    parser.add_argument("--n", type=int, default=N, help="held-out canvases (the first n)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--budgets", nargs="+", type=_pairs, default=list(BUDGETS),
                        metavar="K,M")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    parser.add_argument("--score_norms", nargs="+", default=list(SCORE_NORMS))
    parser.add_argument("--mmr_lambdas", nargs="*", type=float, default=list(MMR_LAMBDAS),
                        help="none: no mmr rows")
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--md", default=HERE / "fidelity.md", type=Path)
    parser.add_argument("--plot", default=HERE / "fidelity.png", type=Path)
    parser.add_argument("--json", default=HERE / "results" / "fidelity.json", type=Path)
    args = parser.parse_args(argv)
    results = [run(regime, args.n, args.batch, budgets=args.budgets, alphas=args.alphas,
                   score_norms=args.score_norms, mmr_lambdas=args.mmr_lambdas,
                   layers=args.layers, seeds=args.seeds)
               for regime in args.regimes]
    command = "python bench/fidelity.py" + (" " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])).rstrip()
    write(results, args.md, args.plot, args.json, command)
    print(f"wrote {args.md}, {args.plot} and {args.json} ("
          + "; ".join(f"{meta['regime']}: {len(rows)} settings, {meta['images']} canvases"
                      for meta, rows in results) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
