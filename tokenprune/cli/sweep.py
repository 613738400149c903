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

import torch

from ..patch import visual_tower
from ..config import CONTROLS, PruneConfig
from ..sweep import (GridEncoder, block_widths, grid_points, mean_tokens, relative_cost,
                     tower_blocks, tower_patches)
from ..towers import find_tower
from .common import SWEEP_OUTPUT_FILES as OUTPUT_FILES
from .common import (SHIPPED_MODELS, CLIError, check_model, check_sweep_before_loading,
                     check_sweep_blocks, check_tokenizer, one_value, quiet_warnings,
                     schedule_text, sweep_lists)
from .swap import swapped


def check_sweep_args(args):
    """Everything that can be checked before a model loads; returns the checked lists."""
    from clip_benchmark.datasets.builder import get_dataset_default_task

    lists = sweep_lists(args)
    check_sweep_before_loading(args, lists)  # also checked before this module was imported
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
    return lists


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

def _weights(meta):
    """The weights as CLIP_benchmark names them in its output file: a file's base name, or the tag."""
    return os.path.basename(meta["pretrained"]) if os.path.isfile(meta["pretrained"]) \
        else meta["pretrained"]


def _label(row):
    schedule = f"schedule {schedule_text(row['schedule'])}, " if row.get("schedule") else ""
    if row["kind"] == "mmr":
        return f"{schedule}mmr, k={row['k_anchors']}, m={row['top_m']}, lambda={row['mmr_lambda']}"
    if row["kind"] != "score":  # cls, random: only k + m counts
        return f"{schedule}{row['kind']}, k+m={row['k_anchors'] + row['top_m']}"
    return (f"{schedule}k={row['k_anchors']}, m={row['top_m']}, alpha={row['alpha']}, "
            f"{row['score_norm']}")


def _placed_label(row):
    """_label with where the row prunes: its schedule, or its block."""
    if row.get("schedule"):
        return _label(row)
    return f"block {_block_name(row['block'], row['num_blocks'])}, {_label(row)}"



def _budget_key(row):
    """Where a row's controls are: its (last) block, kept tokens and, for a schedule, every
    stage's (block, patches kept)."""
    shape = tuple((layer, k + m) for layer, k, m in row.get("schedule") or ())
    return row["block"], row["kept_tokens"], shape


def _block_name(block, blocks):
    """A block for people: counted from 1, its 0-based index beside it ("12 of 12 (index 11)")."""
    return f"{block + 1} of {blocks} (index {block})"


def _is_seed_score(row):
    """A pruned row of the seed's own selection (any alpha, score_norm)."""
    return row["kind"] == "score" and row["pruned"]


def _method(row):
    """What a row's selection is called in the sweep's findings: its kind (a control), or the
    grid's other selection with its parameter ("mmr with lambda 0.7")."""
    if row.get("mmr_lambda") is not None:
        return f"{row['kind']} with lambda {row['mmr_lambda']}"
    return row["kind"]


def noise(p, n):
    """The margin a difference must pass to count as more than sampling noise: two binomial
    standard errors of a value p measured on n images, 2 sqrt(p (1 - p) / n), and never less
    than one image (1 / n)."""
    return max(1 / n, 2 * math.sqrt(max(p * (1 - p), 0.0) / n))


# The plot's error bars: Wilson score intervals at 95 % (z = 1.96), which stay inside [0, 1]
# and keep their coverage near 0 and 1, where the normal approximation does not.
Z_95 = 1.96


