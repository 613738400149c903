"""The Triton selection kernels on one GPU: correctness against the reference, then timings.

    python bench/gpu_kernels.py [--out DIR]        on an H100/H200 (bench/gpu_check.sh allows 4 min)
    python bench/gpu_kernels.py --cpu-smoke        tiny shapes in Triton's CPU interpreter

1. Correctness in float32, float16 and bfloat16 at a few shapes, ViT-L/14-336 included
   (B=256, T=577, C=1024, H=16), and towers beyond OpenCLIP's (SPEC.md's last section): SigLIP
   shapes without a class token (p=0, anchors from the attention each patch receives) and a
   class token + 4 registers (p=5): the share of images whose keep_idx equals the reference's,
   the mean overlap of the kept sets, and the largest error of the anchor scores a, I and D
   against SPEC's formulas evaluated in float32 on the same inputs.
2. Timings in float16 on random normal data (triton.testing.do_bench, median) at ViT-L/14-336
   (class token) and SigLIP-SO400M/14-384 (no class token: B=256, T=729, C=1152, H=16, d=72):
   select_and_gather against the PyTorch reference (select_reference + gather_kept), each
   kernel alone, and a few launch configurations of the online-softmax passes.
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

import tokenprune.kernels.pipeline as K  # noqa: E402  (bench/gpu_check.sh sets up the import path)
from tokenprune.reference import select_reference  # noqa: E402
from tokenprune.selection import gather_kept  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
K_ANCHORS, TOP_M = 10, 50

# (name, B, T, C, H, p, class_token): what each correctness shape covers. p prefix tokens;
# class_token: anchors from the class token's row, else from the attention each patch receives.
CHECK_SHAPES = [
    ("ViT-B/32-224", 16, 50, 768, 12, 1, True),          # T=50 below every block size, d=64
    ("ViT-H/14-224", 16, 257, 1280, 16, 1, True),        # d=80: head dim padded to 128
    ("ViT-L/14-336", 256, 577, 1024, 16, 1, True),       # the OpenCLIP target shape
    ("SigLIP2-B/16-256", 64, 256, 768, 12, 0, False),    # no class token, p=0
    ("SigLIP-SO400M/14-384", 64, 729, 1152, 16, 0, False),  # no class token, d=72 padded
    ("ViT-L/14-reg4-224", 64, 261, 1024, 16, 5, True),   # class + 4 registers (DINOv2-style)
]
# Timed shapes: the class-token path and the no-class-token path.
TARGETS = [("ViT-L/14-336", 256, 577, 1024, 16, 1, True),
           ("SigLIP-SO400M/14-384", 256, 729, 1152, 16, 0, False)]
# Launch configurations of the online-softmax passes: (BLOCK_M, BLOCK_N, warps, stages) for
# importance and softmax_stats (query rows per program, keys per step), (BLOCK_KEYS,
# BLOCK_QUERIES, warps, stages) for received_anchors' column pass.
IMPORTANCE_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3),
                      (256, 64, 8, 3), (64, 64, 4, 4)]
STATS_CONFIGS = [(128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 4)]
RECEIVED_CONFIGS = [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3),
                    (128, 64, 8, 3)]
if SMOKE:
    CHECK_SHAPES = [("tiny-50", 2, 50, 128, 2, 1, True), ("tiny-d80", 1, 65, 160, 2, 1, True),
                    ("tiny-noclass", 2, 37, 128, 2, 0, False),
                    ("tiny-reg4", 1, 41, 160, 2, 5, True)]
    TARGETS = [CHECK_SHAPES[0], CHECK_SHAPES[2]]
    IMPORTANCE_CONFIGS, STATS_CONFIGS, RECEIVED_CONFIGS = (
        IMPORTANCE_CONFIGS[:2], STATS_CONFIGS[:1], RECEIVED_CONFIGS[:2])
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


def reference_scores(x, qkv, H, anchors, class_token, chunk=32):
    """SPEC steps 0-3 in float32 for the given anchors: (anchor scores a, I, D), (B, T) each (a:
    the class token's row, or the column means of P); a few images at a time so that the
    (chunk, H, T, T) attention stays small."""
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
        outs.append((P[:, 0] if class_token else P.mean(dim=1), imp, 1 - cos.amax(dim=-1)))
        del P, q, k
    return [torch.cat(parts) for parts in zip(*outs)]


def check(name, B, T, C, H, p, class_token, dtype_name):
    dtype = DTYPES[dtype_name]
    x, qkv = make_inputs(B, T, C, dtype)
    args = (H, K_ANCHORS, TOP_M, 0.5, "none", p, class_token)
    keep_idx, x_kept, qkv_kept = K.select_and_gather(x, qkv, *args)
    want = select_reference(x, qkv, *args)
    same = (keep_idx == want).all(dim=-1).float().mean().item()
    # Kept-set overlap: each kept index of one side found in the other (both are sorted).
    overlap = (keep_idx[:, :, None] == want[:, None, :]).any(-1).float().mean().item()
    x_ref, qkv_ref = gather_kept(x, qkv, keep_idx, p)
    rows_exact = bool(torch.equal(x_kept, x_ref) and torch.equal(qkv_kept, qkv_ref))
    in_range = bool(((keep_idx >= p) & (keep_idx <= T - 1)).all())
    s = K.selection_scores(x, qkv, H, K_ANCHORS, p, class_token)
    anchor_score, imp, div = reference_scores(x, qkv, H, s["anchor_idx"], class_token)
    err = {key: (s[key][:, lo:] - ref[:, lo:]).abs().max().item()
           for key, ref, lo in (("anchor_score", anchor_score, 0), ("importance", imp, p),
                                ("diversity", div, p))}
    row = dict(shape=name, B=B, T=T, C=C, H=H, p=p, class_token=class_token, dtype=dtype_name,
               same_keep_idx=same, kept_overlap=overlap, kept_rows_exact=rows_exact,
               in_range=in_range, max_err_anchor=err["anchor_score"],
               max_err_I=err["importance"], max_err_D=err["diversity"])
    log(f"check {name:20s} {dtype_name:8s} images with identical keep_idx {same:7.2%}  "
        f"overlap {overlap:7.2%}  rows exact {rows_exact}  in range {in_range}  max|err| "
        f"a {err['anchor_score']:.1e} I {err['importance']:.1e} D {err['diversity']:.1e}")
    del x, qkv, want, s, anchor_score, imp, div
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


def time_configs(label, launch, configs):
    """{str(config): median ms} of launch(config) for each launch configuration that runs."""
    found = {}
    for cfg in configs:
        try:
            ms = bench_ms(lambda: launch(cfg), rep_ms=100)
        except Exception as exc:  # e.g. out of shared memory for one configuration
            log(f"time   {label} config {cfg} failed: {type(exc).__name__}: {exc}")
            continue
        found[str(cfg)] = ms
        log(f"time   {label} config {cfg} {ms:.3f} ms")
    return found


def timings(name, B, T, C, H, p, class_token):
    dtype = torch.float16
    x, qkv = make_inputs(B, T, C, dtype)
    args = (H, K_ANCHORS, TOP_M, 0.5, "none", p, class_token)

    def triton_path():
        return K.select_and_gather(x, qkv, *args)

    def reference_path():
        return gather_kept(x, qkv, select_reference(x, qkv, *args))

    out = dict(shape=name, B=B, T=T, C=C, H=H, p=p, class_token=class_token, dtype="float16",
               k=K_ANCHORS, m=TOP_M)
    log(f"timings at {name} (p={p}, class_token={class_token})")
    out["triton_ms"] = bench_ms(triton_path)
    log(f"time triton select_and_gather   {out['triton_ms']:.3f} ms")
    out["reference_ms"] = bench_ms(reference_path, rep_ms=300)
    log(f"time reference + gather_kept     {out['reference_ms']:.3f} ms")
    out["triton_peak_mib"] = peak_mib(triton_path)
    out["reference_peak_mib"] = peak_mib(reference_path)
    log(f"peak extra memory: triton {out['triton_peak_mib']:.0f} MiB, "
        f"reference {out['reference_peak_mib']:.0f} MiB")

    # Each kernel alone, on the intermediates of one run (the launches of selection_scores).
    parts = {}
    if class_token:
        row_stats = None
        parts["cls_anchors"] = lambda: K.cls_anchors(qkv, H, K_ANCHORS, p)
        _, anchor_mask, anchor_idx = parts["cls_anchors"]()
    else:
        parts["softmax_stats"] = lambda: K.softmax_stats(qkv, H)
        row_stats = parts["softmax_stats"]()
        parts["received_anchors"] = lambda: K.received_anchors(qkv, H, K_ANCHORS, row_stats, p)
        _, anchor_mask, anchor_idx = parts["received_anchors"]()
    parts["importance"] = lambda: K.importance(qkv, H, anchor_idx, row_stats=row_stats)
    imp = parts["importance"]()
    parts["diversity"] = lambda: K.diversity(x, anchor_idx)
    div = parts["diversity"]()
    parts["select_topm"] = lambda: K.select_topm(imp, div, anchor_mask, K_ANCHORS, TOP_M, 0.5,
                                                 "none", p)
    keep_idx = parts["select_topm"]()
    parts["gather_rows"] = lambda: K.gather_rows(x, qkv, keep_idx, p)
    out["parts_ms"] = {}
    for part, fn in parts.items():
        out["parts_ms"][part] = bench_ms(fn, rep_ms=100)
        log(f"time   {part:16s} {out['parts_ms'][part]:.3f} ms")
    # The online-softmax passes' launch configurations: (BLOCK_M, BLOCK_N, warps, stages), or
    # (BLOCK_KEYS, BLOCK_QUERIES, warps, stages) for the column pass.
    out["configs_ms"] = {}
    if class_token:
        out["configs_ms"]["importance"] = time_configs(
            "importance", lambda cfg: K.importance(qkv, H, anchor_idx, config=cfg),
            IMPORTANCE_CONFIGS)
    else:
        out["configs_ms"]["softmax_stats"] = time_configs(
            "softmax_stats", lambda cfg: K.softmax_stats(qkv, H, config=cfg), STATS_CONFIGS)
        out["configs_ms"]["received_anchors"] = time_configs(
            "received_anchors",
            lambda cfg: K.received_anchors(qkv, H, K_ANCHORS, row_stats, p, config=cfg),
            RECEIVED_CONFIGS)

    bw = copy_bandwidth()
    floor_bytes = 3 * B * T * C * x.element_size()     # Q, K (from qkv) and X, read once
    out["copy_bandwidth_GBps"] = bw / 1e9
    out["floor_ms"] = floor_bytes / bw * 1e3
    out["speedup_vs_reference"] = out["reference_ms"] / out["triton_ms"]
    out["ratio_to_floor"] = out["triton_ms"] / out["floor_ms"]
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s; floor (Q, K, X once: {floor_bytes / 2**20:.0f} MiB) "
        f"{out['floor_ms']:.3f} ms")
    return out


def markdown(env, checks, timed):
    lines = [f"### tokenprune Triton selection kernels on {env['device']}",
             "", f"{env['date']}, torch {env['torch']}, triton {env['triton']}"
             + (" (CPU interpreter smoke run: timings meaningless)" if SMOKE else ""), "",
             "p: prefix tokens; anchors: from the class token's row (class) or from the "
             "attention each patch receives (received).", "",
             "| shape | p | anchors | dtype | identical keep_idx | kept overlap | rows exact "
             "| max err a | max err I | max err D |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['shape']} (B={c['B']}) | {c['p']} "
                     f"| {'class' if c['class_token'] else 'received'} | {c['dtype']} "
                     f"| {c['same_keep_idx']:.2%} | {c['kept_overlap']:.2%} "
                     f"| {c['kept_rows_exact']} | {c['max_err_anchor']:.1e} "
                     f"| {c['max_err_I']:.1e} | {c['max_err_D']:.1e} |")
    for t in timed:
        lines += ["", f"Timings, {t['shape']} B={t['B']} T={t['T']} C={t['C']} H={t['H']} "
                      f"p={t['p']} anchors {'class' if t['class_token'] else 'received'} "
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
                  ""]
        lines += [f"{kernel} launch configs (ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in found.items())
                  for kernel, found in t["configs_ms"].items()]
        lines += ["", f"Peak extra memory (MiB): triton {t['triton_peak_mib']:.0f}, "
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

    checks, timed = [], []
    for shape in CHECK_SHAPES:
        for dtype_name in DTYPES:
            try:
                checks.append(check(*shape, dtype_name))
            except Exception:
                log(f"check {shape[0]} {dtype_name} FAILED:\n{traceback.format_exc()}")
    for target in TARGETS:
        try:
            timed.append(timings(*target))
        except Exception:
            log(f"timings at {target[0]} FAILED:\n{traceback.format_exc()}")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    table = markdown(env, checks, timed)
    log("\n" + table)
    log(f"\n(total {time.time() - start:.0f} s)")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_kernels.md").write_text(table + "\n")
        (out / "gpu_kernels.json").write_text(json.dumps(dict(env=env, checks=checks,
                                                              timings=timed), indent=1))


if __name__ == "__main__":
    main()
