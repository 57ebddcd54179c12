"""conv_bn_train (a training conv + BN: forward, batch and running statistics, the backward of
every input) on every backend (tests/op_backends.py) against float64 F.conv2d +
F.batch_norm autograd; bad inputs, opcheck; then the CUDA launcher rk_conv_train (the conv
with the BN statistics partials) under the CPU emulation.

Lazy BN outputs: the raw conv output y stands for v = y * scale + shift in autograd, so
y.backward(G) means dL/dv = G, and with an input prologue the gradient returned for x is
dL/d(x * in_scale + in_shift): the float64 references take v (and v_prev) as the leaves.

Unwritten outputs: nan_filled_empty NaN-fills Python's torch.empty and ATen's at::empty, so
an element a kernel leaves unwritten fails the finiteness check of rel_err."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bad_inputs import CONV_BN_TRAIN_CASES, conv_bn_train_args, expect_rejected
from cuda_emu.harness import (CONV_TRAIN_CASES, DT, TOL as EMU_TOL, TRAIN_16, S, Out,
                              assert_close, conv_train_ids, gemm_input, isolated, launch,
                              nhwc_strides, out_hw, prologue_parts, ptr, ref, seed_of, tile_stats,
                              to_layout, train16_ids)
from numerics import (DTYPES, GROUP_WIDTHS, TOL, activation, bn_fold, close, conv_weight,
                      nan_filled_empty, randomize_bn, rel_err, tol, vector_dtype)
from op_backends import backends, per_backend
from regnet_kernels.ops import TrainOutput

# The input transform: none (a block input), the previous BN + ReLU (convs b and c),
# plus the SE gate (conv c of a Y block), or the gate alone.
PROLOGUES = {"none": (False, False), "bn-relu": (True, False), "bn-relu-gate": (True, True),
             "gate": (False, True)}
CPP_DTYPES = [torch.float32, torch.bfloat16]  # and fp16 in two dense cases


def grouped_train_cases(dtypes):
    """Every standard group width with 1 to 3 groups; stride, size, batch and prologue
    varied so that each value of each is met with several widths, in each dtype."""
    prologues = list(PROLOGUES)
    for i, cpg in enumerate(GROUP_WIDTHS):
        for j, dtype in enumerate(dtypes):
            groups = (i + j) % 3 + 1
            stride = 1 + (i + j) % 2
            size = (7, 13)[(i // 2 + j) % 2]
            batch = (1, 3)[(i // 4 + i + j) % 2]
            prologue = prologues[(i + 2 * j) % 4]
            yield pytest.param(cpg * groups, cpg * groups, 3, stride, groups, size, batch,
                               prologue, dtype,
                               id=f"g{cpg}x{groups}-s{stride}-h{size}-n{batch}-{prologue}-"
                                  f"{str(dtype)[6:]}")


# c_in, c_out, k, stride, groups, H, prologue: the block's dense and 1x1 convs
DENSE_CASES = {
    "dense3x3-s2": (24, 40, 3, 2, 1, 13, "bn-relu"),
    "dense3x3-s1": (48, 48, 3, 1, 1, 7, "bn-relu-gate"),
    "a-1x1": (32, 24, 1, 1, 1, 13, "none"),
    "c-1x1-gated": (56, 40, 1, 1, 1, 7, "bn-relu-gate"),
    "proj-s2": (16, 48, 1, 2, 1, 13, "none"),
    "stem": (3, 32, 3, 2, 1, 13, "none"),
}
# Triton's (fewer: the interpreter is slow)
TRITON_CASES = {
    "grouped-s2": (24, 24, 3, 2, 3, 13, "bn-relu"),
    "dense-gated": (24, 24, 3, 1, 1, 7, "bn-relu-gate"),
    "1x1-gated": (56, 40, 1, 1, 1, 7, "bn-relu-gate"),
    "proj-s2": (16, 48, 1, 2, 1, 13, "none"),
    "stem": (3, 32, 3, 2, 1, 13, "none"),
}


def named_cases(cases, batches, dtypes, names=None):
    for name in names or cases:
        c_in, c_out, k, stride, groups, h, prologue = cases[name]
        for batch in batches:
            for dtype in dtypes:
                yield pytest.param(c_in, c_out, k, stride, groups, h, batch, prologue, dtype,
                                   id=f"{name}-n{batch}-{str(dtype)[6:]}")


CPP_CASES = [*grouped_train_cases(CPP_DTYPES), *named_cases(DENSE_CASES, (1, 3), CPP_DTYPES),
             *named_cases(DENSE_CASES, (3,), [torch.float16], ["dense3x3-s1", "c-1x1-gated"])]
TRITON_TRAIN_CASES = [*named_cases(TRITON_CASES, (1, 3), DTYPES),
                      *named_cases(TRITON_CASES, (2,), [torch.float64],
                                   ["grouped-s2", "1x1-gated"])]


def bounds(backend, dtype, prologue):
    """||out - ref|| / ||ref|| bounds against float64. C++ (measured on the CPU: fp32 below
    3e-6, bf16 below 5e-3; the CUDA kernels accumulate in fp32 without TF32 and round the
    same tensors once): numerics.TOL for every output and gradient. Triton: y within tol
    (twice that for a 16-bit input prologue, which rounds u to x's dtype before the dot),
    the decoded v within 4 tol, the gradients within 4 tol (fp32) or 10 tol (16-bit)."""
    if backend.is_cpp:
        return dict(y=TOL[dtype], v=TOL[dtype], stats=TOL[dtype], grad=TOL[dtype])
    t = tol(dtype)
    return dict(y=t * (2 if PROLOGUES[prologue][0] and dtype != torch.float32 else 1),
                v=4 * t, stats=t, grad=4 * t if dtype == torch.float32 else 10 * t)


def per_channel(v):
    return v.double()[:, None, None]


def lazy_value(y, scale, shift):
    """v = y * scale + shift of a lazy BN output, in float64."""
    return y.double() * per_channel(scale) + per_channel(shift)


def random_bn(c, gen, device, dtype=torch.float32, momentum=0.1):
    bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    randomize_bn(bn, gen)
    return bn.to(device, vector_dtype(dtype))


def train_inputs(backend, c_in, c_out, k, groups, h, batch, prologue, dtype, gen):
    affine, gated = PROLOGUES[prologue]
    dev, vec = backend.device, vector_dtype(dtype)
    x = activation(batch, c_in, h, h + 1, dtype, gen, device=dev)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen, device=dev)
    s, t = (v.to(vec) for v in bn_fold(c_in, gen, device=dev)) if affine else (None, None)
    gate = torch.rand(batch, c_in, generator=gen).to(dev, vec) if gated else None
    return x, w, s, t, gate


def reference_train(x, w, bn, stride, groups, s, t, relu, gate, grad):
    """float64 F.conv2d + F.batch_norm in training mode on a copy of bn's state; returns
    (z raw conv output, v BN output, running stats after, gradients by input name)."""
    x64 = x.detach().double()
    leaves = {"x": (x64 * per_channel(s) + per_channel(t)) if s is not None else x64}
    leaves["w"] = w.detach().double()
    leaves["gamma"], leaves["beta"] = bn.weight.detach().double(), bn.bias.detach().double()
    if gate is not None:
        leaves["gate"] = gate.detach().double()
    for leaf in leaves.values():
        leaf.requires_grad_()
    u = leaves["x"].relu() if relu else leaves["x"]
    if gate is not None:
        u = u * leaves["gate"][:, :, None, None]
    z = F.conv2d(u, leaves["w"], stride=stride, padding=w.shape[-1] // 2, groups=groups)
    running = (bn.running_mean.detach().double().clone(), bn.running_var.detach().double().clone())
    v = F.batch_norm(z, *running, leaves["gamma"], leaves["beta"], training=True,
                     momentum=bn.momentum, eps=bn.eps)
    v.backward(grad.double())
    return z.detach(), v.detach(), running, {k: leaf.grad for k, leaf in leaves.items()}


@per_backend("c_in,c_out,k,stride,groups,h,batch,prologue,dtype", triton=TRITON_TRAIN_CASES,
             cpu=CPP_CASES, cuda=CPP_CASES)
def test_conv_bn_train(backend, c_in, c_out, k, stride, groups, h, batch, prologue, dtype):
    gen = torch.Generator().manual_seed(c_in * 7 + batch)
    x, w, s, t, gate = train_inputs(backend, c_in, c_out, k, groups, h, batch, prologue, dtype,
                                    gen)
    bn = random_bn(c_out, gen, backend.device, dtype)
    relu = s is not None
    ho, wo = (h - 1) // stride + 1, h // stride + 1
    grad = activation(batch, c_out, ho, wo, dtype, gen, device=backend.device)
    z, v_ref, running_ref, grads_ref = reference_train(x, w, bn, stride, groups, s, t, relu, gate,
                                                       grad)

    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    gate_g = gate.clone().requires_grad_() if gate is not None else None
    with nan_filled_empty():
        out = backend.ops.conv_bn_train(xg, wg, bn, stride=stride, groups=groups, in_scale=s,
                                        in_shift=t, in_relu=relu, gate=gate_g)
        out.y.backward(grad)
    vec = vector_dtype(dtype)
    assert isinstance(out, TrainOutput)
    assert out.y.dtype == dtype and out.y.is_contiguous(memory_format=torch.channels_last)
    # statistics are decoding parameters, not differentiable
    assert not out.scale.requires_grad and out.scale.dtype == out.mean.dtype == vec
    bound = bounds(backend, dtype, prologue)
    close(out.y, z, bound["y"])
    close(lazy_value(out.y, out.scale, out.shift), v_ref, bound["v"])
    mean_ref, var_ref = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    close(out.mean, mean_ref, bound["stats"])
    close(out.var, var_ref, bound["stats"])
    close(out.inv_std, (var_ref + bn.eps).rsqrt(), bound["stats"])
    close(bn.running_mean, running_ref[0], bound["stats"])
    close(bn.running_var, running_ref[1], bound["stats"])
    assert bn.num_batches_tracked.item() == 1

    assert xg.grad.dtype == dtype and wg.grad.dtype == dtype
    close(xg.grad, grads_ref["x"], bound["grad"])
    close(wg.grad, grads_ref["w"], bound["grad"])
    close(bn.weight.grad, grads_ref["gamma"], bound["grad"])
    close(bn.bias.grad, grads_ref["beta"], bound["grad"])
    if gate is not None:
        assert gate_g.grad.dtype == vec
        close(gate_g.grad, grads_ref["gate"], bound["grad"])


@pytest.mark.parametrize("prologue", ["gate", "bn-relu-gate"])
@pytest.mark.parametrize("wanted", ["x", "w", "gate", "gamma"])
def test_gradient_of_one_input(backend, prologue, wanted):
    """Only one input requires grad: it gets the gradient it gets when all do, the others
    none. (The autograd counts needs_input_grad over the tensors given, so the gate's index
    depends on whether in_scale / in_shift are passed.)"""
    gen = torch.Generator().manual_seed(17)
    x, w, s, t, gate = train_inputs(backend, 16, 24, 3, 2, 7, 2, prologue, torch.float32, gen)
    bn = random_bn(24, gen, backend.device)
    grad = activation(2, 24, 7, 8, torch.float32, gen, device=backend.device)

    def run(requires):
        leaves = {"x": x.clone(), "w": w.clone(), "gate": gate.clone()}
        for name in set(requires) & set(leaves):
            leaves[name].requires_grad_()
        for param in (bn.weight, bn.bias):  # gamma stands for both
            param.requires_grad_("gamma" in requires)
            param.grad = None
        out = backend.ops.conv_bn_train(leaves["x"], leaves["w"], bn, groups=2, in_scale=s,
                                        in_shift=t, in_relu=s is not None, gate=leaves["gate"])
        out.y.backward(grad)
        return {**{k: v.grad for k, v in leaves.items()}, "gamma": bn.weight.grad}

    every = run(["x", "w", "gate", "gamma"])
    one = run([wanted])
    assert torch.equal(one[wanted], every[wanted]), wanted
    assert all(g is None for k, g in one.items() if k != wanted), one


def test_nchw_input_and_grad(backend):
    gen = torch.Generator().manual_seed(11)
    dev = backend.device
    x = activation(2, 16, 9, 9, torch.float32, gen, channels_last=False,
                   device=dev).requires_grad_()
    w = conv_weight(16, 8, 3, torch.float32, gen, device=dev)
    bn = random_bn(16, gen, dev)
    grad = torch.randn(2, 16, 9, 9, generator=gen).to(dev)  # NCHW
    _, _, _, ref64 = reference_train(x, w, bn, 1, 2, None, None, False, None, grad)
    out = backend.ops.conv_bn_train(x, w, bn, groups=2)
    out.y.backward(grad)
    close(x.grad, ref64["x"], TOL[torch.float32])


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_two_steps(backend, momentum):
    """Running mean/var (unbiased) and num_batches_tracked as nn.BatchNorm2d updates them,
    momentum=None being the cumulative average, over two steps."""
    gen = torch.Generator().manual_seed(12)
    bn = random_bn(24, gen, backend.device, momentum=momentum)
    ref_bn = copy.deepcopy(bn).double().train()
    w = conv_weight(24, 16, 1, torch.float32, gen, device=backend.device)
    for step in (1, 2):
        x = activation(3, 16, 5, 6, torch.float32, gen, device=backend.device) * step + step
        with nan_filled_empty():
            backend.ops.conv_bn_train(x, w, bn)
        ref_bn(F.conv2d(x.double(), w.double()))
        close(bn.running_mean, ref_bn.running_mean, TOL[torch.float32])
        close(bn.running_var, ref_bn.running_var, TOL[torch.float32])
        assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == step


@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_running_stats_in_the_buffers_dtype(backend, buffer_dtype):
    """Running statistics kept in another dtype than float32 (a model cast with .to(dtype))
    are updated in fp32 and rounded once into their dtype, as nn.BatchNorm2d's are."""
    gen = torch.Generator().manual_seed(13)
    bn = random_bn(24, gen, backend.device)
    bn.running_mean = bn.running_mean.to(buffer_dtype)
    bn.running_var = bn.running_var.to(buffer_dtype)
    ref_bn = copy.deepcopy(bn).double().train()
    w = conv_weight(24, 16, 1, torch.float32, gen, device=backend.device)
    x = activation(3, 16, 5, 6, torch.float32, gen, device=backend.device) + 1.0
    with nan_filled_empty():
        backend.ops.conv_bn_train(x, w, bn)
    ref_bn(F.conv2d(x.double(), w.double()))
    tol = {torch.float64: TOL[torch.float32]}.get(buffer_dtype, TOL[buffer_dtype])
    for buf, ref in ((bn.running_mean, ref_bn.running_mean), (bn.running_var, ref_bn.running_var)):
        assert buf.dtype == buffer_dtype
        close(buf, ref, tol)


def test_bn_without_affine_or_running_stats(backend):
    gen = torch.Generator().manual_seed(13)
    dev = backend.device
    x = activation(2, 16, 7, 7, torch.float32, gen, device=dev).requires_grad_()
    w = conv_weight(24, 16, 1, torch.float32, gen, device=dev)
    bn = torch.nn.BatchNorm2d(24, affine=False, track_running_stats=False).to(dev)
    out = backend.ops.conv_bn_train(x, w, bn)
    x64 = x.detach().double().requires_grad_()
    ref64 = F.batch_norm(F.conv2d(x64, w.double()), None, None, training=True, eps=bn.eps)
    close(lazy_value(out.y, out.scale, out.shift), ref64, TOL[torch.float32])
    grad = torch.randn(ref64.shape, generator=gen).to(dev)
    ref64.backward(grad.double())
    out.y.backward(grad)
    close(x.grad, x64.grad, TOL[torch.float32])


def test_frozen_bn(backend):
    """frozen=True (an eval-mode BN): normalized with the running statistics, which stay
    unchanged; gradients of x, the weight, gamma and beta as eval-mode F.batch_norm's.
    Batch 1 at 1x1 output is allowed (no batch statistics are needed)."""
    gen = torch.Generator().manual_seed(7)
    dev = backend.device
    for n, h in ((2, 7), (1, 1)):
        x = activation(n, 16, h, h, torch.float32, gen, device=dev)
        w = conv_weight(24, 8, 3, torch.float32, gen, device=dev)
        bn = torch.nn.BatchNorm2d(24).to(dev)
        randomize_bn(bn, gen)
        bn.eval()
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        g64, b64 = (p.double().detach().requires_grad_() for p in (bn.weight, bn.bias))
        v_ref = F.batch_norm(F.conv2d(x64, w64, padding=1, groups=2), bn.running_mean.double(),
                             bn.running_var.double(), g64, b64, training=False, eps=bn.eps)
        grad = torch.randn(v_ref.shape, generator=gen).to(dev)
        v_ref.backward(grad)
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        with nan_filled_empty():
            out = backend.ops.conv_bn_train(xg, wg, bn, groups=2, frozen=True)
            out.y.backward(grad.float())
        v = lazy_value(out.y, out.scale, out.shift)
        assert rel_err(v, v_ref) < 1e-5
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before[key]), key
        for got, want in ((xg.grad, x64.grad), (wg.grad, w64.grad), (bn.weight.grad, g64.grad),
                          (bn.bias.grad, b64.grad)):
            assert rel_err(got, want) < 1e-5


