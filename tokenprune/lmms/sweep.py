"""The engine of `tokenprune lmms-sweep`: the unpruned model and a list of pruning settings on the
same lmms-eval tasks, one lmms-eval run each, then one table and one plot.

Each run is `python -m lmms_eval` in a process of its own (so that its peak memory is its own),
writing into OUT/runs/NAME/: lmms-eval's results, its log (lmms_eval.log) and our model's record
(record.json: the settings, image tokens per image, time to first token, peak memory). A run
whose results and record are both there is done and not run again, so a stopped sweep goes on
where it stopped. lmms-eval exits 0 even when a run fails, so a run counts as done only when
its results file exists.
"""
import csv
import glob
import json
import math
import os
import subprocess
import sys
import time

from . import PRUNING_ARGUMENTS, split_pruning_arguments

UNPRUNED = "unpruned"
COLUMNS = ("setting", "image_tokens_per_image", "time_to_first_token_s", "peak_memory_mib")


def parse_setting(model_id, text):
    """'k_anchors=8,top_m=24' -> {'k_anchors': 8, 'top_m': 24}, parsed and checked as lmms-eval
    would hand them to the model; anything but a pruning argument is refused."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in PRUNING_ARGUMENTS:
            raise ValueError(f"--setting {text!r}: {item!r} is not NAME=VALUE with NAME one of "
                             f"{', '.join(PRUNING_ARGUMENTS)}")
        values[name] = _lmms_value(value)
    if not values:
        raise ValueError(f"--setting {text!r} holds no pruning argument")
    try:
        return split_pruning_arguments(model_id, values)[0]
    except SystemExit as err:
        raise ValueError(f"--setting {text!r}: {err.code}") from None


def _lmms_value(text):
    # As lmms-eval's model_args parser reads a value (utils.handle_arg_string).
    if text.isnumeric():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def run_name(pruning):
    """The folder name of a setting: 'unpruned' or e.g. 'k_anchors-8_top_m-24'."""
    if not pruning:
        return UNPRUNED
    return "_".join(f"{k}-{v}" for k, v in pruning.items())


def results_file(run_dir):
    found = sorted(glob.glob(os.path.join(run_dir, "**", "*_results.json"), recursive=True))
    return found[-1] if found else None


def is_done(run_dir):
    return (results_file(run_dir) is not None
            and os.path.isfile(os.path.join(run_dir, "record.json")))


def run_one(model_id, model_args, tasks, pruning, run_dir, batch_size, extra_args):
    """One lmms-eval run of one setting; raises RuntimeError naming its log if it failed."""
    os.makedirs(run_dir, exist_ok=True)
    record = os.path.join(run_dir, "record.json")
    if os.path.exists(record):
        os.remove(record)  # a record left by a failed run would look like a finished one
    arguments = ",".join([model_args] * bool(model_args)
                         + [f"{k}={v}" for k, v in pruning.items()]
                         + [f"tokenprune_record={record}"])
    command = [sys.executable, "-m", "lmms_eval", "--model", model_id, "--model_args", arguments,
               "--tasks", tasks, "--batch_size", str(batch_size), "--output_path", run_dir,
               "--log_samples", *extra_args]
    log = os.path.join(run_dir, "lmms_eval.log")
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not is_done(run_dir):
        raise RuntimeError(f"the lmms-eval run of {run_name(pruning)} failed (exit status "
                           f"{done.returncode}, no results): see {log}")


def read_row(name, run_dir):
    """The table row of a finished run: its record's measurements and every task score."""
    with open(os.path.join(run_dir, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    with open(results_file(run_dir), encoding="utf-8") as f:
        results = json.load(f)["results"]
    row = {"setting": name, **{c: record.get(c) for c in COLUMNS[1:]}}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and "_stderr" not in metric):
                row[f"{task}/{metric}"] = value
    return row


def run_sweep(model_id, model_args, tasks, settings, out_dir, batch_size=1, extra_args=(),
              say=print):
    """The unpruned model, then each of `settings` (dicts of pruning arguments), on `tasks`;
    writes OUT/results.csv, results.json, summary.md and score_vs_image_tokens.png. Returns the
    rows."""
    runs = [{}] + [s for s in settings if s]
    rows = []
    for number, pruning in enumerate(runs, 1):
        name = run_name(pruning)
        run_dir = os.path.join(out_dir, "runs", name)
        if is_done(run_dir):
            say(f"[{number}/{len(runs)}] {name}: done earlier, not run again")
        else:
            say(f"[{number}/{len(runs)}] {name}: running lmms-eval ...")
            start = time.perf_counter()
            run_one(model_id, model_args, tasks, pruning, run_dir, batch_size, list(extra_args))
            say(f"[{number}/{len(runs)}] {name}: {time.perf_counter() - start:.0f} s")
        rows.append(read_row(name, run_dir))
    write_outputs(rows, out_dir, model_id, tasks)
    return rows


def score_columns(rows):
    return [c for c in dict.fromkeys(k for row in rows for k in row) if "/" in c]


def write_outputs(rows, out_dir, model_id, tasks):
    columns = list(COLUMNS) + score_columns(rows)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"model": model_id, "tasks": tasks, "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(rows, model_id, tasks))
    plot(rows, os.path.join(out_dir, "score_vs_image_tokens.png"))


def _cell(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_markdown(rows, model_id, tasks):
    columns = list(COLUMNS) + score_columns(rows)
    heads = {"setting": "setting", "image_tokens_per_image": "image tokens per image",
             "time_to_first_token_s": "time to first token (s)",
             "peak_memory_mib": "peak memory (MiB)"}
    lines = [f"# lmms-eval sweep: {model_id} on {tasks}", "",
             "Scores as lmms-eval reports them. Image tokens per image: what the language model "
             "received. Time to first token: the mean over batches of the time from `generate` "
             "to the end of its first forward pass. Peak memory: allocated on a CUDA device, "
             "else the process's peak resident memory (weights included).", "",
             "| " + " | ".join(heads.get(c, c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for column in score_columns(rows):
        points = sorted((row["image_tokens_per_image"], row[column], row["setting"])
                        for row in rows
                        if row.get(column) is not None and row["image_tokens_per_image"])
        if not points:
            continue
        line, = axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=column)
        for x, y, setting in points:
            if setting == UNPRUNED:
                axes.plot([x], [y], "*", markersize=14, color=line.get_color())
    axes.set_xlabel("image tokens per image (the language model's input)")
    axes.set_ylabel("score")
    axes.set_title("score against image tokens (star: unpruned)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
