#!/usr/bin/env bash
# One command for a first look at hayabusa on one GPU (issue 9 part 7), from a fresh checkout, offline, with the
# machine's own torch, triton and transformers. Stages run cheapest-to-fail first, each under its own timeout; the
# first failure stops the run. Budget: <= 8 minutes on an H200.
#
#   bench/gpu_first_light.sh              # on the GPU machine, from the repository root
#   bench/gpu_first_light.sh --dry-run    # print the stages, commands and budget; run nothing
#   bench/gpu_first_light.sh --cpu-smoke  # the same control flow on a CPU: tiny model, smoke sizes (tests the script)
#
# Writes bench/results/<gpu>-<date>.{json,md,png} (and copies them, with the stage log, to $OUT when set).
set -euo pipefail

MODE=gpu
case "${1:-}" in
    "") ;;
    --dry-run) MODE=dry ;;
    --cpu-smoke) MODE=cpu ;;
    *) echo "usage: $0 [--dry-run | --cpu-smoke]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python}
RUN_START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hayabusa-first-light.XXXXXX")
LOG="$WORK/stages.log"
RESULTS_DIR=${RESULTS_DIR:-$REPO/bench/results}
HAYABUSA=("$PYTHON" -m hayabusa)
SUMMARY=()

# A fresh, offline cache for everything: the run never downloads and never reads another run's compiled kernels.
export HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HAYABUSA_CACHE="$WORK/hayabusa-cache"
export TRITON_CACHE_DIR="$WORK/triton-cache" PIP_NO_INDEX=1 PYTHONUNBUFFERED=1

if [ "$MODE" = cpu ]; then
    MODEL=tiny DEVICE=cpu
    KERNEL_TESTS=(tests/kernels/test_rotary.py)
    BENCH_ARGS=(--sizes smoke --scenarios load decode --engines hayabusa-reference transformers-eager)
    VERIFY_ARGS=(--ops torch)
    RESULTS_DIR=${RESULTS_DIR_OVERRIDE:-$WORK/results}
else
    MODEL=2.7b DEVICE=cuda
    KERNEL_TESTS=(tests/kernels)
    BENCH_ARGS=(--sizes gpu --scenarios load decode prefill
                --engines hayabusa transformers-eager transformers-compile)
    VERIFY_ARGS=()
fi

fail() {
    echo "gpu_first_light: FAILED: $*" >&2
    print_summary >&2
    exit 1
}

print_summary() {
    local elapsed=$(( $(date +%s) - RUN_START ))
    echo "---- stage summary ($elapsed s of a 480 s budget; work dir $WORK) ----"
    local line
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
}

# stage NAME BUDGET_S TIMEOUT_S COMMAND...: run one stage under `timeout`, log its output, time it.
stage() {
    local name=$1 budget=$2 limit=$3
    shift 3
    if [ "$MODE" = dry ]; then
        printf '  %-22s budget %4ss, timeout %4ss: %s\n' "$name" "$budget" "$limit" "$*"
        return 0
    fi
    echo "==== $name (budget ${budget}s, timeout ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || status=${PIPESTATUS[0]}
    local took=$(( SECONDS - start ))
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        SUMMARY+=("$name: TIMED OUT after ${took}s (limit ${limit}s)")
        fail "$name ran past its ${limit}s limit"
    elif [ "$status" -ne 0 ]; then
        SUMMARY+=("$name: failed (exit $status) after ${took}s")
        fail "$name exited with status $status (log: $LOG)"
    fi
    SUMMARY+=("$name: ok in ${took}s (budget ${budget}s)")
}

skip() {
    SUMMARY+=("$1: skipped ($2)")
    echo "==== $1: skipped ($2)" | tee -a "$LOG"
}

