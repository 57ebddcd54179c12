"""The C++ extension's training ops (regnet_kernels.ops.cpp: conv_bn_train, se_squeeze,
se_excite's backward, bn_add_relu) against float64 autograd references: forward, running
statistics and the gradient of every input; determinism; whole X/Y block train steps
through block_forward_train(..., block_ops=cpp); opcheck; bad inputs.

The parity tests take the `device` fixture: the CPU kernels (csrc/cpu) everywhere, and
the CUDA kernels (csrc/cuda) too where a GPU is present. On CPU machines the CUDA
kernels run in the CPU emulation instead (tests/test_cuda_emulation.py).

Lazy BN outputs (see regnet_kernels.ops.conv_bn_train): the raw conv output y stands
for v = y * scale + shift in autograd, so the float64 references take v (and, with an
input prologue, v_prev = x * in_scale + in_shift) as the leaf whose gradient the op
returns.

Unwritten outputs: the C++ kernels allocate with at::empty, which the Python-level
`poisoned_outputs` cannot reach; `nan_filled_empty` turns on ATen's own NaN fill of
uninitialized memory (torch.utils.deterministic.fill_uninitialized_memory, active
under deterministic algorithms), so any element a kernel leaves unwritten is NaN and
fails the finiteness check of `rel_err`.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import numerics
from bad_inputs import CONV_BN_ACT_CASES
from blocks import make_block
from numerics import GROUP_WIDTHS, nan_filled_empty, randomize_bn, rel_err
from regnet_kernels.models.fused import block_forward_train
from regnet_kernels.backends.cpp import build, ops as cpp

DTYPES = [torch.float32, torch.bfloat16]
# ||out - ref|| / ||ref|| against float64, for outputs and gradients alike. Measured on
# the CPU: fp32 below 3e-6 (the convs through oneDNN, statistics and BN backward sums in
# fp32, centered, chunked), bf16 below 5e-3 (y, u, dy, du each rounded to 8 bits once).
# The CUDA kernels accumulate in fp32 without TF32 and round the same tensors once.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA kernels' runs need a CUDA device")])]
DEV = "cpu"  # the device of the running parity test (set by the `device` fixture)


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, reason = cpp.available()
    assert ok, reason


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a parity test on each device the extension has kernels for here."""
    global DEV
    if request.param == "cuda":
        ok, reason = build.available(cuda=True)
        assert ok, reason  # a GPU machine must build the CUDA kernels
    DEV = request.param
    yield DEV
    DEV = "cpu"


def activation(*args, **kwargs):
    return numerics.activation(*args, **kwargs).to(DEV)


def conv_weight(*args, **kwargs):
    return numerics.conv_weight(*args, **kwargs).to(DEV)


def rand(*shape, gen, normal=False):
    """A random tensor from `gen` (CPU), on the test's device."""
    return (torch.randn if normal else torch.rand)(*shape, generator=gen).to(DEV)


def close(out, ref, bound):
    """Within `bound` in norm (rel_err also asserts every element is finite), and no
    single element off by more than 20 x bound x max |ref|."""
    err = rel_err(out, ref)
    assert err < bound, err
    worst = (out.detach().double() - ref.detach().double()).abs().max()
    assert worst <= 20 * bound * ref.detach().abs().max().double().clamp_min(1e-30), worst


def per_channel(v):
    return v.double()[:, None, None]


def lazy_value(y, scale, shift):
    """v = y * scale + shift of a lazy BN output, in float64."""
    return y.double() * per_channel(scale) + per_channel(shift)


def random_bn(c, gen, momentum=0.1):
    bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    randomize_bn(bn, gen)
    return bn.to(DEV)


def random_affine(c, gen):
    """A folded BN of a previous layer: scale in [0.5, 1.5], shift ~ N(0, 0.5)."""
    return rand(c, gen=gen) + 0.5, rand(c, gen=gen, normal=True) * 0.5


# ---------------------------------------------------------------------------
# conv_bn_train
# ---------------------------------------------------------------------------

# The input transform: none (a block input), the previous BN + ReLU (convs b and c),
# plus the SE gate (conv c of a Y block), or the gate alone.
PROLOGUES = {"none": (False, False), "bn-relu": (True, False), "bn-relu-gate": (True, True),
             "gate": (False, True)}


