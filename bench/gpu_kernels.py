"""The Triton selection kernels on one GPU: correctness against the reference, then timings.

    python bench/gpu_kernels.py [--out DIR]        on an H100/H200, under ~2 minutes
    python bench/gpu_kernels.py --cpu-smoke        tiny shapes in Triton's CPU interpreter

1. Correctness in float32, float16 and bfloat16 at a few shapes, ViT-L/14-336 included
   (B=256, T=577, C=1024, H=16): the share of images whose keep_idx equals the reference's, the
   mean overlap of the kept sets, and the largest error of the CLS row, I and D against SPEC's
   formulas evaluated in float32 on the same inputs.
2. Timings at ViT-L/14-336 in float16 on random normal data (triton.testing.do_bench, median):
   select_and_gather against the PyTorch reference (select_reference + gather_kept), each
   kernel alone, and a few launch configurations of the importance kernel.
3. The memory floor: the bytes of Q, K and X read once, over the bandwidth of a large
   device-to-device copy measured here (read + write bytes counted).
Prints a markdown table at the end (and writes it, with a JSON, under --out).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

import tokenprune.kernels as K  # noqa: E402  (bench/gpu_check.sh sets up the import path)
from tokenprune.reference import select_reference  # noqa: E402
from tokenprune.selection import gather_kept  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
K_ANCHORS, TOP_M = 10, 50

# (name, B, T, C, H): what each correctness shape covers.
CHECK_SHAPES = [
    ("ViT-B/32-224", 16, 50, 768, 12),       # T=50 below every block size, d=64
    ("ViT-H/14-224", 16, 257, 1280, 16),     # d=80: head dim padded to 128 with masks
    ("ViT-L/14-336", 256, 577, 1024, 16),    # the target shape
]
TARGET = ("ViT-L/14-336", 256, 577, 1024, 16)
IMPORTANCE_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3),
                      (256, 64, 8, 3), (64, 64, 4, 4)]
if SMOKE:
    CHECK_SHAPES = [("tiny-50", 2, 50, 128, 2), ("tiny-d80", 1, 65, 160, 2)]
    TARGET = ("tiny-50", 2, 50, 128, 2)
    IMPORTANCE_CONFIGS = IMPORTANCE_CONFIGS[:2]
    K_ANCHORS, TOP_M = 4, 12


def log(*args):
    print(*args, flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms=200):
    """Median milliseconds per call."""
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()  # the interpreter: a couple of wall-clock runs are enough to prove the path works
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def make_inputs(B, T, C, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, T, C, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)
    qkv = torch.randn(B, T, 3 * C, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)
    return x, qkv


def reference_scores(x, qkv, H, anchors, chunk=32):
    """SPEC steps 0-3 in float32 for the given anchors: (CLS row, I, D), (B, T) each; a few
    images at a time so that the (chunk, H, T, T) attention stays small."""
    outs = []
    for s in range(0, x.shape[0], chunk):
        xb, qb, ab = x[s:s + chunk], qkv[s:s + chunk], anchors[s:s + chunk].long()
        B, T, C = xb.shape
        d = C // H
        q, k, _ = qb.float().view(B, T, 3, H, d).unbind(dim=2)
        P = (torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5).softmax(dim=-1).mean(dim=1)
        imp = P.gather(2, ab[:, None, :].expand(B, T, -1)).mean(dim=-1)
        xf = xb.float()
        unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        cos = unit @ unit.gather(1, ab[..., None].expand(-1, -1, C)).transpose(1, 2)
        outs.append((P[:, 0], imp, 1 - cos.amax(dim=-1)))
        del P, q, k
    return [torch.cat(parts) for parts in zip(*outs)]


def check(name, B, T, C, H, dtype_name):
    dtype = DTYPES[dtype_name]
    x, qkv = make_inputs(B, T, C, dtype)
    keep_idx, x_kept, qkv_kept = K.select_and_gather(x, qkv, H, K_ANCHORS, TOP_M, 0.5, "none")
    want = select_reference(x, qkv, H, K_ANCHORS, TOP_M, 0.5, "none")
    same = (keep_idx == want).all(dim=-1).float().mean().item()
    # Kept-set overlap: each kept index of one side found in the other (both are sorted).
    overlap = (keep_idx[:, :, None] == want[:, None, :]).any(-1).float().mean().item()
    x_ref, qkv_ref = gather_kept(x, qkv, keep_idx)
    rows_exact = bool(torch.equal(x_kept, x_ref) and torch.equal(qkv_kept, qkv_ref))
    in_range = bool(((keep_idx >= 1) & (keep_idx <= T - 1)).all())
    s = K.selection_scores(x, qkv, H, K_ANCHORS)
    cls_row, imp, div = reference_scores(x, qkv, H, s["anchor_idx"])
    err = {key: (s[key][:, lo:] - ref[:, lo:]).abs().max().item()
           for key, ref, lo in (("cls_attn", cls_row, 0), ("importance", imp, 1),
                                ("diversity", div, 1))}
    row = dict(shape=name, B=B, T=T, C=C, H=H, dtype=dtype_name, same_keep_idx=same,
               kept_overlap=overlap, kept_rows_exact=rows_exact, in_range=in_range,
               max_err_cls=err["cls_attn"], max_err_I=err["importance"],
               max_err_D=err["diversity"])
    log(f"check {name:13s} {dtype_name:8s} images with identical keep_idx {same:7.2%}  "
        f"overlap {overlap:7.2%}  rows exact {rows_exact}  in range {in_range}  max|err| "
        f"cls {err['cls_attn']:.1e} I {err['importance']:.1e} D {err['diversity']:.1e}")
    del x, qkv, want, s, cls_row, imp, div
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy, read + write bytes counted."""
    n = (1 << 30) if DEVICE == "cuda" else (1 << 22)   # 1 GiB on the GPU
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms=100)
    del src, dst
    return 2 * n / (ms * 1e-3)


