"""`tokenprune sweep`: a grid of pruning settings on one model and one dataset, in one pass.

CLIP_benchmark's own `run()` loads the model and the dataset and builds the zero-shot
classifier; its `run_classification` is swapped for one that encodes each batch with the
library's engine (tokenprune.sweep.GridEncoder), and CLIP_benchmark's `evaluate` turns every
configuration's logits into metrics. So every grid point gets the numbers
`tokenprune eval --enable_pruning` gives.
"""
import csv
import functools
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from unittest import mock

import torch

from ..patch import remove_pruning, replace_last_block, visual_tower
from ..config import CONTROLS, PruneConfig
from ..sweep import (GridEncoder, block_widths, grid_points, relative_cost, tower_blocks,
                     tower_patches)
from ..towers import find_tower
from .common import CLIError, check_model, quiet_warnings, sweep_lists

OUTPUT_FILES = ("results.csv", "results.json", "accuracy_vs_tokens.png", "summary.md")
SPEED_ROUNDS = 3  # timed encode_image calls per setting (after one warm-up); the median counts

def _one(args, name):
    values = args.__dict__[name]
    values = values if isinstance(values, list) else [values]
    if len(values) != 1:
        raise CLIError(f"--{name} {' '.join(map(str, values))}: tokenprune sweep takes exactly one "
                    f"{name} per run")
    return values[0]


def _tower_depth(model_name):
    """Blocks in the image tower, from the model's config without loading it (None if unknown)."""
    import open_clip
    from open_clip.factory import parse_model_name
    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        with open(os.path.join(identifier, "open_clip_config.json"), encoding="utf-8") as f:
            config = json.load(f).get("model_cfg", {})
    elif schema is None:
        config = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    else:
        return None
    layers = config.get("vision_cfg", {}).get("layers")
    return layers if isinstance(layers, int) else None


def check_sweep_args(args):
    """Everything that can be checked before a model loads; returns the checked lists."""
    from clip_benchmark.datasets.builder import dataset_collection, get_dataset_default_task

    for flag in ("distributed", "skip_load"):
        if getattr(args, flag):
            raise CLIError(f"--{flag}: not supported by tokenprune sweep")
    if args.pretrained_model:
        raise CLIError("--pretrained_model: tokenprune sweep takes one --model and one --pretrained")
    model, pretrained = _one(args, "model"), _one(args, "pretrained")
    dataset, _ = _one(args, "dataset"), _one(args, "language")
    if dataset in dataset_collection or os.path.isfile(dataset):
        raise CLIError(f"--dataset {dataset}: a collection of datasets; tokenprune sweep takes one "
                    "dataset per run")
    task = args.task
    if task == "auto":
        task = get_dataset_default_task(dataset.replace("wds/", "", 1)
                                        if dataset.startswith("wds/") else dataset)
    if task != "zeroshot_classification":
        raise CLIError(f"--task {task} (of --dataset {dataset}): tokenprune sweep evaluates "
                    "zero-shot classification only; use tokenprune eval --enable_pruning for "
                    "other tasks")

    lists = sweep_lists(args)

    if args.model_type != "open_clip":
        raise CLIError(f"--model_type {args.model_type}: tokenprune sweep prunes OpenCLIP models only")
    check_model(model, pretrained, pruning_flag="")
    depth = _tower_depth(model)
    if depth is not None:
        _check_layers(lists["layer"], depth, model)
    return lists


def _check_layers(layers, depth, model):
    for layer in layers:
        if not -depth <= layer < depth:
            raise CLIError(f"--layer must be in [{-depth}, {depth - 1}] for {model}'s "
                        f"{depth}-block image tower, got {layer}")


class _Sweep:
    """What the swapped run_classification needs, and what it found."""

    def __init__(self, args, lists):
        self.args = args
        self.lists = lists
        self.images = None  # the dataset's size, when it can be known up front
        self.bar = None
        self.result = None


class _Done(Exception):
    """Carries the finished sweep out of CLIP_benchmark's run() before it writes its own file."""


