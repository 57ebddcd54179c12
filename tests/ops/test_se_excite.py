"""se_excite (the SE excitation: gate = sigmoid(W2 relu(W1 mean + b1) + b2) from the squeeze
sums) on every backend (tests/op_backends.py) against a float64 reference: forward,
backward, bad inputs, opcheck; then its CUDA launcher under the CPU emulation."""
import math

import pytest
import torch

from bad_inputs import SE_EXCITE_CASES, expect_rejected, se_excite_args
from cuda_emu.harness import DT, S, Out, assert_close, isolated, launch, ptr, ref
from numerics import check_close, nan_filled_empty, rel_err
from op_backends import backends, per_backend


def ref_gate(sums, hw, w1, b1, w2, b2):
    """The float64 gate of (N, T, C) per-tile sums."""
    mean = sums.double().sum(1) / hw
    hidden = (mean @ w1.double().flatten(1).T + b1.double()).relu()
    return torch.sigmoid(hidden @ w2.double().flatten(1).T + b2.double())


def se_inputs(n, t, c, s, hw, conv_shaped, wdtype, device, gen):
    """(N, T, C) sums and SE weights (conv-shaped (S, C, 1, 1) or (S, C)) in wdtype."""
    sums = (torch.randn(n, t, c, generator=gen) * hw).to(device)
    shape1, shape2 = ((s, c, 1, 1), (c, s, 1, 1)) if conv_shaped else ((s, c), (c, s))
    w1 = (torch.randn(shape1, generator=gen) / c ** 0.5).to(device, wdtype)
    w2 = (torch.randn(shape2, generator=gen) / s ** 0.5).to(device, wdtype)
    b1 = (torch.randn(s, generator=gen) * 0.1).to(device, wdtype)
    b2 = (torch.randn(c, generator=gen) * 0.1).to(device, wdtype)
    return sums, w1, b1, w2, b2


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA_CASES = [(n, t, c, s, 49, True, wd, False)
              for n, t, c, s in [(1, 1, 8, 2), (3, 2, 232, 56), (2, 1, 1512, 4096)]
              for wd in (F32, F16, BF16)]


# n, tiles, C, S, hw, conv-shaped weights, weight dtype, sums passed 2-D (one tile)
@per_backend("n,t,c,s,hw,conv_shaped,wdtype,flat", triton=[
    (1, 1, 24, 6, 49, True, F32, False),       # w_se = round(24 * 0.25)
    (3, 2, 56, 12, 169, True, F32, False),     # several row tiles per image
    (2, 1, 232, 58, 16, False, F16, False),    # w_se not a power of two, fp16 weights
    (1, 3, 1512, 378, 1, True, F32, False),    # wide: C and S larger than one chunk
    (2, 1, 7, 1, 4, False, F32, False),        # tiny widths
], cpu=[
    (1, 1, 8, 2, 49, True, F32, True),
    (3, 1, 232, 56, 49, False, F32, True),
    (2, 3, 120, 30, 49, True, F32, False),
    (2, 2, 48, 12, 49, True, BF16, False),
    (2, 1, 1512, 4096, 49, False, F32, True),
], cuda=CUDA_CASES, cuda_emu=CUDA_CASES)
def test_se_excite(backend, n, t, c, s, hw, conv_shaped, wdtype, flat):
    gen = torch.Generator().manual_seed(c)
    sums, *weights = se_inputs(n, t, c, s, hw, conv_shaped, wdtype, backend.device, gen)
    with nan_filled_empty():
        gate = backend.ops.se_excite(sums[:, 0] if flat else sums, hw, *weights)
    assert gate.shape == (n, c) and gate.dtype == torch.float32
    check_close(gate, ref_gate(sums, hw, *weights), torch.float32)


@backends("triton")  # the C++ kernels have no float64
def test_se_excite_float64(backend):
    """float64 sums and weights: a float64 gate, computed in float64."""
    gen = torch.Generator().manual_seed(5)
    n, t, c, s, hw = 2, 2, 40, 10, 49
    sums = (torch.randn(n, t, c, generator=gen, dtype=torch.float64) * hw).to(backend.device)
    params = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).to(backend.device)
              for shape in ((s, c, 1, 1), (s,), (c, s, 1, 1), (c,))]
    with nan_filled_empty():
        gate = backend.ops.se_excite(sums, hw, *params)
    assert gate.dtype == torch.float64
    assert rel_err(gate, ref_gate(sums, hw, *params)) < 1e-12
    expect_rejected("se_excite", backend.name,
                    lambda: backend.ops.se_excite(sums.float(), hw, *params),
                    TypeError, "sums must be float64 with float64 SE weights")


