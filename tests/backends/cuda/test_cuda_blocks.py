"""The C++ extension's CUDA eval kernels per block and per model: block_forward_eval with the
C++ ops on CUDA tensors, and fused_model(backend="cuda"), against float64. The CUDA kernels'
op-by-op parity is the `cuda` backend of tests/ops/test_<op>.py. Needs a CUDA device (the
CPU machines compile the sources, tests/backends/cuda/test_cuda_sources.py, and run them in
an emulation, the cuda_emu tests)."""
import pytest
import torch

import regnet_kernels as rk
from blocks import BLOCKS, make_block
from numerics import TOL, nan_filled_empty, randomize_bn, rel_err
from regnet_kernels.models.fused import block_forward_eval, fold_block, fused_model
from regnet_kernels.ops import cpp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """at::empty fills new tensors with NaN here, so an unwritten output element fails."""
    with nan_filled_empty():
        yield


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_blocks(name, dtype):
    block, h = make_block(name, torch.float64)
    x = torch.randn(2, block.f.a[0].in_channels, h, h, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        out = block_forward_eval(x.to(dtype), fold_block(block.to(dtype)), cpp)
    assert rel_err(out, ref) < (1 if dtype == torch.float32 else 3) * TOL[dtype]


def test_fused_model_cuda_backend_eval():
    params = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)
    torch.manual_seed(0)
    ref = rk.reference_model(params, num_classes=10)
    randomize_bn(ref, torch.Generator().manual_seed(0))
    fused = fused_model(params, num_classes=10, backend="cuda")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = ref.double().cuda().eval()(x.double())
        assert rel_err(fused.cuda().eval()(x), expected) < 1e-5
