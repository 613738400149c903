"""Which OpenCLIP architectures tokenprune can prune: build each image tower, prune, run it.

    python tools/coverage.py                       # every open_clip.list_models() architecture
    python tools/coverage.py ViT-B-16 EVA02-B-16   # some of them
    python tools/coverage.py --report-only         # rewrite the tables from the saved results

For every architecture: the image tower alone (the text tower plays no part in pruning, and
some text towers need the Hugging Face hub) is first built on the meta device, to count its
parameters and to try `replace_last_block` on its structure: a refused tower is recorded as
such and never built. The others are built with random weights, in bfloat16 above FP32_LIMIT
parameters, not at all above BF16_LIMIT (the reason is recorded). Then `replace_last_block` at the last
block (k_anchors=10, top_m=50, fewer when the tower has fewer patches, so that pruning
applies) and one forward pass on one random image at the tower's own size; supported means
that forward ran and pruned (the kept indices have the expected shape).

Each architecture runs in a worker process, one after the other, with a time limit
(--timeout seconds each); a worker that times out or dies is replaced and the architecture is
recorded as such. Results go to tools/coverage_results.jsonl (one JSON line per
architecture, appended as they come, so an interrupted run resumes) and the tables to
tools/COVERAGE.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "coverage_results.jsonl")
TABLES = os.path.join(HERE, "COVERAGE.md")
FP32_LIMIT = 2.0e9   # parameters; above this the tower is built in bfloat16 (8 GB in float32)
BF16_LIMIT = 4.5e9   # above this it is not built: 9+ GB in bfloat16 on a 24 GiB, 2-core machine


def tower_kind(visual):
    from tokenprune.towers import describe
    return describe(visual)


def try_one(name):
    """The record of one architecture (a dict), run inside a worker."""
    import open_clip
    import torch
    from open_clip.model import _build_vision_tower

    from tokenprune import pruned_block, replace_last_block
    from tokenprune.towers import UnsupportedModelError, find_tower

    record = {"model": name}
    cfg = open_clip.get_model_config(name)
    vision_cfg, embed_dim = cfg["vision_cfg"], cfg["embed_dim"]
    # The structure alone, on the meta device: the parameter count, and whether tokenprune
    # takes the tower at all (refused towers are never built).
    with torch.device("meta"):
        meta = _build_vision_tower(embed_dim, vision_cfg)
    params = sum(p.numel() for p in meta.parameters())
    record.update(tower=tower_kind(meta), params=params)
    try:
        tower = find_tower(meta)
        record["family"] = tower.family.name
        patches = tower.num_patches
        k, m = min(10, max(1, patches // 4)), min(50, patches // 2)
        replace_last_block(meta, k_anchors=k, top_m=m)
    except UnsupportedModelError as err:
        record.update(status="refused", why=str(err))
        return record
    del meta
    if params > BF16_LIMIT:
        record.update(status="not built", why=f"{params / 1e9:.1f}B parameters: over "
                      f"{BF16_LIMIT / 1e9:.0f}B, too big for this machine even in bfloat16")
        return record
    dtype = torch.float32 if params <= FP32_LIMIT else torch.bfloat16
    record["dtype"] = str(dtype).replace("torch.", "")
    start = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        visual = _build_vision_tower(embed_dim, vision_cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    record["build_s"] = round(time.perf_counter() - start, 1)
    tower = find_tower(visual)
    record.update(family=tower.family.name, num_prefix=tower.num_prefix,
                  class_token=tower.class_token, patches=patches, k_anchors=k, top_m=m,
                  depth=len(tower.blocks))
    replace_last_block(visual, k_anchors=k, top_m=m)
    size = getattr(visual, "image_size", None) or (224, 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(1, 3, *size, dtype=dtype)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = visual(images)
    except Exception as err:  # noqa: BLE001 - recorded, not hidden
        record.update(status="failed", why=f"forward: {type(err).__name__}: {str(err)[:200]}")
        return record
    record["forward_s"] = round(time.perf_counter() - start, 1)
    keep = pruned_block(visual).last_keep_idx
    out = out[0] if isinstance(out, tuple) else out
    if keep is None or tuple(keep.shape) != (1, k + m):
        record.update(status="failed", why=f"kept indices {None if keep is None else tuple(keep.shape)}")
    else:
        record.update(status="pruned", output=list(out.shape),
                      tokens=f"{tower.num_prefix + patches} -> {tower.num_prefix + k + m}")
    return record


def worker(names, status_file):
    """Run try_one on each name; append each record to RESULTS as it finishes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in names:
        with open(status_file, "w") as f:
            f.write(name)
        try:
            record = try_one(name)
        except Exception as err:  # noqa: BLE001 - recorded, not hidden
            record = {"model": name, "status": "not built",
                      "why": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")


def load_results():
    records = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    records[record["model"]] = record
    return records


def run_all(names, timeout):
    status_file = os.path.join(tempfile.gettempdir(), f"tokenprune-coverage-{os.getpid()}")
    todo = [n for n in names if n not in load_results()]
    while todo:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", status_file, *todo])
        current, since = None, time.monotonic()
        while proc.poll() is None:
            time.sleep(1)
            try:
                with open(status_file) as f:
                    name = f.read().strip()
            except OSError:
                name = None
            if name != current:
                current, since = name, time.monotonic()
                print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
            elif current and time.monotonic() - since > timeout:
                proc.kill()
                proc.wait()
                with open(RESULTS, "a") as f:
                    f.write(json.dumps({"model": current, "status": "not built",
                                        "why": f"over the {timeout} s time limit"}) + "\n")
        done = load_results()
        if proc.returncode not in (0, None) and current and current not in done:
            with open(RESULTS, "a") as f:
                f.write(json.dumps({"model": current, "status": "not built",
                                    "why": f"the worker died (exit status {proc.returncode}, "
                                           "likely out of memory)"}) + "\n")
        todo = [n for n in todo if n not in load_results()]


# Why a refused tower type cannot be pruned, for the table.
WHY_REFUSED = {
    "ModifiedResNet": "convolutional: no token sequence to prune",
    "ConvNeXt": "convolutional: no token sequence to prune",
    "FastVit": "convolutional / reparameterised token mixers on a 2-D grid: no token sequence",
    "SwinTransformer": "windowed attention and patch merging need the full token grid",
    "VisionTransformerRelPos": "a relative position bias over the full token grid inside every "
                               "block's attention",
}


def family_of(record):
    tower = record.get("tower", "?")
    return record.get("family") or tower


def short_reason(record):
    why = record.get("why", "")
    if record["status"] == "refused":
        if "has an image tower of type" in why:
            tower = why.split("of type ", 1)[1].split(";")[0]
            because = [text for name, text in WHY_REFUSED.items() if name in tower]
            return f"refused ({tower})" + (f": {because[0]}" if because else "")
        return why.split(";")[0]
    return why


def write_tables(records, names):
    groups = defaultdict(list)
    for name in names:
        if name in records:
            record = records[name]
            groups[(family_of(record), record["status"], short_reason(record))].append(record)
    counts = defaultdict(int)
    for record in records.values():
        if record["model"] in names:
            counts[record["status"]] += 1
    lines = ["# Which OpenCLIP architectures tokenprune prunes", "",
             f"Written by `python tools/coverage.py` (open_clip {version('open_clip_torch')}, "
             f"timm {version('timm')}, torch {version('torch')}): {len(names)} architectures; "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".", "",
             "| tower family | models | supported | why |", "|---|---|---|---|"]
    order = {"pruned": 0, "refused": 1, "failed": 2, "not built": 3}
    for (family, status, why), rows in sorted(groups.items(), key=lambda kv: (order.get(kv[0][1], 9), kv[0][0])):
        models = ", ".join(r["model"] for r in rows)
        supported = {"pruned": "yes", "refused": "no", "failed": "no (bug)", "not built": "?"}[status]
        if status == "pruned":
            bf16 = [r["model"] for r in rows if r.get("dtype") == "bfloat16"]
            why = ("pruned at the last block, one forward pass ran" +
                   (f" (built in bfloat16: {', '.join(bf16)})" if bf16 else ""))
        lines.append(f"| {family} | {len(rows)}: {models} | {supported} | {why} |")
    lines += ["", "## Per architecture", "",
              "| model | tower | parameters | status | tokens | dtype | note |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        r = records.get(name)
        if r is None:
            lines.append(f"| {name} | | | not run | | | |")
            continue
        params = f"{r['params'] / 1e6:.0f}M" if "params" in r else ""
        note = "" if r["status"] == "pruned" else short_reason(r)
        lines.append(f"| {name} | {r.get('tower', '')} | {params} | {r['status']} | "
                     f"{r.get('tokens', '')} | {r.get('dtype', '')} | {note} |")
    with open(TABLES, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines[: lines.index("## Per architecture")])


def version(dist):
    from importlib.metadata import version as v
    return v(dist)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="architectures (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per architecture")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.models, args.worker)
    import open_clip
    names = args.models or open_clip.list_models()
    if not args.report_only:
        run_all(names, args.timeout)
    print(write_tables(load_results(), names))


if __name__ == "__main__":
    main()
