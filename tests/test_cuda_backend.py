"""The C++ extension's CUDA eval kernels (csrc/cuda, through csrc/cuda/<op>_binding.cpp) against
float64 references, op by op, per block and per model: `regnet_kernels.ops.cpp`'s
eval functions on CUDA tensors, and fused_model(backend="cuda"). The training kernels'
GPU parity tests are the `device` fixture's CUDA runs in tests/test_cpp_train.py, and
the "cpp" / "cuda" training runs of tests/test_fused_block_train.py and
tests/test_fused_model.py.

Needs a CUDA device (the CPU machines compile the sources, tests/test_cuda_sources.py,
and run them in an emulation, tests/test_cuda_emulation.py)."""
import pytest
import torch
import torch.nn.functional as F

import regnet_kernels as rk
from blocks import BLOCKS, make_block
from numerics import (activation, bn_fold, conv_weight, grouped_conv_cases, nan_filled_empty,
                      randomize_bn, ref_conv_bn, rel_err)
from regnet_kernels.models.fused import block_forward_eval, fold_block, fused_model
from regnet_kernels.ops import cpp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 runs on FMA (no TF32 in these kernels); 16-bit on mma.sync with fp32 accumulation.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """at::empty fills new tensors with NaN here, so an unwritten output element fails."""
    with nan_filled_empty():
        yield


def check_conv(n, c_in, c_out, h, k, stride, groups, dtype, squeeze=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = activation(n, c_in, h, h + 1 if h > 1 else h, dtype, gen)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen)
    scale, shift = bn_fold(c_out, gen)
    out = cpp.conv_bn_act(x, w, scale, shift, stride=stride, groups=groups, squeeze=squeeze)
    y, sums = out if squeeze else (out, None)
    ref = ref_conv_bn(x, w, scale, shift, stride, groups).relu()
    assert y.is_cuda and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < TOL[dtype]
    if squeeze:
        assert sums.shape == (n, 1, c_out) and sums.dtype == torch.float32
        assert rel_err(sums[:, 0], ref.sum((2, 3))) < TOL[dtype]


@pytest.mark.parametrize("cpg,groups,stride,size,batch,squeeze,dtype", grouped_conv_cases(DTYPES))
def test_grouped_3x3(cpg, groups, stride, size, batch, squeeze, dtype):
    check_conv(batch, cpg * groups, cpg * groups, size, 3, stride, groups, dtype, squeeze)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,size,k,stride", [
    (24, 56, 13, 1, 1), (232, 152, 7, 1, 1), (3, 32, 13, 3, 2), (40, 48, 13, 3, 2)])
def test_dense_convs_and_stem(c_in, c_out, size, k, stride, dtype):
    check_conv(2, c_in, c_out, size, k, stride, 1, dtype, squeeze=k == 3)


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("n,t,c,s", [(1, 1, 8, 2), (3, 2, 232, 56), (2, 1, 1512, 4096)])
def test_se_excite(n, t, c, s, wdtype):
    gen = torch.Generator().manual_seed(1)
    sums = (torch.randn(n, t, c, generator=gen) * 49).cuda()
    w1 = (torch.randn(s, c, 1, 1, generator=gen) / c ** 0.5).to("cuda", wdtype)
    w2 = (torch.randn(c, s, 1, 1, generator=gen) / s ** 0.5).to("cuda", wdtype)
    b1 = (torch.randn(s, generator=gen) * 0.1).to("cuda", wdtype)
    b2 = (torch.randn(c, generator=gen) * 0.1).to("cuda", wdtype)
    gate = cpp.se_excite(sums, 49, w1, b1, w2, b2)
    hidden = (sums.double().sum(1) / 49 @ w1.double().flatten(1).T + b1.double()).relu()
    ref = torch.sigmoid(hidden @ w2.double().flatten(1).T + b2.double())
    assert gate.dtype == torch.float32 and rel_err(gate, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("project,stride,gated", [(False, 1, True), (True, 2, True),
                                                  (True, 1, False), (False, 1, False)])
def test_conv1x1_gate_residual(project, stride, gated, dtype):
    gen = torch.Generator().manual_seed(2)
    n, c_in, c_out, h = 2, 48, 64 if project else 48, 7
    x = activation(n, c_in, h, h, dtype, gen)
    w = conv_weight(c_out, c_in, 1, dtype, gen)
    scale, shift = bn_fold(c_out, gen)
    gate = torch.rand(n, c_in, generator=gen).cuda() if gated else None
    u = x.double() * (gate.double()[:, :, None, None] if gated else 1)
    ref = F.conv2d(u, w.double()) * scale.double()[:, None, None] + shift.double()[:, None, None]
    proj = {}
    if project:
        r_in = 32
        shortcut = activation(n, r_in, (h - 1) * stride + 1, (h - 1) * stride + 1, dtype, gen)
        pw = conv_weight(c_out, r_in, 1, dtype, gen)
        ps, pt = bn_fold(c_out, gen)
        proj = dict(proj_weight=pw, proj_scale=ps, proj_shift=pt, proj_stride=stride)
        ref = ref + ref_conv_bn(shortcut, pw, ps, pt, stride)
    else:
        shortcut = activation(n, c_out, h, h, dtype, gen)
        ref = ref + shortcut.double()
    out = cpp.conv1x1_gate_residual(x, w, scale, shift, shortcut, gate=gate, **proj)
    assert out.dtype == dtype and rel_err(out, ref.relu()) < TOL[dtype]


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