def peak_mib(fn):
    if DEVICE != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def timings():
    name, B, T, C, H = TARGET
    dtype = torch.float16
    x, qkv = make_inputs(B, T, C, dtype)
    args = (H, K_ANCHORS, TOP_M, 0.5, "none")

    def triton_path():
        return K.select_and_gather(x, qkv, *args)

    def reference_path():
        return gather_kept(x, qkv, select_reference(x, qkv, *args))

    out = dict(shape=name, B=B, T=T, C=C, H=H, dtype="float16", k=K_ANCHORS, m=TOP_M)
    out["triton_ms"] = bench_ms(triton_path)
    log(f"time triton select_and_gather   {out['triton_ms']:.3f} ms")
    out["reference_ms"] = bench_ms(reference_path, rep_ms=300)
    log(f"time reference + gather_kept     {out['reference_ms']:.3f} ms")
    out["triton_peak_mib"] = peak_mib(triton_path)
    out["reference_peak_mib"] = peak_mib(reference_path)
    log(f"peak extra memory: triton {out['triton_peak_mib']:.0f} MiB, "
        f"reference {out['reference_peak_mib']:.0f} MiB")

    # Each kernel alone, on the intermediates of one run.
    cls_attn, anchor_mask, anchor_idx = K.cls_anchors(qkv, H, K_ANCHORS)
    imp = K.importance(qkv, H, anchor_idx)
    div = K.diversity(x, anchor_idx)
    keep_idx = K.select_topm(imp, div, anchor_mask, K_ANCHORS, TOP_M, 0.5, "none")
    parts = {
        "cls_anchors": lambda: K.cls_anchors(qkv, H, K_ANCHORS),
        "importance": lambda: K.importance(qkv, H, anchor_idx),
        "diversity": lambda: K.diversity(x, anchor_idx),
        "select_topm": lambda: K.select_topm(imp, div, anchor_mask, K_ANCHORS, TOP_M, 0.5,
                                             "none"),
        "gather_rows": lambda: K.gather_rows(x, qkv, keep_idx),
    }
    out["parts_ms"] = {}
    for part, fn in parts.items():
        out["parts_ms"][part] = bench_ms(fn, rep_ms=100)
        log(f"time   {part:12s} {out['parts_ms'][part]:.3f} ms")
    out["importance_configs_ms"] = {}
    for cfg in IMPORTANCE_CONFIGS:
        try:
            ms = bench_ms(lambda: K.importance(qkv, H, anchor_idx, config=cfg),
                          rep_ms=100)
        except Exception as exc:  # e.g. out of shared memory for one configuration
            log(f"time   importance config {cfg} failed: {type(exc).__name__}: {exc}")
            continue
        out["importance_configs_ms"][str(cfg)] = ms
        log(f"time   importance (BLOCK_M, BLOCK_N, warps, stages)={cfg} {ms:.3f} ms")

    bw = copy_bandwidth()
    floor_bytes = 3 * B * T * C * x.element_size()     # Q, K (from qkv) and X, read once
    out["copy_bandwidth_GBps"] = bw / 1e9
    out["floor_ms"] = floor_bytes / bw * 1e3
    out["speedup_vs_reference"] = out["reference_ms"] / out["triton_ms"]
    out["ratio_to_floor"] = out["triton_ms"] / out["floor_ms"]
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s; floor (Q, K, X once: {floor_bytes / 2**20:.0f} MiB) "
        f"{out['floor_ms']:.3f} ms")
    return out


