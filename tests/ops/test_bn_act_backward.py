"""bn_act_backward (the backward of o = relu?(y * s + t) * gate, with the BN backward sums),
the Triton backend's (the C++ backend's is inside its training ops), against float64
autograd; then the CUDA launchers of the same steps (rk_relu_backward, rk_bn_backward_sums,
rk_bn_backward_dy) under the CPU emulation."""
import pytest
import torch

from bad_inputs import expect_rejected
from cuda_emu.harness import (DT, HALF_TYPES, TOL, S, Out, assert_close, call, isolated, launch,
                              ptr, ref)
from numerics import (DEVICE, DTYPES, activation, bn_fold, poisoned_outputs, rel_err, tol,
                      vector_dtype)
from regnet_kernels import ops


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n,c,h,w,relu,gated", [(3, 24, 13, 14, True, True), (1, 56, 7, 7, True, False),
                                                (2, 8, 1, 1, False, True), (1, 130, 16, 16, True, True)])
def test_dv_and_dgate(n, c, h, w, relu, gated, dtype):
    gen = torch.Generator().manual_seed(c)
    y = activation(n, c, h, w, dtype, gen)
    vec = vector_dtype(dtype)
    s, t = (v.to(vec) for v in bn_fold(c, gen))
    gate = torch.rand(n, c, generator=gen).to(DEVICE, vec) if gated else None
    v = (y.double() * s.double()[:, None, None] + t.double()[:, None, None]).requires_grad_()
    gate64 = gate.double().requires_grad_() if gated else None
    o = v.relu() if relu else v
    if gated:
        o = o * gate64[:, :, None, None]
    g = activation(n, c, h, w, dtype, gen, channels_last=False)
    o.backward(g.double())
    with poisoned_outputs():
        out = ops.bn_act_backward(g, y, s, t, relu=relu, gate=gate)
    assert out.dv.dtype == dtype and rel_err(out.dv, v.grad) < tol(dtype)
    if gated:
        assert out.dgate.dtype == vec and rel_err(out.dgate, gate64.grad) < tol(dtype)


def test_reductions_and_external_mask():
    gen = torch.Generator().manual_seed(3)
    y, g, m = (activation(3, 40, 7, 8, torch.float32, gen) for _ in range(3))
    out = ops.bn_act_backward(g, y, relu=False, mask_src=m, reduce=True)
    dv = g.double() * (m > 0)
    assert rel_err(out.dv, dv) < 1e-6
    assert rel_err(out.sum_dv, dv.sum((0, 2, 3))) < 1e-5
    assert rel_err(out.sum_dv_y, (dv * y.double()).sum((0, 2, 3))) < 1e-5
    assert ops.bn_act_backward(g, y, relu=False, write_dv=False, reduce=True).dv is None


def test_reductions_float64():
    gen = torch.Generator().manual_seed(5)
    y, g = (activation(2, 24, 7, 8, torch.float64, gen) for _ in range(2))
    out = ops.bn_act_backward(g, y, relu=False, reduce=True)
    assert out.sum_dv.dtype == out.sum_dv_y.dtype == torch.float64
    assert rel_err(out.sum_dv, g.sum((0, 2, 3))) < 1e-13
    assert rel_err(out.sum_dv_y, (g * y).sum((0, 2, 3))) < 1e-13


