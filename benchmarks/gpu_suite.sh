#!/usr/bin/env bash
# The second GPU call (after benchmarks/gpu_first_call.sh): the tests that only a GPU machine
# runs, compiled (no interpreter), in under 9 minutes. From the repository root:
#
#   bash benchmarks/gpu_suite.sh                          # on the device machine ($OUT set)
#   DRY_RUN=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh  # the CPU dry run (CI does this)
#
# Phases, in order, each one pytest run within what is left of the budget:
#   gpu       -m gpu: the GPU-only tests (the C++ extension's CUDA kernels, CUDA graphs,
#             autocast on the GPU backends, TF32)
#   bf16      -m "bf16 and not gpu": the Triton ops', blocks' and models' bf16 tests (bf16
#             never runs on the CPU machines: the interpreter computes bf16 dots wrongly)
#   compiled  -m "not bf16 and not gpu": the same files' fp32 / fp16 / fp64 tests, compiled
#             for the GPU, as far as the budget goes
# The CPU-only checks (tests/backends/triton/test_compile_targets.py's sm_90 compile,
# tests/backends/cuda/test_cuda_sources.py's nvcc checks, the CUDA emulation (-m cuda_emu), the
# C++ CPU backend (-m cpp_cpu)) never run here: CPU_ONLY leaves them out of every phase.
# The CUDA kernels are built first, in the background, for sm_90 only (as the first call
# does). pytest-xdist (-n WORKERS) and pytest-timeout (--timeout TEST_TIMEOUT) are used where
# installed (the device image has both); without pytest-timeout a test that hangs has its
# stack dumped after TEST_TIMEOUT s (faulthandler) and its phase stops at the budget.
#
# Files in $OUT: 00-summary.md (failures first, then a row per phase), tests.log (pytest -v
# output of every phase, as it runs), junit-<phase>.xml, env.txt (the build).
#   SUITE_BUDGET=520  seconds for the whole script     TEST_TIMEOUT=300  seconds per test
#   WORKERS=12        xdist processes                  DRY_RUN=1: CPU, the interpreter, and
#   SUITE_DRY_TESTS   the dry run's tests (default tests/test_design.py)
set -uo pipefail
BUDGET=${SUITE_BUDGET:-520}
source "$(dirname "$0")/gpu_common.sh"
export COLUMNS=${COLUMNS:-200}  # pytest: whole reasons in the short summary
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
WORKERS=${WORKERS:-12}
LOG=$OUT/tests.log
SUMMARY=$OUT/00-summary.md
BUILD=$STATE/build  # the build step's own $OUT: its summary row and env.txt, folded in below
mkdir -p "$BUILD"

TRITON_FILES=(tests/ops tests/backends/triton/test_igemm.py
  tests/test_fused_block_eval.py tests/test_fused_block_train.py tests/test_fused_model.py
  tests/test_gradcheck.py)
GPU_FILES=(tests/ops tests/backends/cuda/test_cuda_blocks.py tests/backends/cpp/test_blocks.py
  tests/backends/triton/test_igemm.py tests/test_fused_model.py tests/test_fused_block_train.py)
CPU_ONLY="not cuda_emu and not cpp_cpu"
if [ "$DRY_RUN" != 0 ]; then
  read -r -a DRY_FILES <<< "${SUITE_DRY_TESTS:-tests/test_design.py}"
  PHASES=(dry)
else
  PHASES=(gpu bf16 compiled)
fi

phase_args() {  # the marker expression and files of a phase
  case $1 in
    gpu) MARKS="gpu and $CPU_ONLY"; FILES=("${GPU_FILES[@]}") ;;
    bf16) MARKS="bf16 and not gpu and $CPU_ONLY"; FILES=("${TRITON_FILES[@]}") ;;
    compiled) MARKS="not bf16 and not gpu and $CPU_ONLY"; FILES=("${TRITON_FILES[@]}") ;;
    dry) MARKS="not slow"; FILES=("${DRY_FILES[@]}") ;;
  esac
}

parallel=()
if "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ] && [ "$DRY_RUN" = 0 ]; then
  parallel=(-n "$WORKERS")
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout "$TEST_TIMEOUT")
else
  per_test=(-o "faulthandler_timeout=$TEST_TIMEOUT")
