#!/usr/bin/env bash
# The one command to check a kernel change on the GPU machine (run from the repository root there):
#   bash scripts/gpu_check.sh [extra flags for python -m benchmarks.attention, e.g. --impls fa2 ours]
# 1. installs the carried wheels (.whl/*.whl: adasplash, entmax) into /tmp/site, when .whl exists;
# 2. runs the GPU tests:       python3 -m pytest -q -m gpu tests/
# 3. runs the quick benchmark: python3 -m benchmarks.attention --quick
# 4. prints a one-screen summary (GPU, test result, benchmark errors and table).
# Logs, JSON and PNGs go to $OUT (the device tool's folder that comes back), else /tmp/gpu_check. The device tool
# returns at most 8 files from $OUT: when more were written, they are packed into $OUT/gpu_check.tgz (extract with
# tar xzf) and only that and summary.txt stay loose.
# Environment: ENTFLASH_COMMIT overrides the commit found by git; GPU_CHECK_TEST_TIMEOUT and
# GPU_CHECK_BENCH_TIMEOUT (seconds, default 240 each); GPU_CHECK_SKIP_TESTS=1 skips step 2;
# GPU_CHECK_PRESET=paper|cpu runs that preset instead of --quick.
# Side by side with a baseline tree: GPU_CHECK_BASELINE=DIR (a folder holding the baseline's src/, made before the
# call with `mkdir -p build/base && git archive REV src | tar x -C build/base` and carried) and
# GPU_CHECK_BASELINE_COMMIT=REV run the same benchmark a second time, on the same machine, with DIR/src imported
# first and the JSON named after REV; the summary prints both tables. Set ENTFLASH_COMMIT too where the device's
# copy has no git history.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp/gpu_check}"
baseline="${GPU_CHECK_BASELINE:-}"
if [ -n "$baseline" ] && { [ ! -d "$baseline/src/entflash" ] || [ -z "${GPU_CHECK_BASELINE_COMMIT:-}" ]; }; then
    echo "gpu_check: GPU_CHECK_BASELINE must hold src/entflash and GPU_CHECK_BASELINE_COMMIT name its commit" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

preset="${GPU_CHECK_PRESET:-quick}"

bench() {  # bench LOG [harness flags]: the benchmark on whichever tree PYTHONPATH names first; its exit status
    local log="$1"
    shift
    timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" $python -m benchmarks.attention "--$preset" --out "$out" "$@" 2>&1 \
        | tee "$log"
    return "${PIPESTATUS[0]}"
}

gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1 | head -1)"

tests_rc=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]; then
    timeout "${GPU_CHECK_TEST_TIMEOUT:-240}" $python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
        | tee "$out/pytest_gpu.log"
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" = 5 ] && tests_rc=0  # pytest's "no test selected": no GPU tests yet
fi

bench "$out/bench_$preset.log" "$@"
bench_rc=$?

baseline_rc=0
if [ -n "$baseline" ]; then
    PYTHONPATH="$(cd "$baseline" && pwd)/src:$PYTHONPATH" ENTFLASH_COMMIT="$GPU_CHECK_BASELINE_COMMIT" \
        bench "$out/bench_${preset}_baseline.log" "$@"
    baseline_rc=$?
fi

{
    echo
    echo "================ gpu_check summary ================"
    echo "gpu:   $gpu"
    if [ "${GPU_CHECK_SKIP_TESTS:-0}" = "1" ]; then
        echo "tests: skipped (GPU_CHECK_SKIP_TESTS=1)"
    else
        echo "tests: exit $tests_rc ($( [ "$tests_rc" = 124 ] && echo "timed out; " )$(tail -1 "$out/pytest_gpu.log"))"
        grep -E "^(FAILED|ERROR) " "$out/pytest_gpu.log" | head -15
    fi
    echo "bench: exit $bench_rc$( [ "$bench_rc" = 124 ] && echo " (timed out: JSON holds the cases done)")"
    if [ -n "$baseline" ]; then
        echo "baseline ($GPU_CHECK_BASELINE_COMMIT): exit $baseline_rc"
    fi
    # the newest JSON, and with a baseline the one before it too (each run writes one)
    ls -t "$out"/*.json 2>/dev/null | head -"$( [ -n "$baseline" ] && echo 2 || echo 1)" | while read -r results; do
        $python -m benchmarks.summary "$results"
    done
} | tee "$out/summary.txt"

n_files=$(find "$out" -type f | wc -l)
if [ "$n_files" -gt 8 ]; then
    pack="$(mktemp -d)"
    (cd "$out" && find . -type f ! -name summary.txt -print0 | tar czf "$pack/gpu_check.tgz" --null -T - \
        && find . -mindepth 1 ! -name summary.txt -delete) && mv "$pack/gpu_check.tgz" "$out/"
    rmdir "$pack"
    echo "gpu_check: $n_files files packed into $out/gpu_check.tgz (the device returns at most 8)"
fi

[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$baseline_rc" = 0 ]
