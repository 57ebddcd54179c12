"""conv_bn_train (Triton): training conv + BN forward, running statistics, and the
backward of every input, against float64 F.conv2d + F.batch_norm autograd.

Lazy BN outputs: y stands for v = y * scale + shift in autograd, so y.backward(G)
means dL/dv = G, and with an input prologue the gradient returned for x is
dL/d(x * in_scale + in_shift)."""
import pytest
import torch
import torch.nn.functional as F

from numerics import (DEVICE, DTYPES, activation, bn_fold, conv_weight, poisoned_outputs,
                      randomize_bn, rel_err, tol, vector_dtype)
from regnet_kernels import ops

CASES = {  # c_in, c_out, k, stride, groups, H, prologue, gate
    "grouped-s2": (24, 24, 3, 2, 3, 13, True, False),
    "dense-gated": (24, 24, 3, 1, 1, 7, True, True),
    "1x1-gated": (56, 40, 1, 1, 1, 7, True, True),
    "proj-s2": (16, 48, 1, 2, 1, 13, False, False),
    "stem": (3, 32, 3, 2, 1, 13, False, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(case, batch, dtype):
    check_forward_backward(case, batch, dtype)


@pytest.mark.parametrize("case", ["grouped-s2", "1x1-gated"])
def test_float64(case):
    """float64 end to end: the conv, statistics, running statistics and gradients."""
    check_forward_backward(case, 2, torch.float64)


def check_forward_backward(case, batch, dtype):
    c_in, c_out, k, stride, groups, h, prologue, gated = CASES[case]
    gen = torch.Generator().manual_seed(c_in + batch)
    x = activation(batch, c_in, h, h + 1, dtype, gen)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen)
    vec = vector_dtype(dtype)  # of the BN parameters, statistics, prologue and gate
    bn = torch.nn.BatchNorm2d(c_out).to(DEVICE, vec)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.3, generator=gen)
    ref_bn = {n: t.detach().double().clone() for n, t in bn.state_dict().items()}
    s, t = (v.to(vec) for v in bn_fold(c_in, gen)) if prologue else (None, None)
    gate = torch.rand(batch, c_in, generator=gen).to(DEVICE, vec) if gated else None

    # float64 reference: v_prev = x * s + t is the leaf that x's gradient belongs to
    x64 = x.detach().double()
    v_prev = (x64 * s.double()[:, None, None] + t.double()[:, None, None]) if prologue else x64
    v_prev.requires_grad_()
    w64 = w.detach().double().requires_grad_()
    gamma, beta = (bn.weight.detach().double().requires_grad_(),
                   bn.bias.detach().double().requires_grad_())
    gate64 = gate.double().requires_grad_() if gated else None
    u = v_prev.relu() if prologue else v_prev
    if gated:
        u = u * gate64[:, :, None, None]
    z = F.conv2d(u, w64, stride=stride, padding=k // 2, groups=groups)
    v_ref = F.batch_norm(z, ref_bn["running_mean"], ref_bn["running_var"], gamma, beta,
                         training=True, momentum=0.1, eps=1e-5)
    grad = torch.randn(v_ref.shape, generator=gen).to(DEVICE)
    v_ref.backward(grad)

    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    gate_g = gate.detach().clone().requires_grad_() if gated else None
    with poisoned_outputs():
        out = ops.conv_bn_train(xg, wg, bn, stride=stride, groups=groups, in_scale=s,
                                in_shift=t, in_relu=prologue, gate=gate_g)
        out.y.backward(grad.to(dtype))
    v = out.y.double() * out.scale.double()[:, None, None] + out.shift.double()[:, None, None]
    assert rel_err(out.y, z) < tol(dtype) * (2 if prologue and dtype != torch.float32 else 1)
    assert rel_err(v, v_ref) < 4 * tol(dtype)
    assert rel_err(bn.running_mean, ref_bn["running_mean"]) < tol(dtype)
    assert rel_err(bn.running_var, ref_bn["running_var"]) < tol(dtype)
    assert bn.num_batches_tracked.item() == 1
    assert not out.scale.requires_grad  # statistics are decoding parameters, not differentiable
    assert out.scale.dtype == out.mean.dtype == vec
    grad_tol = 4 * tol(dtype) if dtype == torch.float32 else 10 * tol(dtype)
    assert xg.grad.dtype == dtype and rel_err(xg.grad, v_prev.grad) < grad_tol
    assert wg.grad.dtype == dtype and rel_err(wg.grad, w64.grad) < grad_tol
    assert rel_err(bn.weight.grad, gamma.grad) < grad_tol
    assert rel_err(bn.bias.grad, beta.grad) < grad_tol
    if gated:
        assert rel_err(gate_g.grad, gate64.grad) < grad_tol


@pytest.mark.parametrize("backend", ["triton", "cpp"] if DEVICE == "cpu" else ["triton"])
def test_frozen_bn(backend):
    """frozen=True (an eval-mode BN): normalized with the running statistics, which stay
    unchanged; gradients of x, the weight, gamma and beta as eval-mode F.batch_norm's.
    Batch 1 at 1x1 output is allowed (no batch statistics are needed)."""
    from regnet_kernels.ops import cpp
    conv_bn_train = (ops if backend == "triton" else cpp).conv_bn_train
    gen = torch.Generator().manual_seed(7)
    for n, h in ((2, 7), (1, 1)):
        x = activation(n, 16, h, h, torch.float32, gen)
        w = conv_weight(24, 8, 3, torch.float32, gen)
        bn = torch.nn.BatchNorm2d(24).to(DEVICE)
        randomize_bn(bn, gen)
        bn.eval()
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        g64, b64 = (p.double().detach().requires_grad_() for p in (bn.weight, bn.bias))
        v_ref = F.batch_norm(F.conv2d(x64, w64, padding=1, groups=2), bn.running_mean.double(),
                             bn.running_var.double(), g64, b64, training=False, eps=bn.eps)
        grad = torch.randn(v_ref.shape, generator=gen).to(DEVICE)
        v_ref.backward(grad)
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        with poisoned_outputs():
            out = conv_bn_train(xg, wg, bn, groups=2, frozen=True)
            out.y.backward(grad.float())
        v = out.y.double() * out.scale.double()[:, None, None] + out.shift.double()[:, None, None]
        assert rel_err(v, v_ref) < 1e-5
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before[key]), key
        for got, want in ((xg.grad, x64.grad), (wg.grad, w64.grad), (bn.weight.grad, g64.grad),
                          (bn.bias.grad, b64.grad)):
            assert rel_err(got, want) < 1e-5


