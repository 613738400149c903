#!/usr/bin/env bash
# Wall time of one `tokenprune sweep` against the same grid points run as separate
# `tokenprune eval --enable_pruning` calls (random-weight ViT-B-16, a synthetic WebDataset).
#   bash bench/sweep_vs_eval.sh WORKDIR [EVALS]
# EVALS: how many of the 12 points to run as separate evals (default all 12).
set -euo pipefail
work=${1:?usage: bash bench/sweep_vs_eval.sh WORKDIR [EVALS]}
evals=${2:-12}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export HF_HUB_OFFLINE=1
mkdir -p "$work"
[ -d "$work/toy" ] || $py "$here/tests/helpers.py" wds "$work/toy" --images 200 --size 224
[ -f "$work/ViT-B-16-random.pt" ] || $py "$here/tests/helpers.py" checkpoint ViT-B-16 "$work/ViT-B-16-random.pt"
common=(--dataset wds/toy --dataset_root "$work/toy" --model ViT-B-16
        --pretrained "$work/ViT-B-16-random.pt" --no_amp --batch_size 50 --num_workers 0)
ks=(10 20); ms=(20 50 100); alphas=(0.3 0.7)

now() { date +%s.%N; }
start=$(now)
tokenprune sweep "${common[@]}" --k_anchors "${ks[@]}" --top_m "${ms[@]}" --alpha "${alphas[@]}" \
    --controls none --no_speed --quiet --output_dir "$work/sweep_nocontrols"
sweep_s=$(echo "$(now) - $start" | bc)
echo "sweep, 12 points, no controls, --no_speed: ${sweep_s} s"

n=0; total=0
for k in "${ks[@]}"; do for m in "${ms[@]}"; do for a in "${alphas[@]}"; do
    [ "$n" -lt "$evals" ] || continue
    start=$(now)
    tokenprune eval "${common[@]}" --quiet --enable_pruning --k_anchors "$k" --top_m "$m" \
        --alpha "$a" --output "$work/eval_k${k}_m${m}_a${a}.json" 2>/dev/null
    s=$(echo "$(now) - $start" | bc); total=$(echo "$total + $s" | bc); n=$((n + 1))
    echo "eval k=$k m=$m alpha=$a: ${s} s"
done; done; done
echo "separate evals: $n calls, ${total} s; per call $(echo "scale=1; $total / $n" | bc) s"
echo "12 separate evals (measured, or extrapolated from $n): $(echo "scale=1; 12 * $total / $n" | bc) s"
echo "ratio: $(echo "scale=2; 12 * $total / $n / $sweep_s" | bc)x"
