#!/usr/bin/env bash
# The first GPU call: the evidence that matters, in one device call of under 9 minutes on an
# H200 (torch 2.11, triton 3.6, no network). From the repository root:
#
#   bash benchmarks/gpu_first_call.sh            # on the device machine ($OUT set by the tool)
#   DRY_RUN=1 OUT=/tmp/fc bash benchmarks/gpu_first_call.sh   # the CPU dry run (CI does this)
#
# Steps, in this order, each under its own time cap (one hang costs only itself) and within
# the whole budget; each appends to its file directly under $OUT as it goes:
#   install  pip install -e . --no-build-isolation --no-deps
#   env      versions, GPU, clocks                                   env.txt
#   build    (in the background) the CUDA kernels, for sm_90 only   env.txt
#   warm     the Triton kernels of the steps below, compiled in parallel processes
#   parity   fused regnety_8gf (Triton, then CUDA) and eager, bf16, against the fp32 reference
#            at batch 256 and 1: logits and every stage's output     parity.md
#   eval     eval throughput at batch 256 and 1, CUDA-graph replays at batch 1: eager NCHW,
#            eager channels_last, fused Triton, fused CUDA           eval.md, results.csv
#   static   (in the background from here on) the static report (`bench --static`), if any
#   train    one training step at batch 64: parity and time, Triton vs eager_cl   train.md
#   stage3   stage 3's grouped 3x3 conv alone, Triton vs CUDA vs cuDNN, beside the static
#            report's prediction (or why there is none)              stage3.md
#   compile  torch.compile (default mode), if at least COMPILE_MIN s are left   eval.md
# 00-summary.md (a row per step: ok / skipped / FAILED and the headline numbers) is the file
# to open first; log.txt has every step's output, a failed step's traceback included.
# The steps are `python -m regnet_kernels.bench.first_call STEP` (regnet_kernels/bench/first_call.py).
#
#   FIRST_CALL_BUDGET=520  seconds for the whole script (a stopped step gets 10 s more to die;
#                          the device tool stops a call at 600)
#   FIRST_CALL_FAIL=STEP   make STEP raise after its work (the test that a failure is reported
#                          and the steps after it run)
#   DRY_RUN=1              CPU, tiny model at 16x16, batch 1-2, fp32, Triton's interpreter
#   DRY_RUN_CAP_SCALE=4    the dry run's caps and budget, as multiples of the GPU's
set -uo pipefail
BUDGET=${FIRST_CALL_BUDGET:-520}
[ "${DRY_RUN:-0}" != 0 ] && BUDGET=$(( BUDGET * ${DRY_RUN_CAP_SCALE:-4} ))
COMPILE_MIN=${COMPILE_MIN:-60}
source "$(dirname "$0")/gpu_common.sh"
LOG=$OUT/log.txt
SUMMARY=$OUT/00-summary.md

row() {  # step, status, seconds, result: the row a step could not write itself
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${4:-}" >> "$SUMMARY"
}

# step NAME CAP [MIN]: one step, stopped at CAP seconds or what is left of the budget; skipped
# when less than MIN (default 10) seconds are left. The dry run's caps are DRY_RUN_CAP_SCALE
# (default 4) times the GPU's: the interpreter on a busy 2-core machine, not a GPU.
step() {
  local name=$1 cap=$2 min=${3:-10} remaining t0 rc
  [ "$DRY_RUN" != 0 ] && cap=$(( cap * ${DRY_RUN_CAP_SCALE:-4} ))
  remaining=$(left)
  [ "$remaining" -lt "$cap" ] && cap=$remaining
  if [ "$cap" -lt "$min" ]; then
    row "$name" "skipped (out of time: ${remaining} s of the ${BUDGET} s budget left)" 0
    return
  fi
  echo "== $name: cap ${cap} s, $(date -u +%H:%M:%S), $(( $(date +%s) - START )) s in" >> "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$cap" "$PY" -m regnet_kernels.bench.first_call "$name" --cap "$cap" >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0|3) ;;  # the step wrote its own row
    124|137) row "$name" "FAILED (stopped at its ${cap} s cap; log.txt has its last lines)" \
               "$(( $(date +%s) - t0 ))" ;;
    *) row "$name" "FAILED (exit $rc; see log.txt)" "$(( $(date +%s) - t0 ))" ;;
  esac
  return 0
}

# background NAME CAP: a step in the background; its word for the others in $STATE/NAME.done,
# also when it is stopped at its cap
background() {
  ( step "$1" "$2"
    [ -f "$STATE/$1.done" ] || echo "stopped at its cap" > "$STATE/$1.done" ) &
}

cat > "$SUMMARY" <<EOF
# First GPU call: summary

$(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY_RUN" != 0 ] && echo ", DRY RUN (CPU, tiny model, Triton interpreter: mechanics, not numbers)"); budget ${BUDGET} s.
Files: env.txt (versions, GPU, clocks, the build), parity.md (bf16 errors vs the fp32
reference, eager's as the yardstick), eval.md (eval throughput, CUDA graphs, torch.compile),
train.md (training step parity and time), stage3.md (stage 3's grouped conv, measured and
predicted, and the static report), results.csv (the harness's rows), log.txt (every step's output and tracebacks).

$(printf '%s\n' '| step | status | s | result |' '|---|---|---|---|')
EOF
: > "$LOG"

t0=$(date +%s)
row install "$(pip_install "$LOG")" "$(( $(date +%s) - t0 ))"

step env 30
# the CUDA kernels build while the Triton kernels compile; the steps that need them wait
background build 330
build=$!
step warm 140
step parity 80
step eval 100
# the static report compiles on the CPU: after the launch-bound batch-1 timings
background static 200
static=$!
step train 70
step stage3 50
step compile 150 "$COMPILE_MIN"
wait "$build" "$static"
echo "" >> "$SUMMARY"
echo "Total: $(( $(date +%s) - START )) s." >> "$SUMMARY"
cat "$SUMMARY"
