"""pytest-benchmark: one fused Y block and one X block (eval forward, and a training step on
CUDA), against the reference block (see regnet_kernels.bench.pytest_cases)."""
import pytest

from regnet_kernels.bench import pytest_cases


@pytest.mark.parametrize("case, mode, dtype, batch, provider", pytest_cases.params("block"))
def test_block(benchmark, case, mode, dtype, batch, provider):
    pytest_cases.run(benchmark, case, mode, dtype, batch, provider)
