"""Token merging and tokenprune side by side on timm ViT-B/16 at its real shapes (random weights,
224 px, 197 tokens): images/s and the mean tokens per block of
- the unpruned model;
- ToMe's own code (`tome.patch.timm`, with proportional attention) at several r;
- bench/token_merging.py, the baseline written from ToMe's paper, at the same r, with the
  largest difference of its logits from ToMe's (the two implement one algorithm: the difference
  shows whether the baseline is ToMe);
- tokenprune's single cut and schedules (issue 23).
All in one run, one process, the same batch of random images, each timed after a warm-up pass.

    python bench/tome_side_by_side.py --tome /tmp/ToMe [--batch 16] [--threads 2] [--out FILE]
    python bench/tome_side_by_side.py --device cuda --dtype float16 --batch 64 --out FILE

ToMe's code is under a non-commercial licence and is not on the package index: fetch it into a
temporary folder of your own (it is never copied into this project) and give that folder.
Without --tome, the ToMe rows are skipped with a line that says so.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (token_merging.py)
from token_merging import (apply_token_merging, merging_tokens,  # noqa: E402
                           remove_token_merging, schedule_tokens)

from tokenprune import remove_pruning, replace_last_block  # noqa: E402

TOKENS, BLOCKS = 197, 12
R_VALUES = (8, 13, 16)
STAGE_BLOCKS = (1, 4, 7, 10)  # block indices: blocks 2, 5, 8 and 11 counted from 1


def matched_schedule(r):
    """A schedule that follows merging at r: a stage every third block from block 2 (counted
    from 1), each keeping (with 10 anchors) what merging has left at the middle of its span, so
    that its mean tokens per block is at most merging's."""
    tokens = tome_tokens(r)
    return [(block, 10, tokens[block + 1] - 1 - 10) for block in STAGE_BLOCKS]


def prunings():
    """(name, schedule) rows: the issue's single cut (block 7 of 12, k=10, m=50), the schedules
    matched to each r, one more aggressive. Stages are (block index, k_anchors, top_m)."""
    rows = [("cut at block 7 (k10 m50)", [(6, 10, 50)])]
    rows += [(f"schedule matched to r={r}", matched_schedule(r)) for r in R_VALUES]
    rows.append(("schedule 1/4/7 (120, 60, 24)", [(0, 10, 110), (3, 10, 50), (6, 8, 16)]))
    return rows


def tome_tokens(r):
    return merging_tokens(TOKENS, BLOCKS, r)


def images_per_s(model, images, repeats):
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(images)  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            logits = model(images)
            sync()
            times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times), logits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tome", help="a folder holding ToMe's code (its `tome` package)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    images = torch.randn(args.batch, 3, 224, 224).to(args.device, dtype)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(args.device,
                                                                                 dtype)
    rows = []

    def row(name, kind, tokens, speed, **extra):
        rows.append(dict(name=name, kind=kind, images_per_s=speed,
                         mean_tokens_per_block=statistics.mean(tokens), **extra))
        print(f"{name:34s} {speed:7.2f} images/s  {statistics.mean(tokens):6.1f} tokens/block"
              + "".join(f"  {k} {v:.2e}" for k, v in extra.items()
                        if isinstance(v, float)), flush=True)

    base_speed, _ = images_per_s(model, images, args.repeats)
    row("unpruned", "unpruned", [TOKENS] * BLOCKS, base_speed)
    ours = {}
    for r in R_VALUES:
        state = apply_token_merging(model, r)
        speed, ours[r] = images_per_s(model, images, args.repeats)
        assert state["tokens"] == [t - min(r, (t - 1) // 2) for t in tome_tokens(r)]
        remove_token_merging(model)
        row(f"merging baseline r={r}", "merging baseline", tome_tokens(r), speed)
    for name, schedule in prunings():
        replace_last_block(model, schedule=schedule)
        speed, _ = images_per_s(model, images, args.repeats)
        remove_pruning(model)
        row(name, "tokenprune", schedule_tokens(TOKENS, BLOCKS, schedule), speed,
            schedule=[list(stage) for stage in schedule])
    if args.tome:
        sys.path.insert(0, os.path.abspath(args.tome))
        import tome
        tome_model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        tome_model.load_state_dict(model.state_dict())
        tome_model.to(args.device, dtype)
        tome.patch.timm(tome_model)
        for r in R_VALUES:
            tome_model.r = r
            speed, logits = images_per_s(tome_model, images, args.repeats)
            row(f"ToMe's code r={r}", "ToMe", tome_tokens(r), speed,
                max_logit_difference_from_baseline=float((logits - ours[r]).abs().max()))
    else:
        print("ToMe's own code: skipped (no --tome FOLDER; see this script's docstring)")
    if args.out:
        machine = (torch.cuda.get_device_name() if images.is_cuda
                   else f"{platform.machine()}, {os.cpu_count()} CPUs")
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine, "device": args.device, "threads": args.threads,
                "batch": args.batch, "torch": torch.__version__, "timm": timm.__version__,
                "dtype": args.dtype, "weights": "random",
                "command": " ".join(["python", "bench/tome_side_by_side.py"] + sys.argv[1:])}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