preflight() {
    command -v "$PYTHON" >/dev/null || fail "no '$PYTHON' on PATH (set PYTHON=...)"
    if [ "$MODE" = gpu ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
            || fail "no NVIDIA GPU visible (nvidia-smi -L failed); this script needs one (--cpu-smoke tests it on a CPU)"
    fi
    "$PYTHON" - "$MODE" <<'EOF' || fail "the preinstalled packages cannot run this (see the line above)"
import sys
mode = sys.argv[1]
try:
    import torch, triton, transformers  # noqa: F401 (the machine's own builds; nothing is downloaded)
except ImportError as err:
    sys.exit(f"missing package: {err.name} (the run needs the machine's own torch, triton and transformers)")
major, minor = (int(part) for part in torch.__version__.split(".")[:2])
if (major, minor) < (2, 4):
    sys.exit(f"torch {torch.__version__} is too old: hayabusa needs torch >= 2.4")
if int(transformers.__version__.split(".")[0]) != 5:
    sys.exit(f"transformers {transformers.__version__}: the bench and verify need transformers 5.x")
if mode == "gpu" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no driver)")
device = torch.cuda.get_device_name(0) if mode == "gpu" else "cpu"
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; {device}")
EOF
}

echo "gpu_first_light: mode $MODE, model $MODEL on $DEVICE; work dir $WORK"
if [ "$MODE" != dry ]; then
    preflight
fi
[ "$MODE" = dry ] && echo "stages (cheapest to fail first), 480 s budget in all:"

stage install 20 120 "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
stage checkpoint 25 180 "$PYTHON" -c \
    "from hayabusa.engine.loading.random_models import random_preset_dir as d; print(d('$MODEL'))"
stage kernel-tests 100 200 "$PYTHON" -m pytest -q -x -p no:cacheprovider "${KERNEL_TESTS[@]}"
if [ "$MODE" = dry ] || command -v compute-sanitizer >/dev/null; then
    # Small shapes (tests/kernels honours HAYABUSA_KERNEL_SHAPES=small on a GPU); no caching allocator, so an
    # out-of-bounds access lands outside any allocation and memcheck sees it.
    stage memcheck-small 60 150 env HAYABUSA_KERNEL_SHAPES=small PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/kernels
else
    skip memcheck-small "compute-sanitizer is not on PATH (CUDA toolkit bin/)"
fi
stage verify-fp16 35 150 "${HAYABUSA[@]}" verify --model "$MODEL" --device "$DEVICE" \
    --dtype float16 "${VERIFY_ARGS[@]}"
stage verify-bf16 35 150 "${HAYABUSA[@]}" verify --model "$MODEL" --device "$DEVICE" \
    --dtype bfloat16 "${VERIFY_ARGS[@]}"
stage bench 190 330 "${HAYABUSA[@]}" bench --model "$MODEL" --device "$DEVICE" \
    --out "$WORK/bench-out" "${BENCH_ARGS[@]}"

if [ "$MODE" = dry ]; then
    echo "then: bench/results/<gpu>-<date>.{json,md,png} (and \$OUT when set)"
    rm -rf "$WORK"
    exit 0
fi

# <gpu>-<date>: the device name as the run recorded it, lower-case, runs of other characters as one dash.
NAME=$("$PYTHON" -c "
import json, re, sys
run = json.load(open(sys.argv[1]))
device = run['device'].split(' (')[0] if run['device_type'] == 'cuda' else 'cpu-' + (run['model']['preset'] or 'model')
print(re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-') + '-' + run['created'][:10])" "$WORK/bench-out/results.json")
mkdir -p "$RESULTS_DIR"
for ext in json md png; do
    cp "$WORK/bench-out/results.$ext" "$RESULTS_DIR/$NAME.$ext"
done
if [ -n "${OUT:-}" ]; then  # the device tool returns what is under $OUT (at most 8 files)
    mkdir -p "$OUT"
    cp "$RESULTS_DIR/$NAME".{json,md,png} "$LOG" "$OUT/"
fi
SUMMARY+=("results: $RESULTS_DIR/$NAME.{json,md,png}${OUT:+ (copied to $OUT)}")
print_summary
