"""conv_bn_stats, the Triton backend's training forward (the raw conv output and per-tile BN
partials, with the previous layer's BN + ReLU and the SE gate applied as the input is
loaded), against float64 references. The C++ backend has no such op: its conv_bn_train
computes the statistics inside (tests/ops/test_conv_bn_train.py), and so does the CUDA
launcher rk_conv_train (the cuda_emu tests there)."""
import pytest
import torch

from bad_inputs import expect_rejected
from numerics import (DEVICE, DTYPES, activation, bn_fold, conv_weight, poisoned_outputs, rel_err,
                      tol, vector_dtype)
from regnet_kernels import ops


def check_conv_bn_stats(n, c_in, c_out, h, k, stride, groups, dtype, prologue=True, gated=False,
                        seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = activation(n, c_in, h, h + 1 if h > 1 else h, dtype, gen)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen)
    u = x.double()
    kwargs = {}
    vec = vector_dtype(dtype)
    if prologue:
        # shift > 0 so relu(0 * s + t) != 0: padding must be zeroed after the transform
        s, t = torch.rand(c_in, generator=gen) + 0.5, torch.rand(c_in, generator=gen) + 0.1
        kwargs.update(in_scale=s.to(DEVICE, vec), in_shift=t.to(DEVICE, vec), in_relu=True)
        u = (u * s.double()[:, None, None].to(DEVICE) + t.double()[:, None, None].to(DEVICE)).relu()
    if gated:
        gate = torch.rand(n, c_in, generator=gen).to(DEVICE, vec)
        kwargs["gate"] = gate
        u = u * gate.double()[:, :, None, None]
    with poisoned_outputs():
        out = ops.conv_bn_stats(x, w, stride=stride, groups=groups, **kwargs)
    ref = torch.nn.functional.conv2d(u, w.double(), stride=stride, padding=k // 2, groups=groups)
    assert out.y.dtype == dtype and out.y.is_contiguous(memory_format=torch.channels_last)
    assert out.tile_sum.dtype == out.tile_m2.dtype == vec
    # a 16-bit input prologue rounds u to x's dtype before the dot
    assert rel_err(out.y, ref) < tol(dtype) * (2 if prologue and dtype != torch.float32 else 1)
    rows = ref.permute(0, 2, 3, 1).reshape(-1, c_out).split(out.rows_per_tile)
    assert out.tile_sum.shape == (len(rows), c_out) == out.tile_m2.shape
    assert rel_err(out.tile_sum, torch.stack([r.sum(0) for r in rows])) < tol(dtype)
    ref_m2 = torch.stack([((r - r.mean(0)) ** 2).sum(0) for r in rows])
    assert rel_err(out.tile_m2, ref_m2) < 2 * tol(dtype)
    assert out.count == ref.shape[0] * ref.shape[2] * ref.shape[3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cpg,groups,stride,size,batch", [
    (8, 3, 2, 13, 3), (24, 2, 1, 7, 1), (56, 1, 2, 16, 3), (120, 2, 1, 7, 1), (264, 1, 2, 13, 1),
])
def test_stats_grouped_3x3(cpg, groups, stride, size, batch, dtype):
    check_conv_bn_stats(batch, cpg * groups, cpg * groups, size, 3, stride, groups, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,stride,gated,prologue", [
    (56, 152, 1, True, True),    # conv c: previous BN + ReLU, then the SE gate
    (24, 56, 2, False, False),   # projection shortcut: strided 1x1 of the block input
    (48, 8, 1, False, True),     # conv a of a narrow block
])
def test_stats_1x1(c_in, c_out, stride, gated, prologue, dtype):
    check_conv_bn_stats(3, c_in, c_out, 13, 1, stride, 1, dtype, prologue=prologue, gated=gated)


@pytest.mark.parametrize("k,stride,groups,gated", [(3, 2, 2, True), (1, 1, 1, False)])
def test_stats_float64(k, stride, groups, gated):
    check_conv_bn_stats(2, 16, 16, 7, k, stride, groups, torch.float64, gated=gated)


def test_stats_stem_and_gate_on_3x3():
    check_conv_bn_stats(2, 3, 32, 13, 3, 2, 1, torch.float32, prologue=False)
    check_conv_bn_stats(1, 16, 16, 7, 3, 1, 2, torch.float32, gated=True)


@pytest.mark.parametrize("over,err,match", [
    (dict(in_scale=torch.ones(16)), ValueError, "both in_scale and in_shift"),
    (dict(in_scale=torch.ones(8), in_shift=torch.ones(8)), ValueError,
     r"in_scale must have shape \(16,\)"),
    (dict(gate=torch.ones(2, 8)), ValueError, "gate must have shape"),
])
def test_stats_bad_input(over, err, match):
    x, w = torch.randn(2, 16, 7, 7, device=DEVICE), torch.randn(16, 8, 3, 3, device=DEVICE)
    over = {k: v.to(DEVICE) for k, v in over.items()}
    expect_rejected("conv_bn_stats", "triton",
                    lambda: ops.conv_bn_stats(x, w, groups=2, **over), err, match)


def test_stats_opcheck():
    gen = torch.Generator().manual_seed(3)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 8, 3, torch.float32, gen)
    s, t = bn_fold(16, gen)
    gate = torch.rand(2, 16, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.regnet_triton.conv_bn_stats.default,
                          (x, w, 2, 2, s, t, True, gate))