def markdown(env, checks, t):
    lines = [f"### tokenprune Triton selection kernels on {env['device']}",
             "", f"{env['date']}, torch {env['torch']}, triton {env['triton']}"
             + (" (CPU interpreter smoke run: timings meaningless)" if SMOKE else ""), "",
             "| shape | dtype | identical keep_idx | kept overlap | rows exact "
             "| max err cls | max err I | max err D |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['shape']} (B={c['B']}) | {c['dtype']} | {c['same_keep_idx']:.2%} "
                     f"| {c['kept_overlap']:.2%} | {c['kept_rows_exact']} "
                     f"| {c['max_err_cls']:.1e} | {c['max_err_I']:.1e} | {c['max_err_D']:.1e} |")
    if t:
        lines += ["", f"Timings, {t['shape']} B={t['B']} T={t['T']} C={t['C']} H={t['H']} "
                      f"{t['dtype']}, k={t['k']} m={t['m']} (median ms):", "",
                  "| select + gather | ms | speedup vs reference | x memory floor |",
                  "|---|---|---|---|",
                  f"| PyTorch reference | {t['reference_ms']:.3f} | 1.00 "
                  f"| {t['reference_ms'] / t['floor_ms']:.1f} |",
                  f"| Triton kernels | {t['triton_ms']:.3f} | {t['speedup_vs_reference']:.1f} "
                  f"| {t['ratio_to_floor']:.1f} |",
                  f"| memory floor (Q, K, X once at {t['copy_bandwidth_GBps']:.0f} GB/s) "
                  f"| {t['floor_ms']:.3f} | | 1.0 |", "",
                  "Per kernel (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in t["parts_ms"].items()),
                  "", "Importance launch configs (BLOCK_M, BLOCK_N, warps, stages) (ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in t["importance_configs_ms"].items()),
                  "", f"Peak extra memory (MiB): triton {t['triton_peak_mib']:.0f}, "
                      f"reference {t['reference_peak_mib']:.0f}"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes under TRITON_INTERPRET=1, no GPU needed")
    parser.add_argument("--out", help="directory for gpu_kernels.md and gpu_kernels.json")
    opts = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    start = time.time()
    env = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
               or "cpu", date=datetime.datetime.now().isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    log(f"device {env['device']}; {env['date']}; torch {env['torch']}; triton {env['triton']}")

    checks, t = [], None
    for shape in CHECK_SHAPES:
        for dtype_name in DTYPES:
            try:
                checks.append(check(*shape, dtype_name))
            except Exception:
                log(f"check {shape[0]} {dtype_name} FAILED:\n{traceback.format_exc()}")
    try:
        t = timings()
    except Exception:
        log(f"timings FAILED:\n{traceback.format_exc()}")
    table = markdown(env, checks, t)
    log("\n" + table)
    log(f"\n(total {time.time() - start:.0f} s)")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_kernels.md").write_text(table + "\n")
        (out / "gpu_kernels.json").write_text(json.dumps(dict(env=env, checks=checks, timings=t),
                                                         indent=1))


if __name__ == "__main__":
    main()
