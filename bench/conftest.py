"""Settings and fixtures for the benchmarks: `pytest bench/ --benchmark-only`.

What runs depends on the device (CUDA when there is one, else the CPU; override with
TOKENPRUNE_BENCH_DEVICE=cpu|cuda):
- CUDA: float16, selection at B=256, end to end ViT-B/16 at batch 256 and ViT-L/14 at 128,
  and the timm towers ViT-B-16-SigLIP2 and EVA02-B-16 at batch 256 (m=50).
- CPU: float32, selection at B=16, ViT-B/16 at batch 16 (the target configuration),
  ViT-L/14 at batch 2 with m=50 only (one L/14 forward costs ~4.6 B/16 forwards; batch 2 keeps
  the CPU run to minutes while still showing the trend), SigLIP2 and EVA02 at batch 4 (m=50).
- LLaVA (bench_vlm.py, tools/tiny_llava.py): CUDA, LLaVA-1.5-7B's configuration in float16;
  CPU, its image shapes scaled down (the "cpu" configuration), float32; batch 1 and 8, unpruned
  and k + m = 64, 128, 192 image tokens, ours and the llmc-style baseline (bench/llmc_baseline.py).
- TOKENPRUNE_BENCH_SMOKE=1: a few tiny cases (B/16 shapes, batch 2; one batch-1 row each for
  SigLIP2 and EVA02, pruned at the last block; the tiny LLaVA at batch 1 and 2) that check the
  benchmark code runs; meant for CI as `pytest bench/ --benchmark-disable -q`.

Every benchmark stores in `extra_info`: kind, provider, device name, dtype, batch, the pruning
(k, m, layer, kept tokens, backend) and the peak memory, measured as `peak_memory` says.
"""
import gc
import importlib.metadata
import itertools
import os
import platform
import sys
from types import SimpleNamespace
from typing import NamedTuple, Optional

import pytest
import torch

from tokenprune.selection import resolve_backend, triton_available

# tools/tiny_llava.py (LLaVA models made offline) is importable as `tiny_llava`.
sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

