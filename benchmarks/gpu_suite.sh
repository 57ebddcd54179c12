#!/usr/bin/env bash
# Everything a GPU session runs, in one call (GPU time is scarce): install, record the
# machine and versions, run the whole test suite compiled (no interpreter; bf16 included).
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_suite.sh
# Results go to $OUT (the device tool's output folder), or ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

python -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -n 3
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda,
'| cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -m "slow or not slow": the heavy tests too, they are cheap when compiled
python -m pytest -q -m "slow or not slow" --junitxml="$OUT/tests.xml" -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -n 60