def grouped_train_cases():
    """Every standard group width with 1 to 3 groups; stride, size, batch and prologue
    varied so that each value of each is met with several widths, in both dtypes."""
    prologues = list(PROLOGUES)
    for i, cpg in enumerate(GROUP_WIDTHS):
        for j, dtype in enumerate(DTYPES):
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


def dense_train_cases():
    for name, (c_in, c_out, k, stride, groups, h, prologue) in DENSE_CASES.items():
        for batch in (1, 3):
            for dtype in DTYPES:
                yield pytest.param(c_in, c_out, k, stride, groups, h, batch, prologue, dtype,
                                   id=f"{name}-n{batch}-{str(dtype)[6:]}")


def train_inputs(c_in, c_out, k, groups, h, batch, prologue, dtype, gen):
    affine, gated = PROLOGUES[prologue]
    x = activation(batch, c_in, h, h + 1, dtype, gen)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen)
    s, t = random_affine(c_in, gen) if affine else (None, None)
    gate = rand(batch, c_in, gen=gen) if gated else None
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


def check_conv_bn_train(c_in, c_out, k, stride, groups, h, batch, prologue, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + c_in * 7 + batch)
    x, w, s, t, gate = train_inputs(c_in, c_out, k, groups, h, batch, prologue, dtype, gen)
    bn = random_bn(c_out, gen)
    relu = s is not None
    ho, wo = (h - 1) // stride + 1, h // stride + 1
    grad = activation(batch, c_out, ho, wo, dtype, gen)
    z, v_ref, running_ref, grads_ref = reference_train(x, w, bn, stride, groups, s, t, relu, gate,
                                                       grad)

    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    gate_g = gate.clone().requires_grad_() if gate is not None else None
    with nan_filled_empty():
        out = cpp.conv_bn_train(xg, wg, bn, stride=stride, groups=groups, in_scale=s, in_shift=t,
                                in_relu=relu, gate=gate_g)
        out.y.backward(grad)
    assert isinstance(out, cpp.TrainOutput)
    assert out.y.dtype == dtype and out.y.is_contiguous(memory_format=torch.channels_last)
    assert not out.scale.requires_grad and out.mean.dtype == torch.float32
    tol = TOL[dtype]
    close(out.y, z, tol)
    close(lazy_value(out.y, out.scale, out.shift), v_ref, tol)
    mean_ref, var_ref = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    close(out.mean, mean_ref, tol)
    close(out.var, var_ref, tol)
    close(out.inv_std, (var_ref + bn.eps).rsqrt(), tol)
    close(bn.running_mean, running_ref[0], tol)
    close(bn.running_var, running_ref[1], tol)
    assert bn.num_batches_tracked.item() == 1

    assert xg.grad.dtype == dtype and wg.grad.dtype == dtype
    close(xg.grad, grads_ref["x"], tol)
    close(wg.grad, grads_ref["w"], tol)
    close(bn.weight.grad, grads_ref["gamma"], tol)
    close(bn.bias.grad, grads_ref["beta"], tol)
    if gate is not None:
        assert gate_g.grad.dtype == torch.float32
        close(gate_g.grad, grads_ref["gate"], tol)


@pytest.mark.parametrize("c_in,c_out,k,stride,groups,h,batch,prologue,dtype",
                         grouped_train_cases())
def test_conv_bn_train_grouped(device, c_in, c_out, k, stride, groups, h, batch, prologue,
                               dtype):
    check_conv_bn_train(c_in, c_out, k, stride, groups, h, batch, prologue, dtype)


@pytest.mark.parametrize("c_in,c_out,k,stride,groups,h,batch,prologue,dtype",
                         dense_train_cases())
def test_conv_bn_train_dense(device, c_in, c_out, k, stride, groups, h, batch, prologue, dtype):
    check_conv_bn_train(c_in, c_out, k, stride, groups, h, batch, prologue, dtype)


@pytest.mark.parametrize("case", ["dense3x3-s1", "c-1x1-gated"])
def test_conv_bn_train_float16(device, case):
    c_in, c_out, k, stride, groups, h, prologue = DENSE_CASES[case]
    check_conv_bn_train(c_in, c_out, k, stride, groups, h, 3, prologue, torch.float16)


