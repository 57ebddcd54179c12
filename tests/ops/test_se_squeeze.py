"""se_squeeze (the SE squeeze of a lazy BN output: per-row-tile sums of relu(y * scale + shift))
on every backend (tests/op_backends.py) against float64 autograd: the sums, the gradient
dL/dv it returns for y (v = y * scale + shift), bad inputs, opcheck; then its CUDA
launchers (forward and backward) under the CPU emulation."""
import pytest
import torch

from bad_inputs import (SE_SQUEEZE_CASES, SE_SQUEEZE_CPP_CASES, expect_rejected,
                        se_squeeze_args)
from cuda_emu.harness import DT, HALF_TYPES, TOL, S, Out, assert_close, isolated, launch, ptr, ref
from numerics import DTYPES, activation, bn_fold, check_close, nan_filled_empty, vector_dtype
from op_backends import per_backend
from regnet_kernels.backends.triton.se_excite import _squeeze_tiles

# The C++ kernels: fp32 and bf16, one squeeze tile per image. Triton: numerics.DTYPES and
# float64, row tiles of _squeeze_tiles' size.
TRITON_SHAPES = [(1, 24, 7, 7), (3, 56, 13, 14), (2, 232, 1, 1), (1, 8, 16, 16)]
CPP_SHAPES = [(1, 56, 7, 7), (3, 24, 13, 14), (2, 232, 1, 1), (3, 8, 16, 16)]
CPP_CASES = [(*shape, d) for d in (torch.float32, torch.bfloat16) for shape in CPP_SHAPES]


def squeeze_rows(backend, hw, c):
    """The pixels per squeeze tile of `backend`."""
    return _squeeze_tiles(hw, c)[0] if backend.name == "triton" else hw


@per_backend("n,c,h,w,dtype",
             triton=[(*shape, d) for d in DTYPES + [torch.float64] for shape in TRITON_SHAPES]
             + [(2, 24, 13, 13, torch.float32)],  # two row tiles per image
             cpu=CPP_CASES, cuda=CPP_CASES)
def test_se_squeeze(backend, n, c, h, w, dtype):
    gen = torch.Generator().manual_seed(c + n)
    y = activation(n, c, h, w, dtype, gen, device=backend.device).requires_grad_()
    scale, shift = (v.to(vector_dtype(dtype)) for v in bn_fold(c, gen, device=backend.device))
    v = (y.detach().double() * scale.double()[:, None, None]
         + shift.double()[:, None, None]).requires_grad_()
    rows = squeeze_rows(backend, h * w, c)
    with nan_filled_empty():
        sums = backend.ops.se_squeeze(y, scale, shift)
    assert sums.dtype == vector_dtype(dtype) and sums.shape == (n, -(-h * w // rows), c)
    pooled = torch.stack([v.relu().flatten(2)[:, :, i * rows:(i + 1) * rows].sum(2)
                          for i in range(sums.shape[1])], 1)
    # fp32 sums of the exact 16-bit values; float64 sums in float64
    check_close(sums.sum(1), pooled.sum(1), vector_dtype(dtype))
    grad = torch.randn(sums.shape, generator=gen).to(backend.device, sums.dtype)
    pooled.backward(grad.double())
    with nan_filled_empty():
        sums.backward(grad)
    assert y.grad.dtype == dtype and y.grad.is_contiguous(memory_format=torch.channels_last)
    check_close(y.grad, v.grad, dtype)


@per_backend("over,err,match", triton=SE_SQUEEZE_CASES,
             cpu=SE_SQUEEZE_CASES + SE_SQUEEZE_CPP_CASES,
             cuda=SE_SQUEEZE_CASES + SE_SQUEEZE_CPP_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("se_squeeze", backend.name,
                    lambda: backend.ops.se_squeeze(**se_squeeze_args(backend.device, **over)),
                    err, match)


@per_backend("dtype", triton=[torch.float32, torch.float64], cpu=[torch.float32],
             cuda=[torch.float32])
def test_opcheck(backend, dtype):
    dev = backend.device
    y = torch.randn(2, 40, 13, 13, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
    vec = vector_dtype(dtype)
    args = (y, torch.rand(40, device=dev, dtype=vec), torch.randn(40, device=dev, dtype=vec))
    torch.library.opcheck(backend.library.se_squeeze.default, args)


# ---------------------------------------------------------------------------
# The CUDA launchers under the CPU emulation (guarded outputs, 16-bit inputs)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,hw,c", [(2, 49, 24), (3, 25, 7), (1, 300, 72)])
@isolated
def test_cuda_emu(emu, n, hw, c, dtype):
    torch.manual_seed(hw * c)
    y = torch.randn(n, hw, c).to(dtype)
    scale, shift = torch.randn(c), torch.randn(c) * 0.5
    sums = Out((n, c))
    args = S.rk_se_squeeze_args(dtype=DT[dtype], y=ptr(y), n=n, hw=hw, c=c, scale=ptr(scale),
                                shift=ptr(shift), sums=sums.ptr)
    launch(emu, "rk_se_squeeze", ref(args), None)
    sums.check_guards("sums")
    expect = (y.double() * scale.double() + shift.double()).clamp_min(0).sum(1)
    assert_close("sums", sums.t, expect, 1e-5)  # fp32 sums of exactly converted inputs


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,hw,c", [(2, 49, 24), (3, 25, 7)])
@isolated
def test_cuda_emu_backward(emu, n, hw, c, dtype):
    torch.manual_seed(hw + c)
    y = torch.randn(n, hw, c).to(dtype)
    scale, shift = torch.randn(c), torch.randn(c) * 0.5
    gs = torch.randn(n, c)
    dv = Out((n, hw, c), dtype)
    args = S.rk_se_squeeze_backward_args(dtype=DT[dtype], grad_sums=ptr(gs), y=ptr(y), n=n, hw=hw,
                                         c=c, scale=ptr(scale), shift=ptr(shift), dv=dv.ptr)
    launch(emu, "rk_se_squeeze_backward", ref(args), None)
    dv.check_guards("dv")
    mask = (y.float() * scale + shift) > 0
    expect = gs.view(n, 1, c).double() * mask
    assert_close("dv", dv.t, expect, TOL[dtype])
