"""bn_add_relu (Triton): relu(BN(y) + shortcut or BN(projection)) vs float64."""
import pytest
import torch

from numerics import (DEVICE, DTYPES, activation, bn_fold, poisoned_outputs, rel_err, tol,
                      vector_dtype)
from regnet_kernels import ops


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n,c,h,w,project", [(1, 56, 7, 7, True), (3, 24, 13, 14, False),
                                             (2, 232, 1, 1, True), (1, 8, 16, 16, False)])
def test_bn_add_relu(n, c, h, w, project, dtype):
    gen = torch.Generator().manual_seed(c)
    y, r = activation(n, c, h, w, dtype, gen), activation(n, c, h, w, dtype, gen, channels_last=False)
    scale, shift = (v.to(vector_dtype(dtype)) for v in bn_fold(c, gen))
    ref = y.double() * scale.double()[:, None, None] + shift.double()[:, None, None]
    if project:
        rs, rt = (v.to(vector_dtype(dtype)) for v in bn_fold(c, gen))
        ref = ref + r.double() * rs.double()[:, None, None] + rt.double()[:, None, None]
        args = (rs, rt)
    else:
        ref = ref + r.double()
        args = ()
    with poisoned_outputs():
        out = ops.bn_add_relu(y, scale, shift, r, *args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref.relu()) < tol(dtype)


def test_no_shortcut_is_bn_relu():
    gen = torch.Generator().manual_seed(3)
    y = activation(2, 40, 7, 8, torch.float32, gen).requires_grad_()
    scale, shift = bn_fold(40, gen)
    with poisoned_outputs():
        out = ops.bn_add_relu(y, scale, shift)
    ref = (y.double() * scale.double()[:, None, None] + shift.double()[:, None, None]).relu()
    assert rel_err(out, ref) < 1e-6
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(g)
    assert rel_err(y.grad, g.double() * (ref > 0)) < 1e-6  # lazy input: dL/dv


def test_bad_input():
    y = torch.randn(2, 8, 5, 5, device=DEVICE)
    s = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="differ in shape"):
        ops.bn_add_relu(y, s, s, torch.randn(2, 8, 5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="both sc_scale and sc_shift"):
        ops.bn_add_relu(y, s, s, y, sc_scale=s)
    with pytest.raises(TypeError, match="dtype"):
        ops.bn_add_relu(y, s, s, y.half())


def test_opcheck():
    y = torch.randn(2, 8, 5, 5, device=DEVICE)
    s = torch.rand(8, device=DEVICE)
    torch.library.opcheck(torch.ops.regnet_triton.bn_add_relu.default, (y, s, s, y, s, s))


@pytest.mark.parametrize("project", [False, True])
def test_backward_lazy_inputs(project):
    """y (and a projection) are lazy BN outputs: their gradient is dL/dv, the same
    masked gradient grad * (out > 0) for every input."""
    gen = torch.Generator().manual_seed(7)
    y = activation(2, 24, 7, 8, torch.float32, gen).requires_grad_()
    r = activation(2, 24, 7, 8, torch.float32, gen).requires_grad_()
    scale, shift = bn_fold(24, gen)
    args = bn_fold(24, gen) if project else ()
    out = ops.bn_add_relu(y, scale, shift, r, *args)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(g)
    expected = g.double() * (out.detach().double() > 0)
    assert rel_err(y.grad, expected) < 1e-6 and rel_err(r.grad, expected) < 1e-6
