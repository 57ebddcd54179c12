"""conv1x1_gate_residual (Triton) against a float64 reference:
relu(BN(conv1x1(x * gate)) + shortcut), shortcut identity or BN(conv1x1 stride s)."""
import pytest
import torch

from numerics import (DEVICE, DTYPES, activation, bn_fold, conv_weight, poisoned_outputs, ref_conv_bn,
                      rel_err, tol)
from regnet_kernels import ops



def run_case(n, c_b, c_out, ho, dtype, gated, proj_in=None, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wo = ho + 1 if ho > 1 else ho
    x = activation(n, c_b, ho, wo, dtype, gen)
    w = conv_weight(c_out, c_b, 1, dtype, gen)
    scale, shift = bn_fold(c_out, gen)
    gate = torch.rand(n, c_b, generator=gen).to(DEVICE) if gated else None
    gated_x = x.double() * gate.double()[:, :, None, None] if gated else x
    ref = ref_conv_bn(gated_x, w, scale, shift)
    kwargs = dict(gate=gate)
    if proj_in is None:
        shortcut = activation(n, c_out, ho, wo, dtype, gen)
        ref = ref + shortcut.double()
    else:
        # odd input height, even width: both map to ho x wo under the stride
        shortcut = activation(n, proj_in, (ho - 1) * stride + 1, wo * stride, dtype, gen)
        pw = conv_weight(c_out, proj_in, 1, dtype, gen)
        pscale, pshift = bn_fold(c_out, gen)
        kwargs.update(proj_weight=pw, proj_scale=pscale, proj_shift=pshift, proj_stride=stride)
        ref = ref + ref_conv_bn(shortcut, pw, pscale, pshift, stride)
    with poisoned_outputs():
        y = ops.conv1x1_gate_residual(x, w, scale, shift, shortcut, **kwargs)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref.relu()) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,ho,gated", [(3, 56, 7, True), (1, 232, 13, False), (3, 24, 1, True),
                                          (1, 152, 16, True)])
def test_identity_shortcut(n, c, ho, gated, dtype):
    run_case(n, c, c, ho, dtype, gated)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c_in,c_out,ho,stride,gated", [
    (3, 24, 56, 7, 2, True),     # 13x14 -> 7x7
    (1, 32, 48, 13, 2, False),
    (3, 48, 120, 1, 2, True),    # 1x1 output
    (1, 56, 40, 16, 1, True),    # stride-1 projection (width change only)
])
def test_projection_shortcut(n, c_in, c_out, ho, stride, gated, dtype):
    run_case(n, c_out, c_out, ho, dtype, gated, proj_in=c_in, stride=stride)


def _args(**over):
    args = dict(x=torch.randn(2, 16, 7, 7), weight=torch.randn(24, 16, 1, 1),
                scale=torch.ones(24), shift=torch.zeros(24), shortcut=torch.randn(2, 24, 7, 7))
    args.update(over)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


PROJ = dict(shortcut=torch.randn(2, 8, 13, 13), proj_weight=torch.randn(24, 8, 1, 1),
            proj_scale=torch.ones(24), proj_shift=torch.zeros(24), proj_stride=2)


@pytest.mark.parametrize("over,err,match", [
    (dict(weight=torch.randn(24, 16, 3, 3)), ValueError, "1x1"),
    (dict(shortcut=torch.randn(2, 16, 7, 7)), ValueError, "identity shortcut"),
    (dict(gate=torch.rand(2, 15)), ValueError, "gate must have shape"),
    (dict(gate=torch.rand(2, 16).half()), TypeError, "gate must be float32"),
    (dict(shortcut=torch.randn(2, 24, 7, 7).half()), TypeError, "dtype"),
    (dict(PROJ, proj_stride=1), ValueError, "projection"),
    (dict(PROJ, proj_weight=torch.randn(24, 9, 1, 1)), ValueError, "input channels"),
    (dict(PROJ, proj_scale=None), ValueError, "proj_scale"),
    (dict(proj_scale=torch.ones(24)), ValueError, "without proj_weight"),
])
def test_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        ops.conv1x1_gate_residual(**_args(**over))


@pytest.mark.parametrize("project", [False, True])
def test_opcheck(project):
    a = _args(gate=torch.rand(2, 16), **(PROJ if project else {}))
    torch.library.opcheck(
        torch.ops.regnet_triton.conv1x1_gate_residual.default,
        (a["x"], a["weight"], a["scale"], a["shift"], a["gate"], a["shortcut"],
         a.get("proj_weight"), a.get("proj_scale"), a.get("proj_shift"), a.get("proj_stride", 1)))