def _train_step(backend, seed, size, batch):
    """A gated grouped 3x3 train step: its outputs, running stats and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    x, w, s, t, gate = train_inputs(backend, 96, 96, 3, 4, size, batch, "bn-relu-gate",
                                    torch.float32, gen)
    bn = random_bn(96, gen, backend.device)
    leaves = [x.requires_grad_(), w.requires_grad_(), gate.requires_grad_()]
    out = backend.ops.conv_bn_train(x, w, bn, stride=1, groups=4, in_scale=s, in_shift=t,
                                    in_relu=True, gate=gate)
    out.y.backward(torch.randn(out.y.shape, generator=gen).to(backend.device))
    return [out.y, *out[1:], bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad,
            *(leaf.grad for leaf in leaves)]


@backends("cpu", "cuda")  # the C++ kernels' reductions have a fixed order
def test_is_deterministic(backend):
    """Two runs (forward, running stats, every gradient) are bit-identical."""
    for a, b in zip(_train_step(backend, 14, 16, 3), _train_step(backend, 14, 16, 3)):
        assert torch.equal(a, b)


@backends("cpu")  # the CPU kernels' thread pool
def test_cpu_results_do_not_depend_on_the_thread_count(backend):
    """The CPU kernels' reductions are chunked by rows, not by threads (and oneDNN's convs
    here give the same bits too): forward, statistics and every gradient are identical
    with 1 and 3 threads."""
    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _train_step(backend, 15, 28, 4)
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(run(1), run(3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("over,err,match", CONV_BN_TRAIN_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("conv_bn_train", backend.name,
                    lambda: backend.ops.conv_bn_train(**conv_bn_train_args(backend.device,
                                                                           **over)),
                    err, match)


def test_bad_input_changes_nothing(backend):
    bn = torch.nn.BatchNorm2d(16).to(backend.device)
    state = copy.deepcopy(bn.state_dict())
    expect_rejected("conv_bn_train", backend.name,
                    lambda: backend.ops.conv_bn_train(**conv_bn_train_args(
                        backend.device, bn=bn, gate=torch.rand(2, 15))),
                    ValueError, "gate must have shape")
    assert all(torch.equal(a, b) for a, b in zip(state.values(), bn.state_dict().values()))


@backends("triton")  # float64 (Triton only); the C++ registrations: test_cpp_training_opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype):
    """Among others: the fake returns the real op's dtypes (float64 statistics for float64)."""
    gen = torch.Generator().manual_seed(1)
    dev, vec = backend.device, vector_dtype(dtype)
    x = activation(2, 16, 7, 7, dtype, gen, device=dev)
    w = conv_weight(24, 8, 3, dtype, gen, device=dev)
    s, t = (v.to(vec) for v in bn_fold(16, gen, device=dev))
    gate = torch.rand(2, 16, generator=gen).to(dev, vec)
    op = backend.library.conv_bn_train.default
    torch.library.opcheck(op, (x, w, 1, 2, s, t, True, gate, torch.rand(24, device=dev, dtype=vec),
                               torch.randn(24, device=dev, dtype=vec), 1e-5, None))
    frozen = torch.randn(5, 24, device=dev, dtype=vec)  # given running-statistics rows
    torch.library.opcheck(op, (x, w, 1, 2, s, t, True, gate, torch.rand(24, device=dev, dtype=vec),
                               torch.randn(24, device=dev, dtype=vec), 1e-5, frozen))


