"""The pytest-benchmark side of the harness (``pytest benchmarks/ --benchmark-only``).

The files ``benchmarks/bench_<op>.py`` parametrize over `params(...)` and call `run(...)`: the
same cases and providers as the CLI, at the CLI preset's sizes for the machine (cuda: layer
shapes of regnety_8gf at 224, batch 32, bf16; no GPU: the smoke preset, fp32 at 64x64, batch 2)
and one batch size per case (the batch sweep is the CLI's job). Providers that cannot run here
are skipped with the reason. pytest-benchmark does its own timing (it calls the step with a
device synchronize; no L2 flush): use these files to track regressions with
``--benchmark-compare``, and the CLI for the roofline report.
"""
from __future__ import annotations

import pytest
import torch

from .cases import block_cases, model_case, op_cases
from .cli import PRESETS
from .providers import PROVIDERS, Unavailable, make_step, prepare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = PRESETS["cuda" if DEVICE == "cuda" else "smoke"]


def _cases(level: str, op: str | None):
    model, resolution = PRESET["model"], PRESET["resolution"]
    if level == "op":
        return [c for c in op_cases(model, resolution) if c.op == op]
    if level == "block":
        return block_cases(model, resolution)
    return [model_case(m, resolution) for m in PRESET["models"]]


def params(level: str, op: str | None = None) -> list:
    """pytest params (case, mode, dtype, batch, provider) of a level (and op)."""
    out = []
    for case in _cases(level, op):
        for mode in (m for m in PRESET["modes"] if m in case.modes):
            for dtype in PRESET["dtypes"]:
                for batch in PRESET["op_batches"]:
                    for provider in PRESET["providers"] or PROVIDERS:
                        out.append(pytest.param(case, mode, dtype, batch, provider,
                                                id=f"{case.name}-{mode}-{dtype}-b{batch}-"
                                                   f"{provider}"))
    return out


def run(benchmark, case, mode: str, dtype: str, batch: int, provider: str) -> None:
    """Time one (case, mode, dtype, batch, provider) with pytest-benchmark, or skip why not."""
    try:
        prepared = prepare(case, provider, dtype, mode, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e).splitlines()[0])
    with torch.set_grad_enabled(mode == "train"):
        step = make_step(prepared, case, batch, dtype, mode, DEVICE)

        def call():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        try:
            call()  # warm-up: compilation, autotuning, first allocations
        except NotImplementedError as e:
            pytest.skip(str(e).splitlines()[0])
        benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads(),
                                    flops=case.cost(batch, dtype).flops)
        benchmark(call)
