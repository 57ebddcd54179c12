"""pytest-benchmark: whole fused networks (eval forward, and a training step on CUDA) against
the reference networks (see regnet_kernels.bench.pytest_cases)."""
import pytest

from regnet_kernels.bench import pytest_cases


@pytest.mark.parametrize("case, mode, dtype, batch, provider", pytest_cases.params("model"))
def test_model(benchmark, case, mode, dtype, batch, provider):
    pytest_cases.run(benchmark, case, mode, dtype, batch, provider)