def _dataset_size(dataset):
    """Images in the dataset, or None. A local WebDataset has a length too: eval's
    build_dataset hook (tokenprune/evaluate.py), active during the sweep, counts its samples."""
    try:
        return len(dataset)
    except TypeError:
        return None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_second(model, images, config, device, amp):
    """encode_image images/s on `images`, median of SPEED_ROUNDS calls after one warm-up."""
    remove_pruning(model)
    if config is not None:
        replace_last_block(model, config=config)
    try:
        seconds = []
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            for _ in range(1 + SPEED_ROUNDS):
                _sync(device)
                start = time.perf_counter()
                model.encode_image(images)
                _sync(device)
                seconds.append(time.perf_counter() - start)
        seconds = sorted(seconds[1:])
        return len(images) / seconds[len(seconds) // 2]
    finally:
        remove_pruning(model)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _sweep_classification(state, original_evaluate, zsc):
    """A stand-in for CLIP_benchmark's run_classification: same batches, same autocast, same
    logits, for every point of the grid at once; then the metrics, and out via _Done."""

    def run_classification(model, classifier, dataloader, device, amp=True):
        import torch.nn.functional as F
        args, lists = state.args, state.lists
        visual = visual_tower(model)
        depth, patches = len(tower_blocks(visual)), tower_patches(visual)
        _check_layers(lists["layer"], depth, args.model)  # towers whose config we could not read
        points = grid_points(lists["k_anchors"], lists["top_m"], lists["alpha"],
                             lists["score_norm"], lists["layer"], lists["controls"], depth,
                             patches, args.backend, args.seed, selections=lists["selection"],
                             mmr_lambdas=lists["mmr_lambda"])
        encoder = GridEncoder(visual, [p.config for p in points], forward=model.encode_image)
        timed = {p.config if p.config is not None and p.config.kept_patches < patches else None
                 for p in points}  # a point that prunes nothing runs the unpruned model
        if state.bar is not None and state.bar.total is not None and not args.no_speed:
            state.bar.total += len(timed)
            state.bar.refresh()
        pred = [[] for _ in points]
        true, first_batch = [], None
        with torch.no_grad():
            for images, target in dataloader:  # run_classification's loop, every point at once
                images = images.to(device)
                target = target.to(device)
                with torch.autocast(device, enabled=amp):
                    outputs = encoder(images)
                    logits = [100. * F.normalize(out.output, dim=-1) @ classifier
                              for out in outputs]
                true.append(target.cpu())
                for kept, batch_logits in zip(pred, logits):
                    kept.append(batch_logits.float().cpu())
                if first_batch is None:
                    first_batch = images
                if state.bar is not None:
                    state.bar.update(len(images))
        true = torch.cat(true)
        metrics = []
        for logits in pred:
            metrics.append(_metrics(original_evaluate, zsc, torch.cat(logits), true, classifier,
                                    dataloader, device, amp))
        speeds = [None] * len(points)
        if not args.no_speed and first_batch is not None:
            if state.bar is not None:
                state.bar.set_description("timing encode_image")
            done = {}
            for i, point in enumerate(points):
                key = point.config if point.config in timed else None
                if key not in done:
                    done[key] = _images_per_second(model, first_batch, key, device, amp)
                    if state.bar is not None:
                        state.bar.update(1)
                speeds[i] = done[key]
        state.result = _rows(points, metrics, speeds, visual, len(true), first_batch)
        raise _Done()

    return run_classification


def _metrics(original_evaluate, zsc, logits, target, classifier, dataloader, device, amp):
    """CLIP_benchmark's own metrics of these logits: its evaluate(), with the classifier and
    the logits handed in instead of computed."""
    with mock.patch.object(zsc, "zero_shot_classifier", lambda *a, **k: classifier), \
            mock.patch.object(zsc, "run_classification", lambda *a, **k: (logits, target)):
        return original_evaluate(None, dataloader, None, None, None, device, amp=amp)


def _rows(points, metrics, speeds, visual, images, batch):
    tower = find_tower(visual)
    depth, patches, prefix = len(tower.blocks), tower.num_patches, tower.num_prefix
    tokens = prefix + patches
    width, mlp_width = block_widths(tower.blocks[0])
    names = list(metrics[0])
    primary = names[0]
    baseline = metrics[0][primary]
    rows = []
    for point, values, speed in zip(points, metrics, speeds):
        config = point.config
        pruned = config is not None and config.kept_patches < patches
        kept = prefix + config.kept_patches if pruned else tokens
        score = point.kind == "score"
        row = {"kind": point.kind,
               "selection": config.selection if config is not None else None,
               "block": config.layer if config is not None else None,
               "num_blocks": depth,
               "k_anchors": config.k_anchors if config is not None else None,
               "top_m": config.top_m if config is not None else None,
               "alpha": config.alpha if score else None,
               "score_norm": config.score_norm if score else None,
               "mmr_lambda": config.mmr_lambda if point.kind == "mmr" else None,
               "seed": config.seed if point.kind == "random" else None,
               "pruned": pruned,
               "kept_tokens": kept,
               "tokens": tokens,
               **{name: _finite(values[name]) for name in names}}
        ratio = values[primary] / baseline if baseline else float("nan")
        row[f"{primary}_retained"] = _finite(ratio)
        row["relative_cost"] = relative_cost(tokens, kept, config.layer if pruned else 0, depth,
                                             width, mlp_width)
        row["images_per_s"] = _finite(speed) if speed is not None else None
        rows.append(row)
    return {"rows": rows, "metrics": names, "primary": primary, "images": images,
            "tokens": tokens, "num_blocks": depth,
            "speed_batch": None if batch is None or speeds[0] is None else len(batch)}


# ----- outputs ------------------------------------------------------------------------------

def _weights(meta):
    """The weights as CLIP_benchmark names them in its output file: a file's base name, or the tag."""
    return os.path.basename(meta["pretrained"]) if os.path.isfile(meta["pretrained"]) \
        else meta["pretrained"]


def _label(row):
    if row["kind"] == "mmr":
        return f"mmr, k={row['k_anchors']}, m={row['top_m']}, lambda={row['mmr_lambda']}"
    if row["kind"] != "score":  # cls, random: only k + m counts
        return f"{row['kind']}, k+m={row['k_anchors'] + row['top_m']}"
    return (f"k={row['k_anchors']}, m={row['top_m']}, alpha={row['alpha']}, "
            f"{row['score_norm']}")


def _is_seed_score(row):
    """A pruned row of the seed's own selection (any alpha, score_norm)."""
    return row["kind"] == "score" and row["pruned"]


def _method(row):
    """What a row's selection is called in the sweep's findings: its kind (a control), or the
    grid's other selection with its parameter ("mmr with lambda 0.7")."""
    if row.get("mmr_lambda") is not None:
        return f"{row['kind']} with lambda {row['mmr_lambda']}"
    return row["kind"]


def simpler_choice_findings(result):
    """One line per budget (block, kept tokens) where a control, or another selection of the
    grid, keeps more of the primary metric than every setting of the seed's score, by more
    than the noise. Empty when there is none.

    The noise: twice the binomial standard error of the best score setting's value p over the
    n images, 2 sqrt(p (1 - p) / n), and never less than one image (1 / n). The rows are
    measured on the same images, so their difference varies less than two independent
    estimates would (standard error at most sqrt(2) sqrt(p (1 - p) / n) when p is close for
    both): a difference above the margin is not sampling noise. The sweep runs the random
    control with one seed, so its spread over seeds is not known here (bench/fidelity.py
    measures it on the shipped models: about one to two points)."""
    rows, primary, n = result["rows"], result["primary"], result["images"]
    lines = []
    budgets = {}
    for row in rows[1:]:
        if row["pruned"] and row[primary] is not None:
            budgets.setdefault((row["block"], row["kept_tokens"]), []).append(row)
    for (block, kept), members in sorted(budgets.items()):
        score = [r for r in members if _is_seed_score(r)]
        others = [r for r in members if not _is_seed_score(r)]
        if not score or not others or not n:
            continue
        best = max(score, key=lambda r: r[primary])
        p = best[primary]
        noise = max(1 / n, 2 * math.sqrt(max(p * (1 - p), 0.0) / n))
        winners = sorted((r for r in others if r[primary] - p > noise),
                         key=lambda r: -r[primary])
        if not winners:
            continue
        top, also = winners[0], winners[1:]
        line = (f"at block {block} of {result['num_blocks']}, {kept} tokens, {_method(top)} "
                f"keeps {100 * (top[primary] - p):.1f} points more {primary} than the best score "
                f"setting ({_label(best)}: {p:.4f} against {top[primary]:.4f}; n = {n}, "
                f"one image = {100 / n:.2g} points, noise {100 * noise:.1f} points)")
        if also:
            line += "; so do " + ", ".join(f"{_method(r)} (+{100 * (r[primary] - p):.1f})"
                                          for r in also)
        lines.append(line)
    return lines


def summary_markdown(meta, result):
    rows, primary = result["rows"], result["primary"]
    unpruned = rows[0]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# tokenprune sweep: {meta['model']} ({_weights(meta)}) on {meta['dataset']}",
             "",
             f"{result['images']} images, {meta['date']}, device {meta['device']}, "
             f"amp {meta['amp']}, batch size {meta['batch_size']}. "
             f"Unpruned {primary}: **{fmt(unpruned[primary])}** ({result['tokens']} tokens). "
             f"Metric: {primary}; retained = pruned / unpruned; cost = estimated multiply-adds "
             "of the image tower's blocks relative to unpruned (see README).",
             "",
             f"| block | kept tokens | best setting | {primary} | retained | cls control | "
             f"random control | unpruned | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    budgets = {}
    for row in rows[1:]:
        if row["kind"] == "score" and row["pruned"]:
            budgets.setdefault((row["block"], row["kept_tokens"]), []).append(row)
    for (block, kept), candidates in sorted(budgets.items()):
        best = max(candidates, key=lambda r: -math.inf if r[primary] is None else r[primary])
        controls = {r["kind"]: r[primary] for r in rows
                    if r["kind"] in CONTROLS and (r["block"], r["kept_tokens"]) == (block, kept)}
        control = lambda kind: fmt(controls[kind]) if kind in controls else "-"  # noqa: E731
        lines.append(f"| {block} of {result['num_blocks']} | {kept} | {_label(best)} | "
                     f"{fmt(best[primary])} | {fmt(best[f'{primary}_retained'])} | "
                     f"{control('cls')} | {control('random')} | {fmt(unpruned[primary])} | "
                     f"{best['relative_cost']:.3f} |")
    skipped = [r for r in rows[1:] if not r["pruned"]]
    if skipped:
        lines += ["", f"Not pruned (k + m >= {result['tokens'] - 1} patches, the unpruned "
                      f"model's numbers): {'; '.join(_label(r) for r in skipped)}."]
    findings = simpler_choice_findings(result)
    lines += ["", "## Where a simpler choice wins", ""]
    lines += [f"- {line}." for line in findings] or [
        "At no budget does a control or another selection keep more than the best setting of "
        "the seed's score by more than the noise (two binomial standard errors, at least one "
        "image)."]
    return "\n".join(lines) + "\n"


def plot(meta, result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, primary = result["rows"], result["primary"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    series = {}
    for row in rows[1:]:
        if row["kind"] == "score":
            series.setdefault((row["block"], f"alpha {row['alpha']}, {row['score_norm']}"),
                              []).append(row)
        elif row["kind"] == "mmr":
            series.setdefault((row["block"], f"mmr, lambda {row['mmr_lambda']}"), []).append(row)
    for (block, setting), members in series.items():
        members = sorted(members, key=lambda r: r["kept_tokens"])
        ax.plot([r["kept_tokens"] for r in members], [r[primary] for r in members], "o-",
                alpha=0.85, label=f"block {block}/{result['num_blocks']}, {setting}")
    markers = {"cls": ("s", "cls control"), "random": ("X", "random control")}
    for kind, (marker, name) in markers.items():
        for block in sorted({r["block"] for r in rows if r["kind"] == kind}):
            members = sorted((r for r in rows if r["kind"] == kind and r["block"] == block),
                             key=lambda r: r["kept_tokens"])
            seed = f" (seed {members[0]['seed']})" if kind == "random" else ""
            ax.plot([r["kept_tokens"] for r in members], [r[primary] for r in members],
                    linestyle="none", marker=marker, markersize=8, markeredgecolor="black",
                    label=f"{name}{seed}, block {block}/{result['num_blocks']}")
    if rows[0][primary] is not None:
        ax.axhline(rows[0][primary], color="black", linestyle="--",
                   label=f"unpruned ({result['tokens']} tokens)")
    ax.set_xlabel(f"tokens kept after the pruned block (of {result['tokens']})")
    ax.set_ylabel(f"{primary} on {meta['dataset']}")
    ax.set_title(f"{primary} against kept tokens: {meta['model']} ({_weights(meta)}) on "
                 f"{meta['dataset']}, {result['images']} images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(output_dir, meta, result):
    """All four files, or none: they are written to a folder beside output_dir, then moved in."""
    rows = result["rows"]
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokenprune-sweep-", dir=parent)
    try:
        with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "images": result["images"], "tokens": result["tokens"],
                       "num_blocks": result["num_blocks"], "primary_metric": result["primary"],
                       "speed_batch": result["speed_batch"], "rows": rows},
                      f, indent=2, allow_nan=False)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # None (non-finite, or not applicable) is an empty cell
        with open(os.path.join(staging, "results.csv"), "w", encoding="utf-8") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(staging, "summary.md"), "w", encoding="utf-8") as f:
            f.write(summary_markdown(meta, result))
        plot(meta, result, os.path.join(staging, "accuracy_vs_tokens.png"))
        os.makedirs(output_dir, exist_ok=True)
        for name in OUTPUT_FILES:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----- run ----------------------------------------------------------------------------------

def run_sweep(args):
    """`tokenprune sweep`: check the flags, run the grid through CLIP_benchmark, write."""
    from copy import copy

    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from tqdm import tqdm

    from .evaluate import clip_benchmark_hooks, swapped

    lists = check_sweep_args(args)
    base = copy(args)
    for name in ("model", "pretrained", "dataset", "language"):
        setattr(base, name, _one(args, name))
    base.enable_pruning = False  # tokenprune eval's hooks: load and time, but do not prune
    base.verbose = False  # our own progress bar instead of CLIP_benchmark's prints
    base.train_split = base.val_split = base.val_proportion = None  # linear probes only
    state = _Sweep(base, lists)
    original_evaluate = zsc.evaluate

    def build_dataset_sized(build_dataset):
        @functools.wraps(build_dataset)
        def build(dataset_name, root="root", *a, **kw):
            dataset = build_dataset(dataset_name, root, *a, **kw)
            state.images = _dataset_size(dataset)
            return dataset
        return build

    def classes_bar(classnames):
        # One bar for the whole run: the class names (text classifier), the images (every
        # setting at once), then one step per setting timed; run_classification adds those.
        total = len(classnames) + state.images if state.images is not None else None
        state.bar = tqdm(total=total, disable=not args.verbose, unit="step",
                         desc="text classifier", file=sys.stderr, dynamic_ncols=True)
        for name in classnames:
            yield name
            state.bar.update(1)
        state.bar.set_description("images, all settings")

    try:
        with quiet_warnings(args.show_warnings), clip_benchmark_hooks(base, PruneConfig()):
            swaps = [(cb_cli, "build_dataset", build_dataset_sized(cb_cli.build_dataset)),
                     (zsc, "tqdm", classes_bar),
                     (zsc, "run_classification",
                      _sweep_classification(state, original_evaluate, zsc))]
            with swapped(swaps):
                try:
                    cb_cli.run(base)
                except _Done:
                    pass
        if state.bar is not None:
            state.bar.close()
        if state.result is None:
            raise CLIError("CLIP_benchmark did not run a zero-shot classification")
        meta = {"dataset": base.dataset, "model": base.model, "pretrained": base.pretrained,
                "language": base.language, "task": "zeroshot_classification",
                "device": str(base.device), "amp": base.amp, "batch_size": base.batch_size,
                "backend": base.backend, "date": datetime.now(timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC")}
        write_outputs(args.output_dir, meta, state.result)
    except KeyboardInterrupt:
        if state.bar is not None:
            state.bar.close()
        print(f"tokenprune: sweep interrupted: nothing was written to {args.output_dir}",
              file=sys.stderr)
        raise
    rows = state.result["rows"]
    print(f"tokenprune: sweep of {len(rows) - 1} settings on {state.result['images']} images: "
          f"wrote {', '.join(OUTPUT_FILES)} to {args.output_dir}", file=sys.stderr)
    for line in simpler_choice_findings(state.result):
        print(f"tokenprune: {line}", file=sys.stderr)
    return state.result
