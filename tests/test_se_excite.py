"""se_excite (Triton) against a float64 pooled-SE reference."""
import pytest
import torch

from numerics import DEVICE, DTYPES, poisoned_outputs, rel_err, vector_dtype
from regnet_kernels import ops
from regnet_kernels.backends.triton.se_excite import _squeeze_tiles


def ref_gate(sums, hw, w1, b1, w2, b2):
    mean = sums.double().sum(1) / hw
    w1, w2 = w1.double().flatten(1), w2.double().flatten(1)
    hidden = (mean @ w1.T + b1.double()).relu()
    return torch.sigmoid(hidden @ w2.T + b2.double())


@pytest.mark.parametrize("n,tiles,c,s,hw,conv_weights,wdtype", [
    (1, 1, 24, 6, 49, True, torch.float32),      # w_se = round(24 * 0.25)
    (3, 2, 56, 12, 169, True, torch.float32),     # several row tiles per image
    (2, 1, 232, 58, 16, False, torch.float16),    # w_se not a power of two, fp16 weights
    (1, 3, 1512, 378, 1, True, torch.float32),    # wide: C and S larger than one chunk
    (2, 1, 7, 1, 4, False, torch.float32),        # tiny widths
])
def test_se_excite(n, tiles, c, s, hw, conv_weights, wdtype):
    gen = torch.Generator().manual_seed(c)
    sums = (torch.randn(n, tiles, c, generator=gen) * hw).to(DEVICE)
    shape1, shape2 = ((s, c, 1, 1), (c, s, 1, 1)) if conv_weights else ((s, c), (c, s))
    w1 = (torch.randn(shape1, generator=gen) / c ** 0.5).to(DEVICE, wdtype)
    w2 = (torch.randn(shape2, generator=gen) / s ** 0.5).to(DEVICE, wdtype)
    b1 = (torch.randn(s, generator=gen) * 0.1).to(DEVICE, wdtype)
    b2 = (torch.randn(c, generator=gen) * 0.1).to(DEVICE, wdtype)
    with poisoned_outputs():
        gate = ops.se_excite(sums, hw, w1, b1, w2, b2)
    assert gate.shape == (n, c) and gate.dtype == torch.float32
    assert rel_err(gate, ref_gate(sums, hw, w1, b1, w2, b2)) < 1e-5


def test_se_excite_float64():
    """float64 sums and weights: a float64 gate, computed in float64."""
    gen = torch.Generator().manual_seed(5)
    n, t, c, s, hw = 2, 2, 40, 10, 49
    sums = (torch.randn(n, t, c, generator=gen, dtype=torch.float64) * hw).to(DEVICE)
    params = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE)
              for shape in ((s, c, 1, 1), (s,), (c, s, 1, 1), (c,))]
    with poisoned_outputs():
        gate = ops.se_excite(sums, hw, *params)
    assert gate.dtype == torch.float64
    assert rel_err(gate, ref_gate(sums, hw, *params)) < 1e-12
    with pytest.raises(TypeError, match="sums must be float64 with float64 SE weights"):
        ops.se_excite(sums.float(), hw, *params)


def test_two_dim_sums_are_one_tile():
    sums = torch.randn(2, 16, device=DEVICE)
    w1, b1 = torch.randn(4, 16, device=DEVICE), torch.randn(4, device=DEVICE)
    w2, b2 = torch.randn(16, 4, device=DEVICE), torch.randn(16, device=DEVICE)
    gate = ops.se_excite(sums, 9, w1, b1, w2, b2)
    assert rel_err(gate, ref_gate(sums[:, None], 9, w1, b1, w2, b2)) < 1e-5