def test_per_tile_gradient():
    """The SE squeeze's backward: one gradient per (image, row tile, channel)."""
    gen = torch.Generator().manual_seed(4)
    y = activation(2, 16, 13, 13, torch.float32, gen)
    s, t = bn_fold(16, gen)
    rows = 64
    tiles = -(-169 // rows)
    gt = torch.randn(2, tiles, 16, generator=gen).to(DEVICE)
    full = gt.repeat_interleave(rows, dim=1)[:, :169].permute(0, 2, 1).reshape(2, 16, 13, 13)
    expected = ops.bn_act_backward(full.contiguous(), y, s, t).dv
    assert torch.equal(ops.bn_act_backward(gt, y, s, t, grad_rows_per_tile=rows).dv, expected)
    expect_rejected("bn_act_backward", "triton",
                    lambda: ops.bn_act_backward(gt, y, s, t, grad_rows_per_tile=32),
                    ValueError, "do not cover")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    y = torch.randn(2, 8, 5, 5, device=DEVICE, dtype=dtype)
    s = torch.rand(8, device=DEVICE, dtype=vector_dtype(dtype))
    torch.library.opcheck(torch.ops.regnet_triton.bn_act_backward.default,
                          (y, y, s, s, True, torch.rand(2, 8, device=DEVICE, dtype=s.dtype), None,
                           0, True, True))


# ---------------------------------------------------------------------------
# The CUDA launchers under the CPU emulation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("numel", [1, 1000, 4099])
@isolated
def test_cuda_emu_relu_backward(emu, numel, dtype):
    torch.manual_seed(numel)
    grad = torch.randn(numel).to(dtype)
    out_fwd = torch.randn(numel).clamp_min(0).to(dtype)
    dz = Out((numel,), dtype)
    launch(emu, "rk_relu_backward", DT[dtype], ptr(grad), ptr(out_fwd), numel, dz.ptr, None)
    dz.check_guards("dz")
    expect = grad.double() * (out_fwd > 0)
    assert torch.equal(dz.t.double(), expect), "dz != grad * (out > 0)"


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rows,c", [(98, 24), (338, 40), (5, 3), (2000, 8)])
@isolated
def test_cuda_emu_bn_backward_sums(emu, rows, c, dtype):
    torch.manual_seed(rows * c)
    dv = torch.randn(rows, c).to(dtype)
    y = (torch.randn(rows, c) * 2 + 3).to(dtype)
    mean = y.double().mean(0).float()
    ws_n = call(emu, "rk_bn_backward_workspace", rows, c)
    assert ws_n >= 0
    ws = Out((max(ws_n, 1),))  # NaN-filled: the kernel must not assume a zeroed workspace
    sums = Out((2, c))
    args = S.rk_bn_backward_sums_args(dtype=DT[dtype], dv=ptr(dv), y=ptr(y), rows=rows, c=c,
                                      mean=ptr(mean), workspace=ws.ptr, sums=sums.ptr)
    launch(emu, "rk_bn_backward_sums", ref(args), None)
    sums.check_guards("sums")
    ws.check_guards("workspace")
    expect = torch.stack([dv.double().sum(0), (dv.double() * (y.double() - mean.double())).sum(0)])
    assert_close("sums[0] (sum dv)", sums.t[0], expect[0])
    assert_close("sums[1] (sum dv * (y - mean))", sums.t[1], expect[1])


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("rows,c", [(98, 24), (50, 13)])
@isolated
def test_cuda_emu_bn_backward_dy(emu, rows, c, frozen, dtype):
    """dy = dL/dy of v = BN(y) with the batch statistics (float64 autograd), or
    scale * dv with frozen (constant) statistics."""
    torch.manual_seed(rows + 3 * c)
    eps = 1e-5
    y = (torch.randn(rows, c) * 2 + 1).to(dtype)
    dv = torch.randn(rows, c).to(dtype)
    gamma, beta = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    y64 = y.double().requires_grad_(True)
    mean, var = y64.mean(0), y64.var(0, unbiased=False)
    inv_std = 1 / torch.sqrt(var + eps)
    scale = gamma * inv_std
    shift = beta - mean * scale
    stats = torch.stack([mean, inv_std, scale, shift, var]).detach().float().contiguous()
    sums = torch.stack([dv.double().sum(0),
                        (dv.double() * (y.double() - stats[0].double())).sum(0)]).float()
    if frozen:
        v = y64 * stats[S.RK_STAT_SCALE].double() + stats[S.RK_STAT_SHIFT].double()
    else:
        v = (y64 - mean) * inv_std * gamma + beta
    (expect,) = torch.autograd.grad(v, y64, dv.double())
    dy = Out((rows, c), dtype)
    args = S.rk_bn_backward_dy_args(dtype=DT[dtype], dv=ptr(dv), y=ptr(y), rows=rows, c=c,
                                    stats=ptr(stats), sums=ptr(sums), frozen=int(frozen),
                                    dy=dy.ptr)
    launch(emu, "rk_bn_backward_dy", ref(args), None)
    dy.check_guards("dy")
    assert_close("dy", dy.t, expect, TOL[dtype] * (1 if dtype == torch.float32 else 2))
