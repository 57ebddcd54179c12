"""Whole-model eval providers timed call by call in one process: every round calls each
provider once (the order rotated each round), so a load change on a shared machine hits all
of them alike; prints each provider's median and minimum over the rounds and the fused
``cpu`` provider's speedup over it. The providers are the harness's (`bench.providers`).

    python benchmarks/interleaved_calls.py regnety_400mf 4 20 eager_cl,compile_freeze,cpu [bf16]
"""
import statistics
import sys
import time

import torch

from regnet_kernels.bench.cases import model_case
from regnet_kernels.bench.providers import make_step, prepare


def main(model: str, batch: int, rounds: int, providers: list[str], dtype: str = "fp32",
         threads: int = 2) -> None:
    torch.set_num_threads(threads)
    case = model_case(model, 224)
    times: dict[str, list[float]] = {p: [] for p in providers}
    with torch.no_grad():
        steps = {p: make_step(prepare(case, p, dtype, "eval", "cpu"), case, batch, dtype,
                              "eval", "cpu") for p in providers}
        for step in steps.values():  # compiles, packs, warms the caches
            step()
            step()
        for r in range(rounds):
            for p in providers[r % len(providers):] + providers[:r % len(providers)]:
                start = time.perf_counter()
                steps[p]()
                times[p].append(1e3 * (time.perf_counter() - start))
    medians = {p: statistics.median(t) for p, t in times.items()}
    for p in providers:
        speedup = f", cpu {medians[p] / medians['cpu']:.2f}x faster" if "cpu" in medians else ""
        print(f"{model} b{batch} {dtype} {threads} threads {p}: median {medians[p]:.1f} ms, "
              f"min {min(times[p]):.1f} ms{speedup}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","),
         *sys.argv[5:6])