@pytest.mark.parametrize("prologue", ["gate", "bn-relu-gate"])
@pytest.mark.parametrize("wanted", ["x", "w", "gate", "gamma"])
def test_conv_bn_train_gradient_of_one_input(device, prologue, wanted):
    """Only one input requires grad: it gets the gradient it gets when all do, the others
    none. (The autograd counts needs_input_grad over the tensors given, so the gate's index
    depends on whether in_scale / in_shift are passed.)"""
    gen = torch.Generator().manual_seed(17)
    x, w, s, t, gate = train_inputs(16, 24, 3, 2, 7, 2, prologue, torch.float32, gen)
    bn = random_bn(24, gen)
    grad = activation(2, 24, 7, 8, torch.float32, gen)

    def run(requires):
        leaves = {"x": x.clone(), "w": w.clone(), "gate": gate.clone()}
        for name in set(requires) & set(leaves):
            leaves[name].requires_grad_()
        for param in (bn.weight, bn.bias):  # gamma stands for both
            param.requires_grad_("gamma" in requires)
            param.grad = None
        out = cpp.conv_bn_train(leaves["x"], leaves["w"], bn, groups=2, in_scale=s, in_shift=t,
                                in_relu=s is not None, gate=leaves["gate"])
        out.y.backward(grad)
        return {**{k: v.grad for k, v in leaves.items()}, "gamma": bn.weight.grad}

    every = run(["x", "w", "gate", "gamma"])
    one = run([wanted])
    assert torch.equal(one[wanted], every[wanted]), wanted
    assert all(g is None for k, g in one.items() if k != wanted), one


def test_conv_bn_train_nchw_input_and_grad(device):
    gen = torch.Generator().manual_seed(11)
    x = activation(2, 16, 9, 9, torch.float32, gen, channels_last=False).requires_grad_()
    w = conv_weight(16, 8, 3, torch.float32, gen)
    bn = random_bn(16, gen)
    grad = rand(2, 16, 9, 9, gen=gen, normal=True)  # NCHW
    _, _, _, ref = reference_train(x, w, bn, 1, 2, None, None, False, None, grad)
    out = cpp.conv_bn_train(x, w, bn, groups=2)
    out.y.backward(grad)
    close(x.grad, ref["x"], TOL[torch.float32])


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_two_steps(device, momentum):
    """Running mean/var (unbiased) and num_batches_tracked as nn.BatchNorm2d updates them,
    momentum=None being the cumulative average, over two steps."""
    gen = torch.Generator().manual_seed(12)
    bn = random_bn(24, gen, momentum=momentum)
    ref = copy.deepcopy(bn).double().train()
    w = conv_weight(24, 16, 1, torch.float32, gen)
    for step in (1, 2):
        x = activation(3, 16, 5, 6, torch.float32, gen) * step + step
        with nan_filled_empty():
            cpp.conv_bn_train(x, w, bn)
        ref(F.conv2d(x.double(), w.double()))
        close(bn.running_mean, ref.running_mean, TOL[torch.float32])
        close(bn.running_var, ref.running_var, TOL[torch.float32])
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == step


def test_bn_without_affine_or_running_stats(device):
    gen = torch.Generator().manual_seed(13)
    x = activation(2, 16, 7, 7, torch.float32, gen).requires_grad_()
    w = conv_weight(24, 16, 1, torch.float32, gen)
    bn = torch.nn.BatchNorm2d(24, affine=False, track_running_stats=False).to(DEV)
    out = cpp.conv_bn_train(x, w, bn)
    x64 = x.detach().double().requires_grad_()
    ref = F.batch_norm(F.conv2d(x64, w.double()), None, None, training=True, eps=bn.eps)
    close(lazy_value(out.y, out.scale, out.shift), ref, TOL[torch.float32])
    grad = rand(*ref.shape, gen=gen, normal=True)
    ref.backward(grad.double())
    out.y.backward(grad)
    close(x.grad, x64.grad, TOL[torch.float32])