fi

declare -A RESULT SECONDS_OF

# 00-summary.md from what has run so far: failures first, then the phases.
summarize() {
  local tmp=$SUMMARY.tmp failures
  # pytest's short summary lines (with the reason), else the -v line of a test whose phase
  # was stopped before its summary; faulthandler's dumps of a hung test
  failures=$(awk '
    /^(FAILED|ERROR) / { reason[$2] = $0; next }
    / (FAILED|ERROR) +\[/ { seen[$1] = $2 " " $1; next }
    /\] (FAILED|ERROR) / { for (i = 1; i < NF; i++) if ($i == "FAILED" || $i == "ERROR") seen[$(i + 1)] = $i " " $(i + 1); next }
    /^Timeout \(/ { hung = hung $0 " (faulthandler: a test ran past TEST_TIMEOUT)\n" }
    END { for (id in reason) print reason[id]; for (id in seen) if (!(id in reason)) print seen[id]; printf "%s", hung }
  ' "$LOG" 2>/dev/null)
  {
    echo "# GPU test suite: summary"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY_RUN" != 0 ] && echo ", DRY RUN (CPU)"); budget ${BUDGET} s;" \
         "${parallel[*]:-no xdist}; ${per_test[*]}. Full output: tests.log."
    echo
    echo "## Failures"
    echo
    if [ -n "$failures" ]; then echo '```'; echo "$failures"; echo '```'; else echo "none"; fi
    echo
    echo "## Phases"
    echo
    echo "| phase | selection | result | s |"
    echo "|---|---|---|---|"
    grep -h '^| build ' "$BUILD/00-summary.md" 2>/dev/null
    for p in "${PHASES[@]}"; do
      phase_args "$p"
      echo "| $p | -m \"$MARKS\", ${#FILES[@]} files | ${RESULT[$p]:-not run yet} | ${SECONDS_OF[$p]:-} |"
    done
  } > "$tmp"
  mv "$tmp" "$SUMMARY"
}

: > "$LOG"
echo "install: $(pip_install "$LOG")" >> "$LOG"
# The CUDA kernels (sm_90 only), while the first tests start; a test that needs them waits.
OUT=$BUILD timeout -k 10 330 "$PY" -m regnet_kernels.bench.first_call build --cap 330 \
  >> "$BUILD/build.log" 2>&1 &
build=$!
summarize

for p in "${PHASES[@]}"; do
  phase_args "$p"
  remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    RESULT[$p]="not run (${remaining} s of the budget left)"
    continue
  fi
  echo "== phase $p: -m \"$MARKS\" ${FILES[*]} (cap ${remaining} s, $(date -u +%H:%M:%S))" >> "$LOG"
  t0=$(date +%s)
  first=$(( $(wc -l < "$LOG") + 1 ))
  timeout -k 10 "$remaining" "$PY" -m pytest -v -rfE -p no:cacheprovider "${parallel[@]}" \
    "${per_test[@]}" -m "$MARKS" --junitxml="$OUT/junit-$p.xml" "${FILES[@]}" >> "$LOG" 2>&1
  rc=$?
  SECONDS_OF[$p]=$(( $(date +%s) - t0 ))
  counts=$(tail -n +"$first" "$LOG" | grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$' | tail -n 1 | tr -d '=' | xargs)
  case $rc in
    124|137) RESULT[$p]="stopped at the budget (${counts:-no count}); tests.log has the tests that ended" ;;
    *) RESULT[$p]="${counts:-no count} (exit $rc)" ;;
  esac
  summarize
done
wait "$build" || grep -q '^| build ' "$BUILD/00-summary.md" 2>/dev/null \
  || echo "| build | FAILED (stopped at its cap or crashed; env.txt has its log) | | |" >> "$BUILD/00-summary.md"
cat "$BUILD/env.txt" > "$OUT/env.txt" 2>/dev/null
cat "$BUILD/build.log" >> "$OUT/env.txt" 2>/dev/null
summarize
printf "\nTotal: %s s.\n" "$(( $(date +%s) - START ))" >> "$SUMMARY"
cat "$SUMMARY"
