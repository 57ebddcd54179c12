# Shared by benchmarks/gpu_first_call.sh and benchmarks/gpu_suite.sh (sourced, after BUDGET is
# set): the repository root, $OUT as an absolute folder, the dry run's or the GPU's environment,
# the time left of the budget, and the install.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PY:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PYTHONUNBUFFERED=1
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)
STATE=$(mktemp -d)  # the background steps' word and files (first_call.py: FIRST_CALL_STATE)
export FIRST_CALL_STATE=$STATE
trap 'rm -rf "$STATE"' EXIT
if [ "$DRY_RUN" != 0 ]; then
  # the Triton kernels in the interpreter, also for the bench harness's triton provider
  export TRITON_INTERPRET=1 REGNET_BENCH_INTERPRETER=1
else
  unset TRITON_INTERPRET REGNET_BENCH_INTERPRETER
  # the CUDA kernels for sm_90 only: half the nvcc time of the default 90a + 80 build
  export REGNET_KERNELS_CUDA_ARCHS=90a
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# pip_install LOG: pip install -e . (not in the dry run); prints ok, skipped or FAILED
pip_install() {
  if [ "$DRY_RUN" != 0 ]; then
    echo "skipped (dry run)"
  elif timeout 40 "$PY" -m pip install -q -e . --no-build-isolation --no-deps >> "$1" 2>&1; then
    echo ok
  else
    echo "FAILED (see the log; the steps run from the source tree anyway)"
  fi
}
