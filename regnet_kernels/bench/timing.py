"""Timers: medians after warm-up, GPU work synchronized, caches not left warm.

CUDA: `triton.testing.do_bench`, which zeroes a 256 MB buffer before every call (flushing
the H200's 60 MB L2, so no input is served from cache) and times each call with CUDA events;
we keep the median and the 20th/80th percentiles. Peak memory: what one more call allocates
at its peak beyond the memory already resident (activations, workspaces, gradients; not the
weights and inputs, which stay allocated for every provider of a case at once).

CPU: `torch.utils.benchmark.Timer.blocked_autorange` (median over blocks of calls, at least
``min_run_time`` seconds) on torch's thread count, after one warm-up call; wall clock, or the
process's CPU time (one thread only: a measure that other jobs on a shared machine disturb far
less). Or call by call (`time_cpu_per_call`): each round calls every provider once, so that a
machine whose speed drifts within seconds slows every provider alike.
"""
from __future__ import annotations

import time
import timeit
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_ms: float
    low_ms: float   # 20th percentile (CUDA) or the lower quartile (CPU)
    high_ms: float  # 80th percentile (CUDA) or the upper quartile (CPU)
    peak_mem_mb: float | None


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    import torch
    from triton.testing import do_bench

    fn()  # compiles / autotunes outside the timed region
    median, low, high = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()  # every provider's weights and inputs
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return Timing(median, low, high, (torch.cuda.max_memory_allocated() - resident) / 2**20)


def time_cpu(fn: Callable[[], object], min_run_time: float = 1.0,
             cpu_time: bool = False) -> Timing:
    """cpu_time: measure the process's CPU time instead of the wall clock. With one thread that
    is the work itself, unaffected by other jobs taking the cores (only by their use of the
    caches and memory); with more threads it would add up the threads, spin-waits included."""
    import torch
    from torch.utils import benchmark

    fn()  # warm-up: first-call allocations, oneDNN primitive creation, compilation
    clock = time.process_time if cpu_time else timeit.default_timer
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, timer=clock,
                            num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    low, high = np.quantile(m.times, [0.25, 0.75])
    return Timing(1e3 * m.median, 1e3 * low, 1e3 * high, None)


def time_cpu_per_call(fns: dict[str, Callable[[], object]], rounds: int,
                      cpu_time: bool = False) -> dict[str, Timing | Exception]:
    """Each function once as a warm-up, then `rounds` rounds that call every function once, the
    order rotated by one each round, each call timed alone; per function the median over the
    rounds and its quartiles. A function that raises is dropped from the later rounds: its
    entry is the exception."""
    clock = time.process_time if cpu_time else timeit.default_timer
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    failed: dict[str, Exception] = {}

    def call(name: str, timed: bool) -> None:
        if name in failed:
            return
        start = clock()
        try:
            fns[name]()
        except Exception as e:  # noqa: BLE001 - one failing function does not stop the others
            failed[name] = e
            return
        if timed:
            samples[name].append(1e3 * (clock() - start))

    for name in names:
        call(name, timed=False)
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            call(name, timed=True)
    out: dict[str, Timing | Exception] = dict(failed)
    for name, times in samples.items():
        if name not in failed and times:
            low, median, high = np.quantile(times, [0.25, 0.5, 0.75])
            out[name] = Timing(float(median), float(low), float(high), None)
    return out
