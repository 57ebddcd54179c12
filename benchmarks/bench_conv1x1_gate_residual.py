"""pytest-benchmark: the fused conv1x1_gate_residual op at every layer shape of the preset's
model, against the same computation in reference PyTorch (regnet_kernels.bench.pytest_cases)."""
import pytest

from regnet_kernels.bench import pytest_cases


@pytest.mark.parametrize("case, mode, dtype, batch, provider",
                         pytest_cases.params("op", "conv1x1_gate_residual"))
def test_conv1x1_gate_residual(benchmark, case, mode, dtype, batch, provider):
    pytest_cases.run(benchmark, case, mode, dtype, batch, provider)
