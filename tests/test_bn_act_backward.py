"""bn_act_backward (Triton) against float64 autograd of o = relu?(y * s + t) * gate."""
import pytest
import torch

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
    with pytest.raises(ValueError, match="do not cover"):
        ops.bn_act_backward(gt, y, s, t, grad_rows_per_tile=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    y = torch.randn(2, 8, 5, 5, device=DEVICE, dtype=dtype)
    s = torch.rand(8, device=DEVICE, dtype=vector_dtype(dtype))
    torch.library.opcheck(torch.ops.regnet_triton.bn_act_backward.default,
                          (y, y, s, s, True, torch.rand(2, 8, device=DEVICE, dtype=s.dtype), None,
                           0, True, True))