def _cpp_opcheck_cases(dev):
    """(op name, args) for every C++ training op; differentiable inputs require grad, so
    opcheck also checks the autograd registration."""
    from regnet_kernels.backends.cpp import ops as cpp
    gen = torch.Generator().manual_seed(6)

    def rand(*shape, normal=False):
        return (torch.randn if normal else torch.rand)(*shape, generator=gen).to(dev)

    x = activation(2, 16, 7, 7, torch.float32, gen, device=dev)
    w = conv_weight(24, 8, 3, torch.float32, gen, device=dev)
    s, t = rand(16) + 0.5, rand(16, normal=True) * 0.5
    gate = rand(2, 16)
    gamma, beta = rand(24) + 0.5, rand(24, normal=True)
    ops = cpp._ops()
    y, stats = ops.conv_bn_train(x, w, 1, 2, s, t, True, gate, gamma, beta, 1e-5, None)
    scale, shift = stats[2], stats[3]
    g = activation(2, 24, 7, 7, torch.float32, gen, device=dev)
    r = activation(2, 24, 7, 7, torch.float32, gen, device=dev)

    def grad(*tensors):
        return [v.clone().requires_grad_() for v in tensors]

    def zeros(c):
        return torch.zeros(c, device=dev)

    return [
        ("conv_bn_train", (*grad(x, w), 2, 2, s, t, True, *grad(gate, gamma, beta), 1e-5, None)),
        ("conv_bn_train", (*grad(x, w), 1, 2, None, None, False, None, None, None, 1e-3, None)),
        ("conv_bn_train", (*grad(x, w), 1, 2, s, t, True, *grad(gate, gamma, beta), 1e-5,
                           stats)),  # frozen (eval-mode) BN
        ("conv_bn_train_backward", (g, x, w, y, stats, 1, 2, s, t, True, gate, False,
                                    [True, True])),
        ("conv_bn_train_backward", (g, x, w, y, stats, 1, 2, None, None, False, None, False,
                                    [True, False])),
        ("conv_bn_train_backward", (g, x, w, y, stats, 1, 2, s, t, True, gate, True,
                                    [False, True])),
        ("bn_update_running", (stats, 98, zeros(24), zeros(24) + 1,
                               torch.tensor(3, dtype=torch.long, device=dev), None)),
        ("bn_update_running", (stats, 98, zeros(24), zeros(24) + 1, None, 0.1)),
        ("se_squeeze", (*grad(y), scale, shift)),
        ("se_squeeze_backward", (rand(2, 1, 24, normal=True), y, scale, shift)),
        ("se_excite", (*grad(rand(2, 1, 24)), 49,
                       *grad(rand(6, 24, 1, 1, normal=True), rand(6, normal=True),
                             rand(24, 6, 1, 1, normal=True), rand(24, normal=True)))),
        ("bn_add_relu", (*grad(y), scale, shift, *grad(r), scale * 0.5, shift)),
        ("bn_add_relu", (*grad(y), scale, shift, *grad(r), None, None)),
        ("bn_add_relu", (*grad(y), scale, shift, None, None, None)),
        ("bn_add_relu_backward", (g, ops.bn_add_relu(y, scale, shift, r, None, None))),
    ]


