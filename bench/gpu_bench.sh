#!/usr/bin/env bash
# The GPU benchmark set: everything in bench/ at full size in float16 on the first CUDA device,
# a few minutes on an H100/H200 (selection at B=256 for T=197/257/577; encode_image for
# ViT-B-16 at batch 256 and ViT-L-14 at batch 128, unpatched and pruned at the last and a
# middle block, m in {20, 50, 100}, plus the reference backend at m=50).
#
#   bench/gpu_bench.sh OUT.json      e.g. bench/gpu_bench.sh "$OUT/gpu.json"
#
# Writes pytest-benchmark's JSON to OUT.json and the pytest log to OUT.log; then, on this
# machine: python bench/report.py bench/results/cpu.json bench/results/gpu.json
# Offline set-up: open_clip_torch is installed from the wheels in $TOKENPRUNE_WHEELS (default
# .whl/) if it is missing, and tokenprune (with tokenprune.kernels) from this checkout.
set -euo pipefail
out=$(realpath -m "${1:?usage: bench/gpu_bench.sh OUT.json}")
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
wheels=${TOKENPRUNE_WHEELS:-.whl}

if ! "$python" -c "import open_clip" 2>/dev/null; then
    "$python" -m pip install -q --no-index --find-links "$wheels" open_clip_torch \
        || "$python" -m pip install -q --no-index --no-deps --find-links "$wheels" open_clip_torch
fi
if ! "$python" -c "import tokenprune.kernels" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

mkdir -p "$(dirname "$out")"
export TOKENPRUNE_BENCH_DEVICE=cuda
export HF_HUB_OFFLINE=1  # no network there; the models are built with pretrained=None anyway
timeout "${TOKENPRUNE_BENCH_TIMEOUT:-540}" "$python" -m pytest bench/ --benchmark-only \
    --benchmark-json="$out" -rs -p no:cacheprovider 2>&1 | tee "${out%.json}.log"
