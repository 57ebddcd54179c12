#!/usr/bin/env bash
# Everything a GPU session runs, in one call (GPU time is scarce): install, record the
# machine and versions, run the whole test suite compiled (no interpreter; bf16 included),
# then the benchmarks (python -m regnet_kernels bench), writing CSV, markdown and PNG charts.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_suite.sh
#   SUITE_TESTS=0       skip the test suite (e.g. a benchmarks-only session)
#   SUITE_BENCH=quick   (default) bf16: ops and blocks at batch 32, models at batch 1/32/256,
#                       torch.compile only for the blocks and regnety_8gf at batch 32
#   SUITE_BENCH=full    every provider and batch size, and fp16 / fp32 whole models too
#   SUITE_BENCH=0       no benchmarks
#   SUITE_PYTEST_ARGS   extra pytest arguments, e.g. "tests/test_cuda_backend.py -x"
#   TEST_TIMEOUT=...    seconds for the whole test run (default 480)
#   BENCH_TIMEOUT=...   seconds per benchmark invocation (default 900)
#   WORKERS=...         pytest-xdist workers where it is installed (default 8): Triton's
#                       compiles, not the GPU, bound the suite's time
# Where one call may run at most 10 minutes (the device tool), split the session:
#   SUITE_BENCH=0 bash benchmarks/gpu_suite.sh, then
#   SUITE_TESTS=0 BENCH_TIMEOUT=120 bash benchmarks/gpu_suite.sh
#
# Results: everything is written under $RESULTS (default ./gpu_out) and packed after
# each stage into $OUT/results.tgz, so a run stopped at a limit still returns what it
# finished; $OUT also gets the few files worth reading first (env, test summary, model
# tables). The device tool returns at most 8 files: keep it at that.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-gpu_out}
RESULTS=${RESULTS:-gpu_out}
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SUITE_TESTS=${SUITE_TESTS:-1}
SUITE_BENCH=${SUITE_BENCH:-quick}
TEST_TIMEOUT=${TEST_TIMEOUT:-480}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}
WORKERS=${WORKERS:-8}

# Pack $RESULTS into $OUT and copy the summaries beside it (at most 8 files in $OUT).
pack() {
  if [ "$(cd "$RESULTS" && pwd)" != "$(cd "$OUT" && pwd)" ]; then
    tar -czf "$OUT/results.tgz" -C "$RESULTS" . 2>/dev/null
    for f in env.txt tests-summary.txt bench-models.md bench-models-compile.md traffic.md; do
      [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
    done
  fi
  return 0
}

$PY -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -n 3
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda,
'| cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__)"
  nvcc --version | tail -n 2
  $PY -m regnet_kernels env  # builds the C++ extension and its CUDA kernels
} > "$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"
pack

if [ "$SUITE_TESTS" != 0 ]; then
  parallel=()
  if $PY -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
    parallel=(-n "$WORKERS")
  fi
  per_test=()
  if $PY -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout 300)  # a hung kernel fails its test, not the whole run
  fi
  # -m "slow or not slow": the heavy tests too, they are cheap when compiled. -v: a line per
  # test as it ends, so a run stopped by the timeout still says what failed.
  # shellcheck disable=SC2086
  timeout "$TEST_TIMEOUT" $PY -m pytest -v -m "slow or not slow" -p no:cacheprovider \
    "${parallel[@]}" "${per_test[@]}" --junitxml="$RESULTS/tests.xml" ${SUITE_PYTEST_ARGS:-} \
    > "$RESULTS/tests.log" 2>&1
  echo "pytest exit $?" >> "$RESULTS/tests.log"
  # the failures' one-line reasons and the counts: what to read first
  grep -E "FAILED|ERROR|passed|failed|pytest exit" "$RESULTS/tests.log" \
    > "$RESULTS/tests-summary.txt"
  tail -n 60 "$RESULTS/tests.log"
  pack
fi

[ "$SUITE_BENCH" = 0 ] && exit 0

# One benchmark invocation: its own CSV / markdown / plots under $RESULTS, progress in a
# log; a hang or crash in one does not stop the others.
bench() {
  local name=$1; shift
  echo "== bench $name: $*"
  timeout "$BENCH_TIMEOUT" $PY -m regnet_kernels bench --device cuda "$@" \
    --csv "$RESULTS/bench-$name.csv" --markdown "$RESULTS/bench-$name.md" \
    --plot "$RESULTS/plots" > "$RESULTS/bench-$name.out" 2> "$RESULTS/bench-$name.log"
  echo "   exit $? ($(grep -c '' "$RESULTS/bench-$name.csv" 2>/dev/null || echo 0) CSV lines)"
  pack
}

$PY -m regnet_kernels bench --traffic > "$RESULTS/traffic.md"
cat "$RESULTS/traffic.md"

if [ "$SUITE_BENCH" = full ]; then
  bench ops --level op,block --op-batch 32,128
  bench models --level model
  bench models-fp16-fp32 --level model --dtype fp16,fp32 --mode eval --batch 32,256 \
    --provider eager,eager_cl,compile,triton,cuda
else
  # torch.compile recompiles per shape and batch: only where it is few compiles
  fast=eager,eager_cl,triton,cuda
  bench models --level model --batch 1,32,256 --provider "$fast"
  bench ops --level op --op-batch 32 --provider "$fast"
  bench blocks --level block --op-batch 32
  bench models-compile --level model --models regnety_8gf --batch 32 \
    --provider eager_cl,compile,compile_max,triton
fi
tail -n 40 "$RESULTS"/bench-models.out