def test_conv_bn_train_is_deterministic(device):
    """Two runs (forward, running stats, every gradient) are bit-identical."""
    def run():
        gen = torch.Generator().manual_seed(14)
        x, w, s, t, gate = train_inputs(96, 96, 3, 4, 16, 3, "bn-relu-gate", torch.float32, gen)
        bn = random_bn(96, gen)
        leaves = [x.requires_grad_(), w.requires_grad_(), gate.requires_grad_()]
        out = cpp.conv_bn_train(x, w, bn, stride=1, groups=4, in_scale=s, in_shift=t,
                                in_relu=True, gate=gate)
        out.y.backward(rand(*out.y.shape, gen=gen, normal=True))
        return [out.y, *out[1:], bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad,
                *(leaf.grad for leaf in leaves)]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_cpu_results_do_not_depend_on_the_thread_count():
    """The CPU kernels' reductions are chunked by rows, not by threads (and oneDNN's convs
    here give the same bits too): forward, statistics and every gradient are identical
    with 1 and 3 threads."""
    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(15)
            x, w, s, t, gate = train_inputs(96, 96, 3, 4, 28, 4, "bn-relu-gate", torch.float32,
                                            gen)
            bn = random_bn(96, gen)
            leaves = [x.requires_grad_(), w.requires_grad_(), gate.requires_grad_()]
            out = cpp.conv_bn_train(x, w, bn, groups=4, in_scale=s, in_shift=t, in_relu=True,
                                    gate=gate)
            out.y.backward(torch.randn(out.y.shape, generator=gen))
            return [out.y, *out[1:], bn.running_var, bn.weight.grad,
                    *(leaf.grad for leaf in leaves)]
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(run(1), run(3)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# se_squeeze, se_excite's backward, bn_add_relu
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,h,w", [(1, 56, 7, 7), (3, 24, 13, 14), (2, 232, 1, 1),
                                     (3, 8, 16, 16)])
def test_se_squeeze(device, n, c, h, w, dtype):
    gen = torch.Generator().manual_seed(c + n)
    y = activation(n, c, h, w, dtype, gen).requires_grad_()
    scale, shift = random_affine(c, gen)
    v = lazy_value(y.detach(), scale, shift).requires_grad_()
    ref = v.relu().sum((2, 3))
    grad = rand(n, 1, c, gen=gen, normal=True)
    ref.backward(grad[:, 0].double())
    with nan_filled_empty():
        sums = cpp.se_squeeze(y, scale, shift)
        sums.backward(grad)
    assert sums.shape == (n, 1, c) and sums.dtype == torch.float32
    close(sums[:, 0], ref, TOL[torch.float32])  # fp32 sums of the exact bf16 values
    assert y.grad.dtype == dtype and y.grad.is_contiguous(memory_format=torch.channels_last)
    close(y.grad, v.grad, TOL[dtype])


def ref_se(sums, hw, w1, b1, w2, b2):
    hidden = (sums.sum(1) / hw @ w1.flatten(1).T + b1).relu()
    return torch.sigmoid(hidden @ w2.flatten(1).T + b2)


@pytest.mark.parametrize("n,t,c,s,conv_shaped", [(1, 1, 24, 6, True), (3, 1, 232, 58, False),
                                                 (2, 3, 56, 14, True)])
def test_se_excite_backward(device, n, t, c, s, conv_shaped):
    gen = torch.Generator().manual_seed(c)
    shape1, shape2 = ((s, c, 1, 1), (c, s, 1, 1)) if conv_shaped else ((s, c), (c, s))
    inputs = [rand(n, t, c, gen=gen, normal=True) * 49,
              rand(*shape1, gen=gen, normal=True) / c ** 0.5,
              rand(s, gen=gen, normal=True) * 0.1, rand(*shape2, gen=gen, normal=True) / s ** 0.5,
              rand(c, gen=gen, normal=True) * 0.1]
    ours = [v.clone().requires_grad_() for v in inputs]
    ref = [v.double().requires_grad_() for v in inputs]
    grad = rand(n, c, gen=gen, normal=True)
    gate = cpp.se_excite(ours[0], 49, *ours[1:])
    gate.backward(grad)
    expected = ref_se(ref[0], 49, *ref[1:])
    expected.backward(grad.double())
    close(gate, expected, TOL[torch.float32])
    for name, a, b in zip(("sums", "w1", "b1", "w2", "b2"), ours, ref):
        assert a.grad.shape == a.shape, name
        close(a.grad, b.grad, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,h,w,shortcut", [
    (1, 56, 7, 7, "projection"), (3, 24, 13, 14, "identity"), (2, 232, 1, 1, "projection"),
    (3, 40, 7, 8, "none"), (1, 8, 16, 16, "identity")])