@pytest.mark.parametrize("change,err,match", [
    (dict(sums=torch.randn(2, 16).double()), TypeError, "float32"),
    (dict(sums=torch.randn(16)), ValueError, "sums must be"),
    (dict(w1=torch.randn(4, 15)), ValueError, "w1 must have shape"),
    (dict(b2=torch.randn(15)), ValueError, "b2 must have shape"),
    (dict(hw=0), ValueError, "hw"),
])
def test_bad_input(change, err, match):
    args = dict(sums=torch.randn(2, 16), hw=9, w1=torch.randn(4, 16), b1=torch.randn(4),
                w2=torch.randn(16, 4), b2=torch.randn(16))
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(err, match=match):
        ops.se_excite(**args)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 40, generator=gen), 25, torch.randn(10, 40, 1, 1, generator=gen),
            torch.randn(10, generator=gen), torch.randn(40, 10, 1, 1, generator=gen),
            torch.randn(40, generator=gen)]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.regnet_triton.se_excite.default, args)
    # float64 sums and weights: a float64 gate, from the fake too
    torch.library.opcheck(torch.ops.regnet_triton.se_excite.default,
                          [a.double() if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n,c,h,w", [(1, 24, 7, 7), (3, 56, 13, 14), (2, 232, 1, 1), (1, 8, 16, 16)])
def test_se_squeeze(n, c, h, w, dtype):
    from numerics import activation, bn_fold
    gen = torch.Generator().manual_seed(c)
    y = activation(n, c, h, w, dtype, gen)
    scale, shift = (v.to(vector_dtype(dtype)) for v in bn_fold(c, gen))
    with poisoned_outputs():
        sums = ops.se_squeeze(y, scale, shift)
    act = (y.double() * scale.double()[:, None, None] + shift.double()[:, None, None]).relu()
    assert sums.dtype == vector_dtype(dtype) and sums.shape[0] == n and sums.shape[2] == c
    assert rel_err(sums.sum(1), act.sum((2, 3))) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_se_squeeze_opcheck(dtype):
    y = torch.randn(2, 40, 13, 13, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    vec = vector_dtype(dtype)
    torch.library.opcheck(torch.ops.regnet_triton.se_squeeze.default,
                          (y, torch.rand(40, device=DEVICE, dtype=vec),
                           torch.randn(40, device=DEVICE, dtype=vec)))


def test_se_excite_backward():
    gen = torch.Generator().manual_seed(9)
    n, t, c, s, hw = 3, 2, 40, 10, 49
    sums = (torch.randn(n, t, c, generator=gen) * hw).to(DEVICE).requires_grad_()
    params = [(torch.randn(shape, generator=gen) * 0.3).to(DEVICE).requires_grad_()
              for shape in ((s, c, 1, 1), (s,), (c, s, 1, 1), (c,))]
    gate = ops.se_excite(sums, hw, *params)
    g = torch.randn(n, c, generator=gen).to(DEVICE)
    gate.backward(g)
    ref_in = [sums.detach().double().requires_grad_()] + [p.detach().double().requires_grad_() for p in params]
    ref_gate(ref_in[0], hw, *ref_in[1:]).backward(g.double())
    for ours, ref in zip([sums] + params, ref_in):
        assert rel_err(ours.grad, ref.grad) < 1e-5


def test_se_squeeze_backward_is_dv():
    """y is a lazy BN output: its gradient is dL/dv, v = y * scale + shift."""
    from numerics import activation, bn_fold
    gen = torch.Generator().manual_seed(10)
    y = activation(2, 24, 13, 13, torch.float32, gen).requires_grad_()
    scale, shift = bn_fold(24, gen)
    sums = ops.se_squeeze(y, scale, shift)
    g = torch.randn(sums.shape, generator=gen).to(DEVICE)
    sums.backward(g)
    v = (y.detach().double() * scale.double()[:, None, None] + shift.double()[:, None, None]).requires_grad_()
    rows = _squeeze_tiles(169, 24)[0]  # the squeeze's row tile
    assert sums.shape[1] == -(-169 // rows)
    pooled = torch.stack([v.relu().flatten(2)[:, :, i * rows:(i + 1) * rows].sum(2)
                          for i in range(sums.shape[1])], 1)
    pooled.backward(g.double())
    assert rel_err(y.grad, v.grad) < 1e-5