def wilson_interval(p, n, z=Z_95):
    """(low, high) of the binomial proportion p observed on n images."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _budgets(result):
    """{(block, kept tokens): (the seed's score rows, the other rows)} of the pruned rows with a
    value of the primary metric."""
    primary = result["primary"]
    budgets = {}
    for row in result["rows"][1:]:
        if row["pruned"] and row[primary] is not None:
            score, others = budgets.setdefault(_budget_key(row), ([], []))
            (score if _is_seed_score(row) else others).append(row)
    return budgets


def simpler_choice_findings(result):
    """One line per budget (block, kept tokens) where a control, or another selection of the
    grid, keeps more of the primary metric than every setting of the seed's score, by more
    than the noise. Empty when there is none.

    The noise (`noise`): twice the binomial standard error of the best score setting's value p
    over the n images, 2 sqrt(p (1 - p) / n), and never less than one image (1 / n). The rows are
    measured on the same images, so their difference varies less than two independent
    estimates would (standard error at most sqrt(2) sqrt(p (1 - p) / n) when p is close for
    both): a difference above the margin is not sampling noise. The sweep runs the random
    control with one seed, so its spread over seeds is not known here (bench/fidelity.py
    measures it on the shipped models: about one to two points)."""
    primary, n = result["primary"], result["images"]
    lines = []
    for (block, kept, _), (score, others) in sorted(_budgets(result).items()):
        if not score or not others or not n:
            continue
        best = max(score, key=lambda r: r[primary])
        p = best[primary]
        margin = noise(p, n)
        winners = sorted((r for r in others if r[primary] - p > margin),
                         key=lambda r: -r[primary])
        if not winners:
            continue
        top, also = winners[0], winners[1:]
        line = (f"at block {_block_name(block, result['num_blocks'])}, {kept} tokens, {_method(top)} "
                f"keeps {100 * (top[primary] - p):.1f} points more {primary} than the best score "
                f"setting ({_label(best)}: {p:.4f} against {top[primary]:.4f}; n = {n}, "
                f"one image = {100 / n:.2g} points, noise {100 * margin:.1f} points)")
        if also:
            line += "; so do " + ", ".join(f"{_method(r)} (+{100 * (r[primary] - p):.1f})"
                                          for r in also)
        lines.append(line)
    return lines


def noise_range(result):
    """The noise of every budget where the seed's score meets a control or another selection,
    as the findings use it: "9.0 points" or "8.8 to 9.0 points"; None when there is none."""
    primary, n = result["primary"], result["images"]
    margins = sorted(100 * noise(max(r[primary] for r in score), n)
                     for score, others in _budgets(result).values() if score and others and n)
    if not margins:
        return None
    low, high = f"{margins[0]:.1f}", f"{margins[-1]:.1f}"
    return f"{low} points" if low == high else f"{low} to {high} points"


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
             "of the image tower's blocks relative to unpruned (see docs/commands.md).",
             "",
             f"| block | kept tokens | best setting | {primary} | retained | cls control | "
             f"random control | unpruned | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    # The grid's own settings (the seed's score, mmr), not the controls: per budget, the best
    # setting of each selection, the seed's score first.
    budgets = {}
    for row in rows[1:]:
        if row["kind"] not in CONTROLS and row["pruned"]:
            kinds = budgets.setdefault(_budget_key(row), {})
            kinds.setdefault(row["kind"], []).append(row)
    for (block, kept, shape), kinds in sorted(budgets.items()):
        controls = {r["kind"]: r[primary] for r in rows
                    if r["kind"] in CONTROLS and _budget_key(r) == (block, kept, shape)}
        control = lambda kind: fmt(controls[kind]) if kind in controls else "-"  # noqa: E731
        for kind in sorted(kinds, key=lambda kind: kind != "score"):
            best = max(kinds[kind],
                       key=lambda r: -math.inf if r[primary] is None else r[primary])
            lines.append(f"| {_block_name(block, result['num_blocks'])} | {kept} | "
                         f"{_label(best)} | {fmt(best[primary])} | "
                         f"{fmt(best[f'{primary}_retained'])} | {control('cls')} | "
                         f"{control('random')} | {fmt(unpruned[primary])} | "
                         f"{best['relative_cost']:.3f} |")
    skipped = [r for r in rows[1:] if not r["pruned"]]
    if skipped:
        lines += ["", f"Not pruned (k + m >= {result['tokens'] - 1} patches, the unpruned "
                      f"model's numbers): {'; '.join(_label(r) for r in skipped)}."]
    findings = simpler_choice_findings(result)
    margins = noise_range(result)
    here = f": here {margins} at n = {result['images']} images" if margins else ""
    lines += ["", "## Where a simpler choice wins", ""]
    lines += [f"- {line}." for line in findings] or [
        "At no budget does a control or another selection keep more than the best setting of "
        "the seed's score by more than the noise (two binomial standard errors of the best "
        f"score setting's value p, 2 sqrt(p (1 - p) / n), at least one image{here})."]
    winners = schedule_winners(result)
    if winners:
        lines += ["", "## Which cut or schedule wins at each budget", "",
                  "The budget is the mean tokens per block over the tower's "
                  f"{result['num_blocks']} blocks (a pruned block counted at the tokens it "
                  f"keeps); at each budget, the best {primary} among the settings and controls "
                  "that run on at most that many (docs/commands.md).", ""]
        lines += [f"- {line}." for line in winners]
    lines += ["", f"The plot's error bars are 95 % Wilson intervals for {primary} as a "
                  f"proportion of the {result['images']} images."]
    return "\n".join(lines) + "\n"


def schedule_winners(result):
    """One line per budget, the mean tokens per block of some pruned row (ascending): the row
    with the best primary metric among those that run on at most that many tokens per block
    (of equal metric, the cheaper), and the next best with its distance, said to be within the
    noise (`noise`) where it is. Rows without a mean_tokens (older results) are left out."""
    primary, n = result["primary"], result["images"]
    rows = [r for r in result["rows"][1:] if r["pruned"] and r[primary] is not None
            and r.get("mean_tokens") is not None]
    lines = []
    for budget in sorted({r["mean_tokens"] for r in rows}):
        best, *rest = sorted((r for r in rows if r["mean_tokens"] <= budget),
                             key=lambda r: (-r[primary], r["mean_tokens"]))
        line = (f"at most {budget:.1f} tokens per block: {_placed_label(best)} "
                f"({best[primary]:.4f} {primary}, {best['mean_tokens']:.1f} tokens per block)")
        if rest:
            gap = best[primary] - rest[0][primary]
            within = ", within the noise" if n and gap <= noise(best[primary], n) else ""
            line += (f"; next: {_placed_label(rest[0])} ({rest[0][primary]:.4f}, "
                     f"{100 * gap:.1f} points less{within})")
        lines.append(line)
    return lines


# The plot: a colour per pruned block; within a block, each series its own line style and
# marker; markers and lines thinner with each series drawn, so that series with equal values
# still show one around the other. The controls wear their block's colour.
LINE_STYLES = ("-", "--", "-.", ":")
SCORE_MARKERS = ("o", "^", "D", "v", "P", "<", ">", "h")
CONTROL_MARKERS = {"cls": "s", "random": "X"}
MARKER_SIZES = (13.0, 4.0)  # the first series drawn, the last
LINE_WIDTHS = (4.0, 1.0)


def _place(row):
    """Where a row prunes, for the plot: its schedule's blocks, or (its block,)."""
    return tuple(stage[0] for stage in row["schedule"]) if row.get("schedule") else (row["block"],)


def _place_name(place, depth):
    if len(place) == 1:
        return f"block {_block_name(place[0], depth)}"
    return f"blocks {', '.join(str(block + 1) for block in place)} of {depth} (a schedule)"


def plot_figure(meta, result):
    """The accuracy-against-kept-tokens figure (matplotlib, not yet saved)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    rows, primary, depth = result["rows"], result["primary"], result["num_blocks"]
    n = result.get("images")
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # A "block" here is where a row prunes: (its block,), or a schedule's stages' blocks.
    blocks = sorted({_place(r) for r in rows[1:] if r["kind"] in ("score", "mmr") + CONTROLS})
    series = {}  # (block, kind, alpha or mmr_lambda, score_norm) -> rows, in drawing order
    for block in blocks:
        for row in rows[1:]:
            if _place(row) == block and row["kind"] == "score":
                series.setdefault((block, "score", row["alpha"], row["score_norm"]),
                                  []).append(row)
            elif _place(row) == block and row["kind"] == "mmr":
                series.setdefault((block, "mmr", row["mmr_lambda"], None), []).append(row)
        for kind in CONTROLS:
            members = [r for r in rows if r["kind"] == kind and _place(r) == block]
            if members:
                series[(block, kind, None, None)] = members

    def shrinking(sizes, i):  # from sizes[0] for the first series to sizes[1] for the last
        return sizes[0] - (sizes[0] - sizes[1]) * i / max(1, len(series) - 1)

    budgets = [r["kept_tokens"] for r in rows[1:] if r["pruned"]] or [0]
    # One budget (the smallest sweep): matplotlib would span the single x by +-0.66 %, which
    # reads as 16.985 to 17.015; give it a tenth of the tokens either side instead.
    fewest, most = min(budgets), max(budgets)
    single = fewest == most
    pad = max(1.0, 0.1 * result["tokens"]) if single else 0.0
    # Bars a little to the side of each other: a fraction of the width the axes will show.
    dodge = 0.006 * ((most - fewest) or 2 * pad)
    in_block = {}
    for i_series, ((block, kind, alpha, norm), members) in enumerate(series.items()):
        colour = colours[blocks.index(block) % len(colours)]
        i = in_block[block] = in_block.get(block, -1) + 1
        members = sorted(members, key=lambda r: r["kept_tokens"])
        if kind in ("score", "mmr"):
            marker, linestyle = SCORE_MARKERS[i % len(SCORE_MARKERS)], \
                LINE_STYLES[i % len(LINE_STYLES)]
            setting = f"alpha {alpha}, {norm}" if kind == "score" else f"mmr, lambda {alpha}"
            label = f"{_place_name(block, depth)}, {setting}"
        else:
            marker, linestyle = CONTROL_MARKERS[kind], ":"
            seed = f" (seed {members[0]['seed']})" if kind == "random" else ""
            label = f"{kind} control{seed}, {_place_name(block, depth)}"
        x, y = [r["kept_tokens"] for r in members], [r[primary] for r in members]
        ax.plot(x, y, color=colour, marker=marker, linestyle=linestyle,
                linewidth=shrinking(LINE_WIDTHS, i_series),
                markersize=shrinking(MARKER_SIZES, i_series), markerfacecolor=colour,
                markeredgecolor="black", markeredgewidth=0.6, alpha=0.9, label=label)
        measured = [(at, value) for at, value in zip(x, y) if value is not None]
        if n and measured:
            # Each series' bars a little to the side of the last one's, so that bars at the
            # same budget stay apart; the points themselves stay at their budget.
            side = (i_series - (len(series) - 1) / 2) * dodge
            low, high = zip(*(wilson_interval(value, n) for _, value in measured))
            ax.errorbar([at + side for at, _ in measured], [value for _, value in measured],
                        yerr=[[value - lo for (_, value), lo in zip(measured, low)],
                              [hi - value for (_, value), hi in zip(measured, high)]],
                        fmt="none", ecolor=colour, elinewidth=1.0, capsize=0, alpha=0.5)
    if rows[0][primary] is not None:
        ax.axhline(rows[0][primary], color="black", linestyle="--",
                   label=f"unpruned ({result['tokens']} tokens)")
        if n:
            ax.axhspan(*wilson_interval(rows[0][primary], n), color="black", alpha=0.07,
                       linewidth=0)
    if single:
        ax.set_xlim(fewest - pad, most + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # token counts: whole numbers
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel(f"tokens kept after the pruned block (of {result['tokens']})")
    ax.set_ylabel(f"{primary} on {meta['dataset']}")
    bars = ("; bars and band: 95 % Wilson intervals" if n else "")
    title = ax.set_title(f"{primary} against kept tokens: {meta['model']} ({_weights(meta)}) "
                         f"on {meta['dataset']}, {result['images']} images{bars}", fontsize=10)
    ax.grid(alpha=0.3)
    # Beside the axes, so that it never covers a point.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _fit_title(fig, title)
    return fig


def _fit_title(fig, title):
    """Wrap the title (centred over the axes) onto as many lines as keep it inside the figure:
    a long one ran off its left edge."""
    import textwrap
    text = title.get_text()
    for lines in range(1, 6):  # lines of about equal length, as few as fit
        title.set_text(textwrap.fill(text, math.ceil(len(text) / lines) + 4))
        fig.tight_layout()
        box = title.get_window_extent(fig.canvas.get_renderer())
        if box.x1 <= fig.bbox.x1 and box.x0 >= fig.bbox.x0:
            return


def plot(meta, result, path):
    import matplotlib.pyplot as plt
    fig = plot_figure(meta, result)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


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

def run_sweep(args):
    """`tokenprune sweep`: check the flags, run the grid through CLIP_benchmark, write."""
    from copy import copy

    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from tqdm import tqdm

    from .evaluate import clip_benchmark_hooks  # imports clip_benchmark: seconds

    lists = check_sweep_args(args)
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