def test_bn_add_relu(device, n, c, h, w, shortcut, dtype):
    gen = torch.Generator().manual_seed(c + n)
    y = activation(n, c, h, w, dtype, gen).requires_grad_()
    r = activation(n, c, h, w, dtype, gen, channels_last=False).requires_grad_()
    scale, shift = random_affine(c, gen)
    v = lazy_value(y.detach(), scale, shift).requires_grad_()
    args, ref, r_leaf = (), v, None
    if shortcut == "projection":
        rs, rt = random_affine(c, gen)
        args = (r, rs, rt)
        r_leaf = lazy_value(r.detach(), rs, rt).requires_grad_()
    elif shortcut == "identity":
        args = (r,)
        r_leaf = r.detach().double().requires_grad_()
    if r_leaf is not None:
        ref = ref + r_leaf
    ref = ref.relu()
    grad = activation(n, c, h, w, dtype, gen)
    ref.backward(grad.double())
    with nan_filled_empty():
        out = cpp.bn_add_relu(y, scale, shift, *args)
        out.backward(grad)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    close(out, ref, TOL[dtype])
    close(y.grad, v.grad, TOL[dtype])
    if r_leaf is not None:
        assert r.grad.dtype == dtype
        close(r.grad, r_leaf.grad, TOL[dtype])
    else:
        assert r.grad is None


# ---------------------------------------------------------------------------
# Whole blocks: block_forward_train(..., block_ops=cpp); their parity with the float64
# reference block is in test_fused_block_train.py (parametrized by backend)
# ---------------------------------------------------------------------------


def run_block(block, x, grad):
    x = x.detach().requires_grad_()
    with nan_filled_empty():
        out = block_forward_train(x, block, block_ops=cpp)
        out.backward(grad)
    return out, x.grad


def test_block_train_is_deterministic(device):
    block, h = make_block("Y-proj-s2", torch.float32)
    block = block.to(DEV)
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(2)
    x = activation(3, block.w_in, h, h, torch.float32, gen)
    grad = activation(3, block.w_out, 7, 7, torch.float32, gen)
    a, da = run_block(block.train(), x, grad)
    b, db = run_block(twin.train(), x, grad)
    assert torch.equal(a, b) and torch.equal(da, db)
    for (key, p), q in zip(block.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, u), v in zip(block.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(u, v), key


@pytest.mark.slow
def test_block_train_compiles_fullgraph():
    """torch.compile traces a whole train step (fakes, autograd formulas, the mutating
    running-statistics update) into one graph, and computes what eager does."""
    block, h = make_block("Y-proj-s2", torch.float32)
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(3)
    x = activation(2, block.w_in, h, h, torch.float32, gen)
    grad = activation(2, block.w_out, 7, 7, torch.float32, gen)
    step = torch.compile(lambda x: block_forward_train(x, block.train(), block_ops=cpp),
                         fullgraph=True, backend="aot_eager")
    x_c = x.clone().requires_grad_()
    out = step(x_c)
    out.backward(grad)
    expected, dx = run_block(twin.train(), x, grad)
    assert torch.equal(out, expected) and torch.equal(x_c.grad, dx)
    for (key, p), q in zip(block.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, u), v in zip(block.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(u, v), key


# ---------------------------------------------------------------------------
# opcheck: schemas (incl. bn_update_running's mutation annotations), fakes, autograd
# ---------------------------------------------------------------------------


def _opcheck_cases():
    """(op name, args) for every new op; differentiable inputs require grad, so opcheck
    also checks the autograd registration."""
    gen = torch.Generator().manual_seed(6)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 8, 3, torch.float32, gen)
    s, t = random_affine(16, gen)
    gate = rand(2, 16, gen=gen)
    gamma, beta = rand(24, gen=gen) + 0.5, rand(24, gen=gen, normal=True)
    ops = cpp._ops()
    y, stats = ops.conv_bn_train(x, w, 1, 2, s, t, True, gate, gamma, beta, 1e-5, None)
    scale, shift = stats[2], stats[3]
    g = activation(2, 24, 7, 7, torch.float32, gen)
    r = activation(2, 24, 7, 7, torch.float32, gen)

    def grad(*tensors):
        return [v.clone().requires_grad_() for v in tensors]

    def zeros(c):
        return torch.zeros(c, device=DEV)

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
                               torch.tensor(3, dtype=torch.long, device=DEV), None)),
        ("bn_update_running", (stats, 98, zeros(24), zeros(24) + 1, None, 0.1)),
        ("se_squeeze", (*grad(y), scale, shift)),
        ("se_squeeze_backward", (rand(2, 1, 24, gen=gen, normal=True), y, scale, shift)),
        ("se_excite", (*grad(rand(2, 1, 24, gen=gen)), 49,
                       *grad(rand(6, 24, 1, 1, gen=gen, normal=True),
                             rand(6, gen=gen, normal=True), rand(24, 6, 1, 1, gen=gen, normal=True),
                             rand(24, gen=gen, normal=True)))),
        ("bn_add_relu", (*grad(y), scale, shift, *grad(r), scale * 0.5, shift)),
        ("bn_add_relu", (*grad(y), scale, shift, *grad(r), None, None)),
        ("bn_add_relu", (*grad(y), scale, shift, None, None, None)),
        ("bn_add_relu_backward", (g, ops.bn_add_relu(y, scale, shift, r, None, None))),
    ]


