#!/usr/bin/env bash
# The recipe's evidence run on one GPU (see recipes/README.md), from the repository root:
#     bash recipes/run_gpu.sh DEST [flags passed to every training process]
# 1. recipes.backend_check, one process per case in parallel: the fused ("triton") entmax backend is used only if
#    every case matches the exact one;
#    otherwise every entmax model trains on the exact torch backend (DEST/backend_check.jsonl says why). The
#    check compiles the fused kernels: on a fresh machine that took over 45 s once, so allow it time.
# 2. One training process per attention type, run side by side on the GPU (small models are launch-bound, so
#    they overlap well); their tokens/s are therefore measured while sharing the GPU.
# 3. Training throughput of each type measured alone (fresh models, random tokens), one type after another.
# 4. Merge into DEST/results.json and DEST/length_generalization.png; logs without progress bars in DEST/train.log.
# Hard wall-clock limits in seconds (a killed process keeps the runs it finished): RECIPE_CHECK_TIMEOUT,
# RECIPE_TRAIN_TIMEOUT, RECIPE_THROUGHPUT_TIMEOUT (unlimited by default). RECIPE_FALLBACK_FLAGS: flags added
# to every process when the check sends training to the (slower) torch backend, e.g. "--steps 300".
set -uo pipefail
dest=${1:?usage: bash recipes/run_gpu.sh DEST [flags]}
shift
python=${PYTHON:-python3}
work=${RECIPE_WORK:-/tmp/recipe_runs}
export PYTHONUNBUFFERED=1
unlimited=1000000
check_timeout=${RECIPE_CHECK_TIMEOUT:-$unlimited}
train_timeout=${RECIPE_TRAIN_TIMEOUT:-$unlimited}
throughput_timeout=${RECIPE_THROUGHPUT_TIMEOUT:-$unlimited}
mkdir -p "$dest" "$work"
# the check's cases run in parallel processes (each is dominated by compiling its kernels); all must pass
backend=triton
check_pids=()
for ((case = 0; case < $($python -m recipes.backend_check --count); case++)); do
    timeout "$check_timeout" $python -m recipes.backend_check --case "$case" > "$work/backend_check_$case.jsonl" &
    check_pids+=($!)
done
for pid in "${check_pids[@]}"; do wait "$pid" || backend=torch; done
cat "$work"/backend_check_*.jsonl > "$dest/backend_check.jsonl"
fallback=()
if [ "$backend" = torch ] && [ -n "${RECIPE_FALLBACK_FLAGS:-}" ]; then read -r -a fallback <<< "$RECIPE_FALLBACK_FLAGS"; fi
echo "entmax backend for training: $backend ${fallback[*]}"
types=(softmax entmax learnable asentmax)
pids=()
for attention in "${types[@]}"; do
    timeout "$train_timeout" $python -m recipes.length_generalization --config gpu "$@" "${fallback[@]}" \
        --attention "$attention" --entmax-backend "$backend" --throughput-lengths '' --out "$work/$attention" \
        > "$work/$attention.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
timeout "$throughput_timeout" $python -m recipes.length_generalization --config gpu "$@" "${fallback[@]}" \
    --tasks '' --entmax-backend "$backend" --out "$work/throughput" > "$work/throughput.log" 2>&1
finished=()
for name in "${types[@]}" throughput; do
    [ -f "$work/$name/results.json" ] && finished+=("$work/$name")
done
for name in "${types[@]}" throughput; do
    echo "== $name"
    tr '\r' '\n' < "$work/$name.log" | grep -v '%|' | grep -v '^\s*$'
done > "$dest/train.log"
cat "$dest/train.log"
$python -m recipes.length_generalization --merge "${finished[@]}" --out "$dest"
