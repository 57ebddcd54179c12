"""What refolding every BN costs an eval forward of a fused model (the fused modules fold on
every eval call so that no change of a weight, statistic or eps goes unseen).

    python benchmarks/fold_cost.py [model]     # default regnety_400mf; CPU, torch's threads

Prints the best-of-rounds time of one model's folding and of its eval forward at batch 1 and 256.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import regnet_kernels as rk  # noqa: E402
from regnet_kernels.models.fused import FoldedConv, FusedBlock, fold_block  # noqa: E402


def best_ms(step, calls: int, rounds: int) -> float:
    step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def main(name: str) -> None:
    torch.manual_seed(0)
    model = rk.fused_model(name).eval()
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]

    def fold_model():
        FoldedConv.of(model.stem[0], model.stem[1])
        for block in blocks:
            fold_block(block)

    with torch.no_grad():
        print(f"{name}: {len(blocks)} blocks, {torch.get_num_threads()} threads")
        print(f"fold every BN: {best_ms(fold_model, 50, 5):.2f} ms per forward")
        for batch, calls, rounds in ((1, 5, 4), (256, 1, 2)):
            x = torch.randn(batch, 3, 224, 224)
            print(f"eval forward, batch {batch}: {best_ms(lambda: model(x), calls, rounds):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "regnety_400mf")
