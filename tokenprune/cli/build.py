"""Results files: the JSON that `tokenprune eval` writes and the CSV that `tokenprune build`
makes of them. Plain Python, no torch: `build` answers at once."""
import csv
import json
import math
import os

from .common import CLIError


def json_safe(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, at any depth: strict
    JSON parsers (JavaScript's JSON.parse) reject the bare NaN that Python's json writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _result_files(paths):
    for path in paths:
        if os.path.isdir(path):
            yield from sorted(os.path.join(path, name) for name in os.listdir(path)
                              if name.endswith(".json"))
        else:
            yield path


def _row(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CLIError(f"{path}: cannot read it as a JSON results file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise CLIError(f"{path}: not a results file of `tokenprune eval` or CLIP_benchmark "
                       "(it has no \"metrics\" object)")
    row = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    row["model_fullname"] = f"{row.get('model')} {row.get('pretrained')}"
    return row


def _cell(value):
    """A CSV cell: nested fields as JSON text, non-finite numbers (and null) as empty."""
    value = json_safe(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, allow_nan=False)
    return "" if value is None else value


def build_csv(paths, output):
    """CLIP_benchmark's `build`: one CSV row per results file (a folder stands for the .json
    files in it), the metrics as columns next to the other fields. Unlike CLIP_benchmark's, the
    columns keep the order in which they first appear, and nested fields (`pruning`,
    `throughput`) are JSON text instead of Python's dict text. Returns the number of rows."""
    rows = [_row(path) for path in _result_files(paths)]
    if not rows:
        raise CLIError(f"no .json results files in {', '.join(paths)}")
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    try:
        with open(output, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(value) for key, value in row.items()})
    except OSError as err:
        raise CLIError(f"--output {output}: cannot write the CSV ({err})") from err
    return len(rows)
