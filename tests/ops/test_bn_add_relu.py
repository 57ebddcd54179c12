"""bn_add_relu (relu(BN(y) + shortcut, or + BN(projection)), the block's last op in training)
on every backend (tests/op_backends.py) against float64 autograd: output and the gradients
of the lazy inputs, bad inputs, opcheck; then its CUDA launcher under the CPU emulation."""
import pytest
import torch

from bad_inputs import BN_ADD_RELU_CASES, bn_add_relu_args, expect_rejected
from cuda_emu.harness import HALF_TYPES, TOL, assert_close, bn_add_relu_case, isolated, launch, ref
from numerics import (DTYPES, activation, bn_fold, check_close, nan_filled_empty, rel_err,
                      vector_dtype)
from op_backends import per_backend

TRITON_SHAPES = [(1, 56, 7, 7, "projection"), (3, 24, 13, 14, "identity"),
                 (2, 232, 1, 1, "projection"), (1, 8, 16, 16, "identity")]
CPP_SHAPES = [(1, 56, 7, 7, "projection"), (3, 24, 13, 14, "identity"),
              (2, 232, 1, 1, "projection"), (3, 40, 7, 8, "none"), (1, 8, 16, 16, "identity")]
# The C++ kernels: fp32 and bf16; Triton: numerics.DTYPES and float64.
CPP_CASES = [(*shape, d) for d in (torch.float32, torch.bfloat16) for shape in CPP_SHAPES]


def lazy_value(y, scale, shift):
    """v = y * scale + shift of a lazy BN output, in float64."""
    return y.double() * scale.double()[:, None, None] + shift.double()[:, None, None]


@per_backend("n,c,h,w,shortcut,dtype",
             triton=[(*shape, d) for d in DTYPES + [torch.float64] for shape in TRITON_SHAPES],
             cpu=CPP_CASES, cuda=CPP_CASES)
def test_bn_add_relu(backend, n, c, h, w, shortcut, dtype):
    gen = torch.Generator().manual_seed(c + n)
    dev, vec = backend.device, vector_dtype(dtype)
    y = activation(n, c, h, w, dtype, gen, device=dev).requires_grad_()
    r = activation(n, c, h, w, dtype, gen, channels_last=False, device=dev).requires_grad_()
    scale, shift = (v.to(vec) for v in bn_fold(c, gen, device=dev))
    v = lazy_value(y.detach(), scale, shift).requires_grad_()
    args, ref64, r_leaf = (), v, None
    if shortcut == "projection":
        rs, rt = (t.to(vec) for t in bn_fold(c, gen, device=dev))
        args = (r, rs, rt)
        r_leaf = lazy_value(r.detach(), rs, rt).requires_grad_()
    elif shortcut == "identity":
        args = (r,)
        r_leaf = r.detach().double().requires_grad_()
    if r_leaf is not None:
        ref64 = ref64 + r_leaf
    ref64 = ref64.relu()
    grad = activation(n, c, h, w, dtype, gen, device=dev)
    ref64.backward(grad.double())
    with nan_filled_empty():
        out = backend.ops.bn_add_relu(y, scale, shift, *args)
        out.backward(grad)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    check_close(out, ref64, dtype)
    check_close(y.grad, v.grad, dtype)
    if r_leaf is not None:
        assert r.grad.dtype == dtype
        check_close(r.grad, r_leaf.grad, dtype)
    else:
        assert r.grad is None


def test_no_shortcut_is_bn_relu(backend):
    gen = torch.Generator().manual_seed(3)
    y = activation(2, 40, 7, 8, torch.float32, gen, device=backend.device).requires_grad_()
    scale, shift = bn_fold(40, gen, device=backend.device)
    with nan_filled_empty():
        out = backend.ops.bn_add_relu(y, scale, shift)
    ref64 = lazy_value(y.detach(), scale, shift).relu()
    assert rel_err(out, ref64) < 1e-6
    g = torch.randn(out.shape, generator=gen).to(backend.device)
    out.backward(g)
    assert rel_err(y.grad, g.double() * (ref64 > 0)) < 1e-6  # lazy input: dL/dv


@pytest.mark.parametrize("project", [False, True])
def test_backward_lazy_inputs(backend, project):
    """y (and a projection) are lazy BN outputs: their gradient is dL/dv, the same
    masked gradient grad * (out > 0) for every input."""
    gen = torch.Generator().manual_seed(7)
    dev = backend.device
    y = activation(2, 24, 7, 8, torch.float32, gen, device=dev).requires_grad_()
    r = activation(2, 24, 7, 8, torch.float32, gen, device=dev).requires_grad_()
    scale, shift = bn_fold(24, gen, device=dev)
    args = bn_fold(24, gen, device=dev) if project else ()
    out = backend.ops.bn_add_relu(y, scale, shift, r, *args)
    g = torch.randn(out.shape, generator=gen).to(dev)
    out.backward(g)
    expected = g.double() * (out.detach().double() > 0)
    assert rel_err(y.grad, expected) < 1e-6 and rel_err(r.grad, expected) < 1e-6


@pytest.mark.parametrize("over,err,match", BN_ADD_RELU_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("bn_add_relu", backend.name,
                    lambda: backend.ops.bn_add_relu(**bn_add_relu_args(backend.device, **over)),
                    err, match)


def test_opcheck(backend):
    y = torch.randn(2, 8, 5, 5, device=backend.device)
    s = torch.rand(8, device=backend.device)
    torch.library.opcheck(backend.library.bn_add_relu.default, (y, s, s, y, s, s))


# ---------------------------------------------------------------------------
# The CUDA launcher under the CPU emulation (guarded outputs, 16-bit inputs)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["identity", "proj", "none"])
@pytest.mark.parametrize("rows,c", [(98, 24), (50, 13), (7, 200)])
@isolated
def test_cuda_emu(emu, rows, c, mode, dtype):
    args, out, expect, _keep = bn_add_relu_case(dtype, rows, c, mode)
    launch(emu, "rk_bn_add_relu", ref(args), None)
    out.check_guards("out")
    assert_close("out", out.t, expect, TOL[dtype])
