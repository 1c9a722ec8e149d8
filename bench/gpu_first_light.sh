#!/usr/bin/env bash
# One command that turns a lent GPU into numbers (issue 19): from a fresh checkout, offline, with the machine's own
# torch, triton and transformers. Stages run in the order their numbers are worth under one deadline; a stage that
# fails or runs out of time is recorded and every stage that does not need it still runs. The stage runner is
# bench/first_light/ (Python, standard library only); this wrapper gives it a scratch directory and, on any exit,
# makes sure the results and logs are written ($OUT, or --out) and the scratch directory is removed.
#
#   bench/gpu_first_light.sh                  # on the GPU machine, from anywhere: 540 s budget, results in $OUT
#   bench/gpu_first_light.sh --budget 300     # a shorter deadline: the last stages get what is left, or are skipped
#   bench/gpu_first_light.sh --dry-run        # print the stages, each one's budget and the worst case; run nothing
#   bench/gpu_first_light.sh --cpu-smoke      # the same control flow on a CPU: tiny model, smoke sizes
#   bench/gpu_first_light.sh --help           # every option
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if [ -z "$PYTHON" ]; then
    echo "gpu_first_light: no python3 on PATH (set PYTHON=...)" >&2
    exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hayabusa-first-light.XXXXXX") || exit 1
RUNNER_PATH="$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"

# On any exit: if the runner died before it wrote the results (killed, out of memory, a crash), write them from
# what it left (a no-op after a whole run); then drop the scratch directory (the 2.7B checkpoint alone is 5 GB).
finish() {
    local status=$?
    if [ -f "$WORK/run.json" ]; then
        PYTHONPATH="$RUNNER_PATH" "$PYTHON" -m first_light --work "$WORK" --finish \
            || echo "gpu_first_light: could not write the results (runner exit status $status)" >&2
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap finish EXIT

# The runner is imported from bench/ (it runs before the checkout is installed: installing it is one of its stages;
# it takes bench/ off the stages' PYTHONPATH). It runs in the background so that a SIGTERM, SIGHUP or SIGINT sent
# to this script reaches it at once: it then stops the stage in flight, skips the rest and still writes the
# results, which `wait` lets it finish.
PYTHONPATH="$RUNNER_PATH" "$PYTHON" -m first_light --work "$WORK" "$@" &
RUNNER=$!
FORWARDED=0
trap 'FORWARDED=1; kill -TERM "$RUNNER" 2>/dev/null' TERM HUP INT
wait "$RUNNER"
status=$?
while [ "$FORWARDED" = 1 ]; do  # a trapped signal ended `wait` early: wait for the runner's own exit status
    FORWARDED=0
    wait "$RUNNER"
    status=$?
done
exit "$status"
