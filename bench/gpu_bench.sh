#!/usr/bin/env bash
# The GPU benchmark set: everything in bench/ at full size in float16 on the first CUDA device,
# a few minutes on an H100/H200 (selection at B=256 for T=197/257/577; encode_image for
# ViT-B-16 at batch 256 and ViT-L-14 at batch 128, unpatched and pruned at the last and a
# middle block, m in {20, 50, 100}, plus the reference backend at m=50); then the LLaVA rows
# (bench/bench_vlm.py: LLaVA-1.5-7B's configuration with random weights in float16, unpruned and
# k + m = 64, 128, 192 image tokens, ours and the llmc-style baseline, batch 1 and 8).
#
#   bench/gpu_bench.sh OUT.json      e.g. bench/gpu_bench.sh "$OUT/gpu.json"
#
# Writes pytest-benchmark's JSON to OUT.json and the pytest log to OUT.log, the LLaVA rows to
# OUT_vlm.json / OUT_vlm.log and their table to OUT_vlm.md; then, on this machine:
# python bench/report.py bench/results/cpu.json bench/results/gpu.json, and
# python bench/vlm_report.py bench/results/vlm_cpu.json bench/results/gpu_vlm.json.
# TOKENPRUNE_BENCH_ONLY=vlm runs only the LLaVA rows, =main only the others. Time limits (s):
# TOKENPRUNE_BENCH_TIMEOUT (default 540) and TOKENPRUNE_VLM_BENCH_TIMEOUT (default 300).
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
if ! "$python" -c "import tokenprune.kernels.pipeline" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

mkdir -p "$(dirname "$out")"
export TOKENPRUNE_BENCH_DEVICE=cuda
export HF_HUB_OFFLINE=1  # no network there; the models are built with pretrained=None anyway
only=${TOKENPRUNE_BENCH_ONLY:-}
status=0  # the worst of the two runs; a failed first run does not stop the second
if [ "$only" != vlm ]; then
    timeout "${TOKENPRUNE_BENCH_TIMEOUT:-540}" "$python" -m pytest bench/ --benchmark-only \
        --ignore=bench/bench_vlm.py --benchmark-json="$out" -rs -p no:cacheprovider 2>&1 \
        | tee "${out%.json}.log" || status=$?
fi
if [ "$only" != main ]; then
    # The LLaVA rows need transformers (and its tokenizers): from the wheels if it is missing.
    if ! "$python" -c "import transformers" 2>/dev/null; then
        "$python" -m pip install -q --no-index --find-links "$wheels" "transformers>=5,<6" \
            || echo "gpu_bench.sh: transformers is not installed and not in $wheels:" \
                    "bench_vlm.py's rows will be skipped"
    fi
    vlm=${out%.json}_vlm.json
    timeout "${TOKENPRUNE_VLM_BENCH_TIMEOUT:-300}" "$python" -m pytest bench/bench_vlm.py \
        --benchmark-only --benchmark-json="$vlm" -rs -p no:cacheprovider 2>&1 \
        | tee "${vlm%.json}.log" || status=$?
    if [ -f "$vlm" ]; then
        "$python" bench/vlm_report.py "$vlm" --out "${vlm%.json}.md" || status=$?
    fi
fi
exit "$status"