SMOKE = os.environ.get("TOKENPRUNE_BENCH_SMOKE", "0") not in ("", "0")
DEVICE = torch.device(os.environ.get("TOKENPRUNE_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.float16 if ON_CUDA else torch.float32
K_ANCHORS = 10
TOP_M = 50  # the pruning of every case that is not part of the kept-token sweep

# Timing: rounds of one call each, median reported, after warm-up rounds (and the untimed
# memory measurement, which runs first).
ROUNDS, WARMUP_ROUNDS = (10, 2) if ON_CUDA else (5, 1)

# Selection alone: (label, T, C, H) of ViT-B/16 at 224 px, ViT-L/14 at 224 and at 336.
SELECTION_SHAPES = [("ViT-B-16@224", 197, 768, 12), ("ViT-L-14@224", 257, 1024, 16),
                    ("ViT-L-14@336", 577, 1024, 16)]
# Selection on towers without a class token (SigLIP-like: p=0, anchors from the attention each
# patch receives, SPEC.md's last section): (label, T, C, H), ViT-B/16 SigLIP2 at 256 px.
NO_CLASS_SELECTION_SHAPES = [("SigLIP2-B-16@256", 256, 768, 12)]
SELECTION_BATCH = 256 if ON_CUDA else 16
# End to end: model -> (batch, middle layer, top_m sweep).
# The timm towers (SigLIP2: no class token, attention pool; EVA02: rotary positions) at m=50.
if ON_CUDA:
    E2E_MODELS = {"ViT-B-16": (256, 6, (20, 50, 100)), "ViT-L-14": (128, 12, (20, 50, 100)),
                  "ViT-B-16-SigLIP2": (256, 6, (TOP_M,)), "EVA02-B-16": (256, 6, (TOP_M,))}
else:
    E2E_MODELS = {"ViT-B-16": (16, 6, (20, 50, 100)), "ViT-L-14": (2, 12, (TOP_M,)),
                  "ViT-B-16-SigLIP2": (4, 6, (TOP_M,)), "EVA02-B-16": (4, 6, (TOP_M,))}
# Vision-language models (bench_vlm.py): a LLaVA from tools/tiny_llava.py with random weights,
# unpruned and with k + m image tokens per image (k = K_ANCHORS), ours and the llmc-style
# baseline, at each batch; decoding runs VLM_DECODE_STEPS steps after the prefill.
# CUDA: LLaVA-1.5-7B's configuration in float16. CPU: its shapes scaled down (576 image tokens
# at 336/14, 4 vision blocks of width 128, a 4-layer Llama of width 256), float32.
VLM_SIZE = "llava-1.5-7b" if ON_CUDA else "cpu"
VLM_BATCHES = (1, 8)
VLM_IMAGE_TOKENS = (64, 128, 192)
VLM_DECODE_STEPS = 16 if ON_CUDA else 8
# (rounds, warm-up rounds) of the prefill and the decoding measurements; on the CPU a few, so
# that the whole file runs in minutes on 2 cores.
VLM_ROUNDS = {"prefill": (10, 2), "decode": (5, 1)} if ON_CUDA else {"prefill": (3, 1),
                                                                      "decode": (3, 0)}
if SMOKE:  # the tiny LLaVA (16 patches), one pruned size
    VLM_SIZE, VLM_BATCHES, VLM_IMAGE_TOKENS, VLM_DECODE_STEPS = "tiny", (1, 2), (8,), 2
# Models whose smoke run is one row (pruned at the last block): that the timm towers run.
SMOKE_LAST_ONLY = ()
if SMOKE:
    SELECTION_SHAPES, SELECTION_BATCH = SELECTION_SHAPES[:1], 2
    E2E_MODELS = {"ViT-B-16": (2, 6, (TOP_M,)), "ViT-B-16-SigLIP2": (1, 6, (TOP_M,)),
                  "EVA02-B-16": (1, 6, (TOP_M,))}
    SMOKE_LAST_ONLY = ("ViT-B-16-SigLIP2", "EVA02-B-16")


class SelectionCase(NamedTuple):
    shape: str
    tokens: int
    channels: int
    heads: int
    provider: str  # "hook" (the seed's baseline), "reference", "triton" or "qkv" (in_proj alone)
    num_prefix: int = 1  # prefix tokens, always kept (OpenCLIP: the class token)
    class_token: bool = True  # anchors from the class token's row, or from received attention

    @property
    def id(self):
        return f"{self.shape}-{self.provider}"


class E2ECase(NamedTuple):
    model: str
    batch: int
    provider: str  # "unpatched", "pruned" (backend auto) or "pruned-reference"
    layer_choice: Optional[str] = None  # "last" or "middle"
    layer: Optional[int] = None  # as given to replace_last_block (-1 for the last block)
    top_m: Optional[int] = None

    @property
    def id(self):
        if self.provider == "unpatched":
            return f"{self.model}-unpatched"
        where = "last" if self.layer == -1 else f"layer{self.layer}"
        return f"{self.model}-{self.provider}-{where}-m{self.top_m}"


class VLMCase(NamedTuple):
    measure: str  # "prefill" (time to the first token) or "decode" (the steps after it)
    batch: int
    provider: str  # "unpruned", "ours" (prune_image_tokens) or "baseline" (bench/llmc_baseline.py)
    image_tokens: Optional[int] = None  # k + m per image; None: all of them (unpruned)

    @property
    def id(self):
        kept = "" if self.image_tokens is None else f"-{self.image_tokens}"
        return f"{self.measure}-B{self.batch}-{self.provider}{kept}"


def selection_cases():
    providers = ("hook", "reference", "triton", "qkv")
    return ([SelectionCase(*shape, provider) for shape in SELECTION_SHAPES
             for provider in providers]
            + [SelectionCase(*shape, provider, num_prefix=0, class_token=False)
               for shape in NO_CLASS_SELECTION_SHAPES for provider in providers])


def e2e_cases():
    cases = []
    for model, (batch, middle, sweep) in E2E_MODELS.items():
        if model in SMOKE_LAST_ONLY:
            cases.append(E2ECase(model, batch, "pruned", "last", -1, sweep[0]))
            continue
        cases.append(E2ECase(model, batch, "unpatched"))
        for (choice, layer), m in itertools.product((("last", -1), ("middle", middle)), sweep):
            cases.append(E2ECase(model, batch, "pruned", choice, layer, m))
        if not SMOKE:
            cases += [E2ECase(model, batch, "pruned-reference", choice, layer, TOP_M)
                      for choice, layer in (("last", -1), ("middle", middle))]
    return cases


def vlm_cases():
    return [VLMCase(measure, batch, provider, tokens)
            for measure in ("prefill", "decode") for batch in VLM_BATCHES
            for provider, tokens in ([("unpruned", None)]
                                     + [(p, n) for n in VLM_IMAGE_TOKENS
                                        for p in ("ours", "baseline")])]


def pytest_generate_tests(metafunc):
    for name, cases in (("selection_case", selection_cases), ("e2e_case", e2e_cases),
                        ("vlm_case", vlm_cases)):
        if name in metafunc.fixturenames:
            values = cases()
            metafunc.parametrize(name, values, ids=[case.id for case in values])


def device_name():
    if ON_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads > 1 else ''})"