# Built inside the test (building the extension at collection time would slow every run).
OPCHECK_IDS = ["conv_bn_train-prologue", "conv_bn_train-plain", "conv_bn_train-frozen",
               "backward-all", "backward-x-only", "backward-w-only-frozen", "bn_update_running-cumulative",
               "bn_update_running-momentum", "se_squeeze", "se_squeeze_backward", "se_excite",
               "bn_add_relu-projection", "bn_add_relu-identity", "bn_add_relu-none",
               "bn_add_relu_backward"]


@pytest.mark.parametrize("case", range(len(OPCHECK_IDS)), ids=OPCHECK_IDS)
def test_opcheck(device, case):
    cases = _opcheck_cases()
    assert len(cases) == len(OPCHECK_IDS)
    name, args = cases[case]
    torch.library.opcheck(getattr(cpp._ops(), name).default, args)


# ---------------------------------------------------------------------------
# Bad inputs: the Triton functions' checks with the CPU device check, and the C++ ones
# ---------------------------------------------------------------------------


def conv_bn_train_args(**over):
    """Valid conv_bn_train arguments (2 groups of 8 channels, 3x3), `over` replacing some."""
    args = dict(x=torch.randn(2, 16, 7, 7), weight=torch.randn(16, 8, 3, 3),
                bn=torch.nn.BatchNorm2d(16), groups=2)
    args.update(over)
    return args


# The shared conv cases that concern conv_bn_train's arguments (it has no scale/shift).
CONV_CASES = [pytest.param(over, err, match, id=f"conv-{i}")
              for i, (over, err, match) in enumerate(CONV_BN_ACT_CASES)
              if set(over) <= {"x", "weight", "groups", "stride"}]


@pytest.mark.parametrize("over,err,match", CONV_CASES + [
    (dict(in_scale=torch.ones(16)), ValueError, "both in_scale and in_shift"),
    (dict(in_scale=torch.ones(15), in_shift=torch.zeros(15)), ValueError, r"\(16,\)"),
    (dict(in_scale=torch.ones(16).double(), in_shift=torch.zeros(16)), TypeError, "float32"),
    (dict(gate=torch.rand(2, 15)), ValueError, "gate must have shape"),
    (dict(gate=torch.rand(2, 16).half()), TypeError, "gate must be float32"),
    (dict(bn=torch.nn.BatchNorm2d(24)), ValueError, r"BN weight must have shape \(16,\)"),
    (dict(bn=cpp.BatchNormArgs(None, None, torch.zeros(16), torch.ones(16), None, 1e-5, None)),
     ValueError, "needs num_batches_tracked"),
    (dict(x=torch.randn(1, 16, 1, 1)), ValueError, "more than 1 value"),
    (dict(x=torch.randn(2, 16, 7, 7, device="meta")), RuntimeError, "is on meta"),
])
def test_conv_bn_train_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        cpp.conv_bn_train(**conv_bn_train_args(**over))


