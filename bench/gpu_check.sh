#!/usr/bin/env bash
# Every GPU check in one call, for a lent H100/H200 without network (see bench/RESULTS.md):
#   1. the kernel tests compiled on CUDA (float32, float16, bfloat16),
#   2. bench/gpu_kernels.py: correctness at OpenCLIP, SigLIP and register-token shapes, kernels
#      vs reference timing with and without a class token, the memory-bandwidth floor,
#   3. bench/gpu_bench.sh: the pytest-benchmark set (selection and end to end) in float16,
#   4. bench/gpu_bench.sh's LLaVA rows (bench/bench_vlm.py, LLaVA-1.5-7B shapes in float16),
#      unless GPU_CHECK_VLM=0; about 5 minutes at most (TOKENPRUNE_VLM_BENCH_TIMEOUT).
#   5. with GPU_CHECK_QWEN=1 (or =only): bench/bench_ttft.py, the time-to-first-token rows of
#      Qwen2.5-VL-7B (one 1288 x 728 image, unpruned and ratio 0.25 / 0.1, each also with
#      layer 7, 15 and -1) and LLaVA-1.5-7B (unpruned, ratio 0.25 / 0.1), in bfloat16, batch 1
#      and 4, with their ceilings;
#      needs transformers >= 5.25 on that machine. Not yet run on any GPU.
#   6. unless GPU_CHECK_SCHEDULES=0 (and not with =only above): bench/tome_side_by_side.py on
#      CUDA in float16, batch 64: images/s of timm ViT-B/16 unpruned, the token-merging baseline
#      at r = 8, 13, 16, tokenprune's single cut and schedules (issue 23's GPU aim: a schedule
#      at >= 1.65x unpruned). ToMe's own code is not on that machine: its rows are skipped.
# Steps 1-3 and step 4 together can take longer than one 10-minute device call: run it with
# GPU_CHECK_VLM=0, then with GPU_CHECK_VLM=only (step 4 alone).
# Usage: bash bench/gpu_check.sh OUTDIR   (logs and JSON land in OUTDIR)
# Offline set-up: the wheels in .whl/ (open_clip_torch and what it needs beyond the machine's
# image) go to /tmp/site; tokenprune runs from this checkout through a folder that holds only a
# link to it, so that the repo root itself is never on the import path.
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/gpu_check.sh OUTDIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON=python3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/tokenprune_src && ln -sfn "$PWD/tokenprune" /tmp/tokenprune_src/tokenprune
export PYTHONPATH=/tmp/site:/tmp/tokenprune_src
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, open_clip; print('torch', torch.__version__, 'triton', triton.__version__, 'open_clip', open_clip.__version__)"
} 2>&1 | tee "$out/env.log"

vlm=${GPU_CHECK_VLM:-1}
qwen=${GPU_CHECK_QWEN:-0}
[ "$qwen" = only ] && vlm=skip
if [ "$vlm" != only ] && [ "$vlm" != skip ]; then
echo "== 1. kernel tests on CUDA"
TOKENPRUNE_TEST_DEVICE=cuda timeout 150 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider \
    2>&1 | tee "$out/gpu_tests.log" | tail -25
echo "== 2. kernels vs reference"
timeout 240 python3 bench/gpu_kernels.py --out "$out" 2>&1 | tee "$out/gpu_kernels.log" | tail -70
echo "== 3. benchmarks"
TOKENPRUNE_BENCH_ONLY=main TOKENPRUNE_BENCH_TIMEOUT=${TOKENPRUNE_BENCH_TIMEOUT:-270} \
    bash bench/gpu_bench.sh "$out/gpu.json" > /dev/null 2>&1
tail -60 "$out/gpu.log"
fi
if [ "$vlm" != 0 ] && [ "$vlm" != skip ]; then
echo "== 4. LLaVA rows"
TOKENPRUNE_BENCH_ONLY=vlm bash bench/gpu_bench.sh "$out/gpu.json" > /dev/null 2>&1
tail -40 "$out/gpu_vlm.log"; cat "$out/gpu_vlm.md" 2>/dev/null
fi
if [ "$qwen" != 0 ]; then
echo "== 5. Qwen2.5-VL-7B and LLaVA-1.5-7B time to first token"
(cd bench && timeout 420 python3 -m pytest bench_ttft.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$out/gpu_ttft.json") > "$out/gpu_ttft.log" 2>&1
tail -20 "$out/gpu_ttft.log"
python3 bench/ttft_report.py "$out/gpu_ttft.json" | tee "$out/gpu_ttft.md"
fi
if [ "${GPU_CHECK_SCHEDULES:-1}" != 0 ] && [ "$vlm" != only ] && [ "$vlm" != skip ]; then
echo "== 6. schedules against token merging, ViT-B/16"
timeout 180 python3 bench/tome_side_by_side.py --device cuda --dtype float16 --batch 64 \
    --repeats 10 --out "$out/gpu_schedules.json" 2>&1 | tee "$out/gpu_schedules.log"
fi