# Built inside the test (building the extension at collection time would slow every run).
CPP_OPCHECK_IDS = ["conv_bn_train-prologue", "conv_bn_train-plain", "conv_bn_train-frozen",
                   "backward-all", "backward-x-only", "backward-w-only-frozen",
                   "bn_update_running-cumulative", "bn_update_running-momentum", "se_squeeze",
                   "se_squeeze_backward", "se_excite", "bn_add_relu-projection",
                   "bn_add_relu-identity", "bn_add_relu-none", "bn_add_relu_backward"]


# The C++ training ops share one setup (a conv_bn_train forward gives the statistics the
# others take), so their registrations are checked together here.
@backends("cpu", "cuda")
@pytest.mark.parametrize("case", range(len(CPP_OPCHECK_IDS)), ids=CPP_OPCHECK_IDS)
def test_cpp_training_opcheck(backend, case):
    cases = _cpp_opcheck_cases(backend.device)
    assert len(cases) == len(CPP_OPCHECK_IDS)
    name, args = cases[case]
    torch.library.opcheck(getattr(backend.library, name).default, args)


# ---------------------------------------------------------------------------
# The CUDA launcher rk_conv_train under the CPU emulation: the conv with its prologue and
# the per-row-tile BN statistics partials, guarded outputs, every 16-bit tile
# ---------------------------------------------------------------------------