def test_conv_bn_train_bad_input_changes_nothing():
    bn = torch.nn.BatchNorm2d(16)
    state = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError):
        cpp.conv_bn_train(**conv_bn_train_args(bn=bn, gate=torch.rand(2, 15)))
    assert all(torch.equal(a, b) for a, b in zip(state.values(), bn.state_dict().values()))


Y = torch.randn(2, 8, 5, 5)
S = torch.ones(8)


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(8, 5, 5), S, S), ValueError, "4-D"),
    ((Y.double(), S, S), TypeError, "dtype"),
    ((Y, torch.ones(7), S), ValueError, r"scale must have shape \(8,\)"),
    ((Y, S, S.double()), TypeError, "float32"),
    ((Y, S, S.to("meta")), RuntimeError, "is on meta"),
])
def test_se_squeeze_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        cpp.se_squeeze(*args)


@pytest.mark.parametrize("args,err,match", [
    ((Y, S, S, torch.randn(2, 8, 5, 4)), ValueError, "differ in shape"),
    ((Y, S, S, Y.half()), TypeError, "dtype"),
    ((Y, S, S, Y, S), ValueError, "both sc_scale and sc_shift"),
    ((Y, S, S, None, S, S), ValueError, "without a shortcut"),
    ((Y, S, S, Y, torch.ones(9), S), ValueError, r"sc_scale must have shape \(8,\)"),
    ((Y.long(), S, S), TypeError, "dtype"),
    ((Y, S, S, Y.to("meta")), RuntimeError, "is on meta"),
])
def test_bn_add_relu_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        cpp.bn_add_relu(*args)


def test_cpp_checks_behind_the_python_ones():
    """Called directly, the C++ ops check their arguments too (no crash on bad shapes)."""
    ops = cpp._ops()
    x, w = torch.randn(2, 16, 7, 7), torch.randn(16, 8, 3, 3)
    with pytest.raises(RuntimeError, match="gate must be float32"):
        ops.conv_bn_train(x, w, 1, 2, None, None, False, torch.rand(2, 15), None, None, 1e-5,
                          None)
    with pytest.raises(RuntimeError, match="more than 1 value"):
        ops.conv_bn_train(x[:1, :, :1, :1], w, 1, 2, None, None, False, None, None, None, 1e-5,
                          None)
    y, stats = ops.conv_bn_train(x, w, 1, 2, None, None, False, None, None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match="grad must have y's shape"):
        ops.conv_bn_train_backward(y[:, :, :6], x, w, y, stats, 1, 2, None, None, False, None,
                                   False, [True, True])
    with pytest.raises(RuntimeError, match="y must be the conv output"):
        ops.conv_bn_train_backward(y, x, w, y, stats, 2, 2, None, None, False, None, False,
                                   [True, True])
    with pytest.raises(RuntimeError, match="stats must be float32"):
        ops.conv_bn_train_backward(y, x, w, y, stats[:4], 1, 2, None, None, False, None,
                                   False, [True, True])
    with pytest.raises(RuntimeError, match="needs num_batches_tracked"):
        ops.bn_update_running(stats, 98, torch.zeros(16), torch.ones(16), None, None)
    with pytest.raises(RuntimeError, match="running_mean and running_var must have shape"):
        ops.bn_update_running(stats, 98, torch.zeros(15), torch.ones(16), None, 0.1)
    with pytest.raises(RuntimeError, match="grad_sums must be float32"):
        ops.se_squeeze_backward(torch.randn(2, 2, 16), y, stats[2], stats[3])
    with pytest.raises(RuntimeError, match="shortcut must have y's shape"):
        ops.bn_add_relu(y, stats[2], stats[3], y[:1], None, None)
    with pytest.raises(RuntimeError, match="grad must have out's shape"):
        ops.bn_add_relu_backward(y.half(), y)