@backends("triton", "cpu", "cuda", "cuda_emu")
def test_two_dim_sums_are_one_tile(backend):
    dev = backend.device
    sums = torch.randn(2, 16, device=dev)
    w1, b1 = torch.randn(4, 16, device=dev), torch.randn(4, device=dev)
    w2, b2 = torch.randn(16, 4, device=dev), torch.randn(16, device=dev)
    gate = backend.ops.se_excite(sums, 9, w1, b1, w2, b2)
    assert rel_err(gate, ref_gate(sums[:, None], 9, w1, b1, w2, b2)) < 1e-5


@per_backend("n,t,c,s,conv_shaped", triton=[(3, 2, 40, 10, True)],
             cpu=[(1, 1, 24, 6, True), (3, 1, 232, 58, False), (2, 3, 56, 14, True)],
             cuda=[(1, 1, 24, 6, True), (3, 1, 232, 58, False), (2, 3, 56, 14, True)])
def test_se_excite_backward(backend, n, t, c, s, conv_shaped):
    """The gate and the gradients of the sums and of every SE weight, against float64
    autograd."""
    gen = torch.Generator().manual_seed(c)
    inputs = se_inputs(n, t, c, s, 49, conv_shaped, torch.float32, backend.device, gen)
    ours = [v.clone().requires_grad_() for v in inputs]
    ref64 = [v.double().requires_grad_() for v in inputs]
    grad = torch.randn(n, c, generator=gen).to(backend.device)
    gate = backend.ops.se_excite(ours[0], 49, *ours[1:])
    gate.backward(grad)
    expected = ref_gate(ref64[0], 49, *ref64[1:])
    expected.backward(grad.double())
    check_close(gate, expected, torch.float32)
    for name, a, b in zip(("sums", "w1", "b1", "w2", "b2"), ours, ref64):
        assert a.grad.shape == a.shape, name
        check_close(a.grad, b.grad, torch.float32)


@pytest.mark.parametrize("over,err,match", SE_EXCITE_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("se_excite", backend.name,
                    lambda: backend.ops.se_excite(**se_excite_args(backend.device, **over)),
                    err, match)


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 40, generator=gen), 25, torch.randn(10, 40, 1, 1, generator=gen),
            torch.randn(10, generator=gen), torch.randn(40, 10, 1, 1, generator=gen),
            torch.randn(40, generator=gen)]
    args = [a.to(backend.device) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(backend.library.se_excite.default, args)
    if backend.name == "triton":  # float64 sums and weights (Triton only): a float64 gate
        torch.library.opcheck(backend.library.se_excite.default,
                              [a.double() if isinstance(a, torch.Tensor) else a for a in args])


# ---------------------------------------------------------------------------
# The CUDA launcher under the CPU emulation: transposed (strided) weights, guarded gate
# ---------------------------------------------------------------------------

SE_CASES = [(2, 3, 48, 12, torch.float32, False), (3, 1, 100, 40, torch.float32, True),
            (2, 2, 64, 70, torch.float16, False), (2, 2, 40, 8, torch.bfloat16, True)]


@pytest.mark.parametrize("case", SE_CASES, ids=lambda c: f"n{c[0]}t{c[1]}c{c[2]}s{c[3]}-{str(c[4])[6:]}"
                         + ("-strided" if c[5] else ""))
@isolated
def test_cuda_emu(emu, case):
    n, t, c, s, wdt, strided = case
    torch.manual_seed(c + s)
    hw = 49
    sums = torch.randn(n, t, c) * 10
    w1 = (torch.randn(s, c) / math.sqrt(c)).to(wdt)
    w2 = (torch.randn(c, s) / math.sqrt(s)).to(wdt)
    if strided:  # transposed storage: w1[s, c] at c * S + s
        w1 = w1.t().contiguous().t()
        w2 = w2.t().contiguous().t()
    b1 = (torch.randn(s) * 0.1).to(wdt)
    b2 = (torch.randn(c) * 0.1).to(wdt)
    gate = Out((n, c))
    args = S.rk_se_excite_args(
        sums=ptr(sums), n=n, t=t, c=c, hw=hw, weight_dtype=DT[wdt], w1=ptr(w1), s=s,
        s1_o=w1.stride(0), s1_i=w1.stride(1), b1=ptr(b1), w2=ptr(w2), s2_o=w2.stride(0),
        s2_i=w2.stride(1), b2=ptr(b2), gate=gate.ptr)
    launch(emu, "rk_se_excite", ref(args), None)
    gate.check_guards("gate")
    mean = sums.double().sum(1) / hw
    hidden = (mean @ w1.double().t() + b1.double()).clamp_min(0)
    expect = torch.sigmoid(hidden @ w2.double().t() + b2.double())
    assert_close("gate", gate.t, expect)