def test_no_affine_no_running_stats():
    gen = torch.Generator().manual_seed(0)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 16, 1, torch.float32, gen)
    bn = torch.nn.BatchNorm2d(24, affine=False, track_running_stats=False).to(DEVICE)
    out = ops.conv_bn_train(x, w, bn)
    z = F.conv2d(x.double(), w.double())
    ref = F.batch_norm(z, None, None, training=True, eps=1e-5)
    v = out.y.double() * out.scale.double()[:, None, None] + out.shift.double()[:, None, None]
    assert rel_err(v, ref) < 1e-5


def test_one_value_per_channel_is_an_error():
    x = torch.randn(1, 8, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value"):
        ops.conv_bn_train(x, torch.randn(8, 8, 1, 1, device=DEVICE), torch.nn.BatchNorm2d(8).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    """Among others: the fake returns the real op's dtypes (float64 statistics for float64)."""
    gen = torch.Generator().manual_seed(1)
    vec = vector_dtype(dtype)
    x = activation(2, 16, 7, 7, dtype, gen)
    w = conv_weight(24, 8, 3, dtype, gen)
    s, t = (v.to(vec) for v in bn_fold(16, gen))
    gate = torch.rand(2, 16, generator=gen).to(DEVICE, vec)
    torch.library.opcheck(torch.ops.regnet_triton.conv_bn_train.default,
                          (x, w, 1, 2, s, t, True, gate, torch.rand(24, device=DEVICE, dtype=vec),
                           torch.randn(24, device=DEVICE, dtype=vec), 1e-5, None))
    frozen = torch.randn(5, 24, device=DEVICE, dtype=vec)  # given running-statistics rows
    torch.library.opcheck(torch.ops.regnet_triton.conv_bn_train.default,
                          (x, w, 1, 2, s, t, True, gate, torch.rand(24, device=DEVICE, dtype=vec),
                           torch.randn(24, device=DEVICE, dtype=vec), 1e-5, frozen))