def run_conv_train(emu, case, dtype):
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case)
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, k) / math.sqrt(c_in // groups * k * k)
         ).to(dtype).contiguous(memory_format=torch.channels_last)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    u = gemm_input(x, parts)
    expect = F.conv2d(u, w.double(), stride=stride, padding=k // 2, groups=groups)
    expect = expect.permute(0, 2, 3, 1)  # NHWC
    ho = out_hw(h, k, stride)
    sx = nhwc_strides(x)
    swo, swi, swh, sww = w.stride()
    args = S.rk_conv_train_args(
        dtype=DT[dtype], x=ptr(x), n=n, h=h, w=h, c_in=c_in, sx_n=sx[0], sx_h=sx[1], sx_w=sx[2],
        sx_c=sx[3], weight=ptr(w), c_out=c_out, k=k, sw_o=swo, sw_i=swi, sw_h=swh, sw_w=sww,
        stride=stride, groups=groups, prologue=pro)
    plan = S.rk_conv_train_plan_t()
    launch(emu, "rk_conv_train_plan", ref(args), ref(plan))
    assert (plan.out_h, plan.out_w) == (ho, ho)
    rows = n * ho * ho
    assert plan.tiles_m == -(-rows // plan.block_m), (plan.tiles_m, plan.block_m)
    for with_partials in (True, False):
        y = Out((n, ho, ho, c_out), dtype)
        args.y = y.ptr
        partials = Out((plan.tiles_m, 2, c_out)) if with_partials else None
        args.partials = partials.ptr if with_partials else None
        launch(emu, "rk_conv_train", ref(args), None)
        y.check_guards("y")
        assert_close(f"y (partials={with_partials})", y.t, expect, EMU_TOL[dtype])
        if with_partials:  # from the fp32 accumulators, not from the rounded y
            partials.check_guards("partials")
            e = tile_stats(expect.reshape(rows, c_out), plan.block_m)
            assert_close("partials mean", partials.t[:, 0], e[:, 0])
            assert_close("partials M2", partials.t[:, 1], e[:, 1])


@pytest.mark.parametrize("case", CONV_TRAIN_CASES, ids=conv_train_ids)
@isolated
def test_cuda_emu_fp32(emu, case):
    run_conv_train(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16, ids=train16_ids)
@isolated
def test_cuda_emu_16bit(emu, case_dtype):
    run_conv_train(emu, *case_dtype)
