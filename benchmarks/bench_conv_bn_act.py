"""pytest-benchmark: the fused conv_bn_act op at every layer shape of the preset's
model, against the same computation in reference PyTorch (regnet_kernels.bench.pytest_cases)."""
import pytest

from regnet_kernels.bench import pytest_cases


@pytest.mark.parametrize("case, mode, dtype, batch, provider",
                         pytest_cases.params("op", "conv_bn_act"))
def test_conv_bn_act(benchmark, case, mode, dtype, batch, provider):
    pytest_cases.run(benchmark, case, mode, dtype, batch, provider)