def versions():
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("open_clip_torch", "triton", "tokenprune", "pytest-benchmark", "transformers"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tokenprune_bench"] = {
        "device": device_name(), "device_type": DEVICE.type,
        "dtype": str(DTYPE).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "smoke": SMOKE, "versions": versions(),
        "cuda": torch.version.cuda if ON_CUDA else None,
    }


def sync():
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def peak_memory(fn):
    """(peak, peak_total): bytes that torch allocated during fn() at their peak.

    `peak` counts only what was allocated during the call, above what was already allocated
    when it started (weights and inputs excluded), on both devices.
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
    memory_allocated at the start; `peak_total` is max_memory_allocated itself.
    CPU: the running sum of the allocation and free events that torch's CPU allocator reports
    to torch.profiler (profile_memory=True), in time order; its maximum is the peak. It does
    not see memory that bypasses torch's allocator (oneDNN/BLAS scratch, Python objects) nor
    allocator caching (the CPU allocator has none); `peak_total` is None.
    """
    gc.collect()
    if ON_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        start = torch.cuda.memory_allocated(DEVICE)
        fn()
        sync()
        total = torch.cuda.max_memory_allocated(DEVICE)
        return total - start, total
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((event for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]"
                     and event.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda event: event.start_ns())
    return max(itertools.accumulate((event.nbytes() for event in events), initial=0)), None


def triton_skip_reason():
    """Why the Triton selection cannot be benchmarked here, or None when it can."""
    if not ON_CUDA:
        return ("the Triton kernels are benchmarked on CUDA only (on the CPU they run under "
                "TRITON_INTERPRET=1, a correctness tool, not something to time)")
    if not triton_available():
        return "Triton is not installed"
    try:
        from tokenprune.kernels.pipeline import select_and_gather  # noqa: F401
    except ImportError as err:
        return f"tokenprune.kernels.pipeline.select_and_gather is not available: {err}"
    return None


@pytest.fixture(scope="session")
def clip_model():
    """clip_model(name): an OpenCLIP model with random weights (pretrained=None), in eval
    mode on DEVICE in DTYPE. Only the last one asked for is kept alive."""
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            gc.collect()
            if ON_CUDA:
                torch.cuda.empty_cache()
            import open_clip
            precision = "fp16" if DTYPE == torch.float16 else "fp32"
            cache[name] = open_clip.create_model(name, pretrained=None, precision=precision,
                                                 device=DEVICE).eval()
        return cache[name]

    yield get
    cache.clear()


@pytest.fixture
def run_benchmark(benchmark):
    """run_benchmark(fn, group, batch, **info): measure fn's peak memory (untimed, also the
    warm-up), then time it with benchmark.pedantic; fn must synchronise CUDA itself."""

    def run(fn, group, batch, **info):
        peak, peak_total = peak_memory(fn)
        benchmark.group = group
        benchmark.extra_info.update(
            device=device_name(), device_type=DEVICE.type, dtype=str(DTYPE).replace("torch.", ""),
            batch=batch, peak_mem_bytes=peak, peak_mem_total_bytes=peak_total,
            torch_threads=torch.get_num_threads(), **info)
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["images_per_s"] = batch / stats.stats.median

    return run


@pytest.fixture(scope="session")
def env():
    """The settings the benchmark files need (test modules cannot import a conftest)."""
    return SimpleNamespace(
        device=DEVICE, dtype=DTYPE, k_anchors=K_ANCHORS, top_m=TOP_M, sync=sync,
        selection_batch=SELECTION_BATCH, smoke=SMOKE,
        e2e_batch={model: batch for model, (batch, _, _) in E2E_MODELS.items()},
        triton_skip_reason=triton_skip_reason(), peak_memory=peak_memory,
        device_name=device_name, versions=versions,
        vlm=SimpleNamespace(size=VLM_SIZE, decode_steps=VLM_DECODE_STEPS, rounds=VLM_ROUNDS),
        # The selection backend that a PruneConfig backend resolves to on DEVICE.
        resolve=lambda backend: resolve_backend(backend, torch.empty(0, device=DEVICE)))
