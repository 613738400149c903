#!/usr/bin/env bash
# Wall time of `tokenprune sweep` with its defaults (speed timing on, both controls) on 8
# last-block points, against the same 8 points run as separate `tokenprune eval
# --enable_pruning` calls (random-weight ViT-B-16, a synthetic 60-image WebDataset, CPU).
#   bash bench/sweep_default_cost.sh WORKDIR
# PYTHON: the interpreter (default python); the code is the tokenprune on its path.
set -euo pipefail
work=${1:?usage: bash bench/sweep_default_cost.sh WORKDIR}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export HF_HUB_OFFLINE=1
mkdir -p "$work"
[ -d "$work/toy60" ] || $py "$here/tests/helpers.py" wds "$work/toy60" --images 60 --size 224
[ -f "$work/ViT-B-16-random.pt" ] || $py "$here/tests/helpers.py" checkpoint ViT-B-16 "$work/ViT-B-16-random.pt"
common=(--dataset wds/toy60 --dataset_root "$work/toy60" --model ViT-B-16
        --pretrained "$work/ViT-B-16-random.pt" --num_workers 0)
ks=(5 10); ms=(30 50); alphas=(0.3 0.7)

now() { date +%s.%N; }
rm -rf "$work/sweep_default"
start=$(now)
$py -m tokenprune sweep "${common[@]}" --k_anchors "${ks[@]}" --top_m "${ms[@]}" \
    --alpha "${alphas[@]}" --quiet --output_dir "$work/sweep_default"
sweep_s=$(echo "$(now) - $start" | bc)
echo "sweep, 8 last-block points + random and cls controls, default speed timing: ${sweep_s} s"

n=0; total=0
for k in "${ks[@]}"; do for m in "${ms[@]}"; do for a in "${alphas[@]}"; do
    start=$(now)
    $py -m tokenprune eval "${common[@]}" --quiet --enable_pruning --k_anchors "$k" --top_m "$m" \
        --alpha "$a" --output "$work/eval_k${k}_m${m}_a${a}.json" 2>/dev/null
    s=$(echo "$(now) - $start" | bc); total=$(echo "$total + $s" | bc); n=$((n + 1))
    echo "eval k=$k m=$m alpha=$a: ${s} s"
done; done; done
echo "8 separate evals: ${total} s; per call $(echo "scale=1; $total / $n" | bc) s"
echo "ratio: $(echo "scale=2; $total / $sweep_s" | bc)x"
