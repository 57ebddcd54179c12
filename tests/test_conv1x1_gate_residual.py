"""conv1x1_gate_residual (Triton) against a float64 reference:
relu(BN(conv1x1(x * gate)) + shortcut), shortcut identity or BN(conv1x1 stride s)."""
import pytest
import torch

from numerics import (DEVICE, DTYPES, activation, bn_fold, conv_weight, poisoned_outputs, ref_conv_bn,
                      rel_err, tol, vector_dtype)
from bad_inputs import GATE_RESIDUAL_CASES, PROJ, gate_residual_args
from regnet_kernels import ops



def run_case(n, c_b, c_out, ho, dtype, gated, proj_in=None, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wo = ho + 1 if ho > 1 else ho
    x = activation(n, c_b, ho, wo, dtype, gen)
    w = conv_weight(c_out, c_b, 1, dtype, gen)
    vec = vector_dtype(dtype)
    scale, shift = (v.to(vec) for v in bn_fold(c_out, gen))
    gate = torch.rand(n, c_b, generator=gen).to(DEVICE, vec) if gated else None
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
        pscale, pshift = (v.to(vec) for v in bn_fold(c_out, gen))
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


@pytest.mark.parametrize("proj_in,stride", [(None, 1), (24, 2)])
def test_float64(proj_in, stride):
    """float64 runs in float64 throughout (both accumulators, scale/shift, gate)."""
    run_case(2, 16, 16, 7, torch.float64, True, proj_in=proj_in, stride=stride)


@pytest.mark.parametrize("over,err,match", GATE_RESIDUAL_CASES)
def test_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        ops.conv1x1_gate_residual(**gate_residual_args(DEVICE, **over))


@pytest.mark.parametrize("project", [False, True])
def test_opcheck(project):
    a = gate_residual_args(DEVICE, gate=torch.rand(2, 16), **(PROJ if project else {}))
    torch.library.opcheck(
        torch.ops.regnet_triton.conv1x1_gate_residual.default,
        (a["x"], a["weight"], a["scale"], a["shift"], a["gate"], a["shortcut"],
         a.get("proj_weight"), a.get("proj_scale"), a.get("proj_shift"), a.get("proj_stride", 1)))
