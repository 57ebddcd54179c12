"""Whole-model providers (eval forward, or training step) timed call by call in one process
(the harness's `time_cpu_per_call`, as `bench --per-call`: every round calls each provider
once, the order rotated each round, so a load change on a shared machine hits all of them
alike); prints each provider's median and quartiles over the rounds, its median count of
page faults per call (minor faults: first touches of freshly
mapped memory) and the fused ``cpu`` provider's speedup over it. The providers are the
harness's (`bench.providers`), plus ``cpu_whole_batch``: the fused model with its packed
blocks running the whole batch at once (no chunks, see
`backends.cpp.ops.choose_images_per_chunk`).

    python benchmarks/interleaved_calls.py regnety_400mf 4 20 eager_cl,compile_freeze,cpu [bf16]
    python benchmarks/interleaved_calls.py regnety_400mf 8 20 eager_cl,cpu bf16 train 96
"""
import resource
import statistics
import sys

import torch

from regnet_kernels.backends.cpp import ops as cpp
from regnet_kernels.bench.cases import model_case
from regnet_kernels.bench.providers import make_step, prepare
from regnet_kernels.bench.timing import time_cpu_per_call

WHOLE_BATCH = "cpu_whole_batch"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm(provider: str, step) -> None:
    """Two calls: compiles, packs (without chunks for WHOLE_BATCH), warms the caches."""
    budget = cpp.chunk_budget_bytes
    if provider == WHOLE_BATCH:
        cpp.chunk_budget_bytes = lambda: 1 << 62
    try:
        step()
        step()
    finally:
        cpp.chunk_budget_bytes = budget


def counting_faults(step, faults: list[int]):
    """step, appending the page faults of each call to `faults`."""
    def call():
        before = minor_faults()
        step()
        faults.append(minor_faults() - before)
    return call


def main(model: str, batch: int, rounds: int, providers: list[str], dtype: str = "fp32",
         mode: str = "eval", resolution: int = 224, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    case = model_case(model, resolution)
    faults: dict[str, list[int]] = {p: [] for p in providers}
    with torch.set_grad_enabled(mode == "train"):
        steps = {p: make_step(prepare(case, "cpu" if p == WHOLE_BATCH else p, dtype, mode,
                                      "cpu"), case, batch, dtype, mode, "cpu")
                 for p in providers}
        for p, step in steps.items():
            warm(p, step)
        timings = time_cpu_per_call({p: counting_faults(steps[p], faults[p]) for p in providers},
                                    rounds)
    for p, timing in timings.items():
        if isinstance(timing, Exception):
            raise timing
    medians = {p: timings[p].median_ms for p in providers}
    for p in providers:
        speedup = f", cpu {medians[p] / medians['cpu']:.2f}x faster" if "cpu" in medians else ""
        print(f"{model} {mode} {resolution}px b{batch} {dtype} {threads} threads {p}: "
              f"median {medians[p]:.1f} ms, quartiles {timings[p].low_ms:.1f}-"
              f"{timings[p].high_ms:.1f} ms, {statistics.median(faults[p][1:]):.0f} page faults "
              f"per call{speedup}")  # faults[p][0]: time_cpu_per_call's untimed warm-up call


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","),
         *sys.argv[5:7], *map(int, sys.argv[7:8]))
