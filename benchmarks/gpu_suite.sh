#!/usr/bin/env bash
# Everything a GPU session runs, in one call (GPU time is scarce): install, record the
# machine and versions, run the whole test suite compiled (no interpreter; bf16 included),
# then the benchmarks (python -m regnet_kernels bench), writing CSV, markdown and PNG charts.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_suite.sh
# Results go to $OUT (the device tool's output folder), or ./gpu_out.
#   SUITE_TESTS=0       skip the test suite (e.g. a benchmarks-only session)
#   SUITE_BENCH=quick   (default) bf16: ops and blocks at batch 32, models at batch 1/32/256,
#                       torch.compile only for the blocks and regnety_8gf at batch 32
#   SUITE_BENCH=full    every provider and batch size, and fp16 / fp32 whole models too
#   SUITE_BENCH=0       no benchmarks
#   BENCH_TIMEOUT=...   seconds per benchmark invocation (default 900)
# Where one call may run at most 10 minutes (the device tool), split the session:
#   SUITE_BENCH=0 bash benchmarks/gpu_suite.sh, then
#   SUITE_TESTS=0 BENCH_TIMEOUT=150 bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SUITE_TESTS=${SUITE_TESTS:-1}
SUITE_BENCH=${SUITE_BENCH:-quick}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}

python -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -n 3
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda,
'| cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$SUITE_TESTS" != 0 ]; then
  # -m "slow or not slow": the heavy tests too, they are cheap when compiled
  python -m pytest -q -m "slow or not slow" --junitxml="$OUT/tests.xml" -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log" | tail -n 60
fi

[ "$SUITE_BENCH" = 0 ] && exit 0

# One benchmark invocation: its own CSV / markdown / plots under $OUT, progress in a log; a
# hang or crash in one does not stop the others.
bench() {
  local name=$1; shift
  echo "== bench $name: $*"
  timeout "$BENCH_TIMEOUT" python -m regnet_kernels bench --device cuda "$@" \
    --csv "$OUT/bench-$name.csv" --markdown "$OUT/bench-$name.md" --plot "$OUT/plots" \
    > "$OUT/bench-$name.out" 2> "$OUT/bench-$name.log"
  echo "   exit $? ($(grep -c '' "$OUT/bench-$name.csv" 2>/dev/null || echo 0) CSV lines)"
}

python -m regnet_kernels bench --traffic > "$OUT/traffic.md"
cat "$OUT/traffic.md"

if [ "$SUITE_BENCH" = full ]; then
  bench ops --level op,block --op-batch 32,128
  bench models --level model
  bench models-fp16-fp32 --level model --dtype fp16,fp32 --mode eval --batch 32,256 \
    --provider eager,eager_cl,compile,triton,cuda
else
  # torch.compile recompiles per shape and batch: only where it is few compiles
  fast=eager,eager_cl,triton,cuda
  bench ops --level op --op-batch 32 --provider "$fast"
  bench blocks --level block --op-batch 32
  bench models --level model --batch 1,32,256 --provider "$fast"
  bench models-compile --level model --models regnety_8gf --batch 32 \
    --provider eager_cl,compile,compile_max,triton
fi
tail -n 40 "$OUT"/bench-models.out
