"""`tokenprune sweep`: a grid of pruning settings on one model and one dataset, in one pass.

CLIP_benchmark's own `run()` loads the model and the dataset and builds the zero-shot
classifier; its `run_classification` is swapped for one that encodes each batch with the
library's engine (tokenprune.sweep.GridEncoder), and CLIP_benchmark's `evaluate` turns every
configuration's logits into metrics. So every grid point gets the numbers
`tokenprune eval --enable_pruning` gives. summary.md and the plot are drawn by sweep_report.py;
the flags are checked before this module is imported (tokenprune/cli/commands/sweep.py).
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

import torch

from ..config import PruneConfig
from ..patch import visual_tower
from ..sweep import (GridEncoder, block_widths, grid_points, mean_tokens, relative_cost,
                     tower_blocks, tower_patches)
from ..towers import find_tower
from .checks import one_value
from .common import CLIError
from .loading import quiet_warnings
from .model_checks import check_model, check_sweep_blocks, check_tokenizer
from .shipped_rules import SHIPPED_MODELS
from .swap import swapped
from .sweep_report import OUTPUT_FILES, plot, simpler_choice_findings, summary_markdown


def check_sweep_args(args):
    """What needs CLIP_benchmark or OpenCLIP to check, before the model loads: the task of the
    dataset, the model's pretrained tag and tower, its text tokenizer."""
    from clip_benchmark.datasets.builder import get_dataset_default_task

    model, pretrained, dataset = (one_value(args, name)
                                  for name in ("model", "pretrained", "dataset"))
    task = args.task
    if task == "auto":
        task = get_dataset_default_task(dataset.replace("wds/", "", 1)
                                        if dataset.startswith("wds/") else dataset)
    if task != "zeroshot_classification":
        raise CLIError(f"--task {task} (of --dataset {dataset}): tokenprune sweep evaluates "
                    "zero-shot classification only; use tokenprune eval --enable_pruning for "
                    "other tasks")
    if model not in SHIPPED_MODELS:  # a shipped model was checked with its dataset before
        check_model(model, pretrained, pruning_flag="")
        check_tokenizer(model, args.tokenizer)


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
    build_dataset hook (tokenprune/cli/evaluate.py), active during the sweep, counts its samples."""
    try:
        return len(dataset)
    except TypeError:
        return None


class _PassTimer:
    """Each setting's encode_image speed, from the passes the sweep makes anyway.

    Per batch, GridEncoder calls encode_image once on the unpruned model, then once for each
    setting that prunes, with the blocks before its layer skipped and their output injected
    (tokenprune/sweep.py). Timed here: each of those calls, and, in the unpruned call, when
    the first block and each pruned block start. A setting pruned at block L then takes what
    its own model would: the unpruned call's time up to block L, plus its own call's time less
    the part before the first block (patch embedding, positions, pre-norm), which it repeats.
    The first batch warms up and is not counted, unless it is the only one (as in eval)."""

    def __init__(self, blocks, layers, device):
        self.device = torch.device(device)
        self.starts = {}  # block index -> when it started in this batch's unpruned call
        self.calls = []  # this batch's encode_image calls: (start, end)
        self.batches = []  # (images, unpruned seconds, {block: seconds before it}, [reruns])
        self.hooks = [blocks[layer].register_forward_pre_hook(functools.partial(self._start,
                                                                                layer))
                      for layer in sorted({0, *layers})]

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, layer, module, args):
        # Only the unpruned call reaches the tower's own blocks here: a setting's call runs
        # stand-ins before its layer, then its pruned block.
        self.starts.setdefault(layer, self._now())

    def wrap(self, encode_image):
        @functools.wraps(encode_image)
        def timed(images, *args, **kwargs):
            start = self._now()
            out = encode_image(images, *args, **kwargs)
            self.calls.append((start, self._now()))
            return out
        return timed

    def end_batch(self, images):
        (start, end), reruns = self.calls[0], self.calls[1:]
        before = {layer: t - start for layer, t in self.starts.items()}
        self.batches.append((images, end - start, before, [e - s for s, e in reruns]))
        self.calls, self.starts = [], {}

    def close(self):
        for hook in self.hooks:
            hook.remove()

    def images_per_second(self, layers):
        """([images/s of each setting], images counted). `layers[i]`: setting i's pruned block,
        None where it runs unpruned; the others are those GridEncoder re-runs, in its order."""
        pruned = [i for i, layer in enumerate(layers) if layer is not None]
        counted = self.batches[1:] if len(self.batches) > 1 else self.batches
        images = sum(batch[0] for batch in counted)
        seconds = [0.0] * len(layers)
        for _, unpruned, before, reruns in counted:
            for i in range(len(layers)):
                seconds[i] += unpruned
            for i, rerun in zip(pruned, reruns):
                seconds[i] += before[layers[i]] - unpruned + rerun - before[0]
        return [images / s if s > 0 else None for s in seconds], images


def _pruned_layer(config, patches):
    """The block a setting prunes first (GridEncoder resumes there); None where it runs
    unpruned (the unpruned row, and k + m >= patches: GridEncoder gives those the unpruned
    output without a call of their own)."""
    if config is None or config.kept_patches >= patches:
        return None
    return config.stages[0].layer


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
        check_sweep_blocks(lists, depth, args.model)  # towers whose config gave no depth
        points = grid_points(lists["k_anchors"], lists["top_m"], lists["alpha"],
                             lists["score_norm"], lists["layer"], lists["controls"], depth,
                             patches, args.backend, args.seed, selections=lists["selection"],
                             mmr_lambdas=lists["mmr_lambda"], schedules=lists["schedule"])
        # The speed comes from the passes below, which GridEncoder makes anyway (_PassTimer).
        layers = [_pruned_layer(p.config, patches) for p in points]
        timer = None if args.no_speed else _PassTimer(
            tower_blocks(visual), {layer for layer in layers if layer is not None}, device)
        forward = model.encode_image if timer is None else timer.wrap(model.encode_image)
        encoder = GridEncoder(visual, [p.config for p in points], forward=forward)
        pred = [[] for _ in points]
        true = []
        with torch.no_grad():
            for images, target in dataloader:  # run_classification's loop, every point at once
                images = images.to(device)
                target = target.to(device)
                with torch.autocast(device, enabled=amp):
                    outputs = encoder(images)
                    logits = [100. * F.normalize(out.output, dim=-1) @ classifier
                              for out in outputs]
                if timer is not None:
                    timer.end_batch(len(images))
                true.append(target.cpu())
                for kept, batch_logits in zip(pred, logits):
                    kept.append(batch_logits.float().cpu())
                if state.bar is not None:
                    state.bar.update(len(images))
        true = torch.cat(true)
        metrics = []
        for logits in pred:
            metrics.append(_metrics(original_evaluate, zsc, torch.cat(logits), true, classifier,
                                    dataloader, device, amp))
        speeds, timed_images = [None] * len(points), None
        if timer is not None:
            timer.close()
            speeds, timed_images = timer.images_per_second(layers)
        state.result = _rows(points, metrics, speeds, visual, len(true), timed_images)
        raise _Done()

    return run_classification


def _metrics(original_evaluate, zsc, logits, target, classifier, dataloader, device, amp):
    """CLIP_benchmark's own metrics of these logits: its evaluate(), with the classifier and
    the logits handed in instead of computed."""
    with swapped([(zsc, "zero_shot_classifier", lambda *a, **k: classifier),
                  (zsc, "run_classification", lambda *a, **k: (logits, target))]):
        return original_evaluate(None, dataloader, None, None, None, device, amp=amp)


def _rows(points, metrics, speeds, visual, images, timed_images):
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
               "block": config.layer if config is not None else None,  # 0-based, as in eval
               "block_number": config.layer + 1 if config is not None else None,  # for people
               "num_blocks": depth,
               "k_anchors": config.k_anchors if config is not None else None,
               "top_m": config.top_m if config is not None else None,
               # [[block index, k, m], ...] of a schedule; [] for a single cut
               "schedule": [list(stage) for stage in config.schedule] if config else None,
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
        stages = [(s.layer, prefix + s.k_anchors + s.top_m) for s in config.stages] \
            if pruned else []
        row["relative_cost"] = relative_cost(tokens, kept, config.layer if pruned else 0, depth,
                                             width, mlp_width, stages=stages or None)
        row["mean_tokens"] = mean_tokens(tokens, stages, depth)
        row["images_per_s"] = _finite(speed) if speed is not None else None
        rows.append(row)
    return {"rows": rows, "metrics": names, "primary": primary, "images": images,
            "tokens": tokens, "num_blocks": depth,
            "speed_images": timed_images}


# ----- outputs ------------------------------------------------------------------------------

def write_outputs(output_dir, meta, result):
    """All four files, or none: they are written to a hidden folder inside output_dir, then
    renamed into place. Inside, not beside it: output_dir may be a mount point, and a rename
    cannot cross filesystems. A folder made here is removed again if the write fails."""
    rows = result["rows"]
    made = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=".tokenprune-sweep-", dir=output_dir)
        with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "images": result["images"], "tokens": result["tokens"],
                       "num_blocks": result["num_blocks"], "primary_metric": result["primary"],
                       "speed_images": result["speed_images"], "rows": rows},
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
        for name in OUTPUT_FILES:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


# ----- run ----------------------------------------------------------------------------------

def run_sweep(args, lists):
    """`tokenprune sweep` once its flags are checked (`lists`: the grid's, from
    commands/sweep.py's sweep_lists): the grid through CLIP_benchmark, then the files."""
    from copy import copy

    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from tqdm import tqdm

    from .evaluate import clip_benchmark_hooks  # imports clip_benchmark: seconds

    check_sweep_args(args)
    base = copy(args)
    for name in ("model", "pretrained", "dataset", "language"):
        setattr(base, name, one_value(args, name))
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
