"""torch.autograd.gradcheck of the differentiable Triton ops' backward, in float64.

For float64 inputs every kernel computes in float64 end to end (accumulators, BN
statistics, scale/shift, SE sums and gate, gradients), so finite differences of the
fused forward must match the fused backward closely: to 1e-6 relative here, 1000x
tighter than gradcheck's defaults.
The differentiable ops are conv_bn_train, se_squeeze, se_excite and bn_add_relu;
the other ops (conv_dgrad, conv_wgrad, bn_act_backward, bn_finalize, conv_bn_stats,
conv_bn_act, conv1x1_gate_residual) have no autograd formula of their own.

Lazy BN outputs (see regnet_kernels.ops.conv_bn_train): the y of a TrainOutput
stands for v = y * scale + shift in autograd, and scale/shift are not
differentiable, so a function of a TrainOutput's y alone is not a true function of
its inputs. Each function checked here starts from real tensors (the input, conv
weights, BN gamma/beta, SE gate and weights) and ends in an ordinary tensor:
bn_add_relu's output (relu(BN(conv(x))) without a shortcut), or the SE squeeze sums.
An input prologue (in_scale/in_shift from the previous conv_bn_train) is checked
through that previous layer, which makes the chain a true function again.

The BNs keep no running statistics (or float64 ones that only the forward
updates), so gradcheck's repeated calls see the same function. Inputs are random;
a ReLU kink is hit only if a pre-activation lies within ~1e-6 of 0, which these
seeds avoid.

fast_mode: under the Triton interpreter a full Jacobian (one backward per output
element, two forwards per input element) takes minutes per case. Fast mode checks
v^T J u for random u and v, which a wrong gradient of any element fails as well; the
inputs go in as one flat tensor (two forwards in all rather than two per input).
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from blocks import make_block
from numerics import DEVICE, activation, conv_weight, randomize_bn
from regnet_kernels import ops
from regnet_kernels.models.fused import block_forward_train
from regnet_kernels.models.reference import ResBottleneckBlock
from regnet_kernels.ops import BatchNormArgs
from regnet_kernels.backends.triton.se_excite import _squeeze_tiles

F64 = torch.float64


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


class Inputs:
    """Random float64 leaves from one seeded generator."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def x(self, n, c, h, w):
        return leaf(activation(n, c, h, w, F64, self.gen))

    def weight(self, c_out, cin_g, k):
        return leaf(conv_weight(c_out, cin_g, k, F64, self.gen))

    def bn(self, c):
        """gamma in [0.5, 1.5], beta ~ N(0, 0.3)."""
        gamma = torch.rand(c, generator=self.gen, dtype=F64) + 0.5
        beta = torch.randn(c, generator=self.gen, dtype=F64) * 0.3
        return leaf(gamma.to(DEVICE)), leaf(beta.to(DEVICE))

    def gate(self, n, c):
        """An SE gate in (0.1, 0.9)."""
        return leaf((torch.rand(n, c, generator=self.gen, dtype=F64) * 0.8 + 0.1).to(DEVICE))


def train_bn(gamma, beta) -> BatchNormArgs:
    """A training BN without running statistics: the calls change nothing."""
    return BatchNormArgs(gamma, beta, None, None, None, 1e-5, 0.1)


def gradcheck(fn, inputs, fast_mode=True):
    """gradcheck with tolerances 1000x tighter than its defaults (atol 1e-5, rtol 1e-3):
    in float64 throughout, central differences (eps 1e-6) are good to ~1e-9, and a
    gradient off by 1e-4 relative must fail.

    In fast mode the inputs go in as one flat tensor, as in test_block: fast mode takes two
    forwards per input tensor, so 8 inputs cost 16 forwards under the Triton interpreter
    where one flat tensor costs 2; a wrong gradient of any element of any input still moves
    v^T J u for the random u over all of them (test_flat_gradcheck_catches_one_wrong_input
    checks that it fails for a 1e-4 error in an 8-element input beside 200 others)."""
    if not (fast_mode and len(inputs) > 1):
        assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)
        return
    layouts = [(t.shape, t.dim() == 4 and not t.is_contiguous()
                and t.is_contiguous(memory_format=torch.channels_last)) for t in inputs]

    def flat_fn(flat):
        views = flat.split([t.numel() for t in inputs])
        return fn(*(v.view(shape).contiguous(memory_format=torch.channels_last) if nhwc
                    else v.view(shape) for v, (shape, nhwc) in zip(views, layouts)))

    flat = leaf(torch.cat([t.detach().flatten() for t in inputs]))
    assert torch.autograd.gradcheck(flat_fn, (flat,), atol=1e-8, rtol=1e-6, fast_mode=True)


class _GradientOffBy1e4(torch.autograd.Function):
    """The identity, whose backward is 1e-4 too large: a wrong gradient to be caught."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 1e-4)


def test_flat_gradcheck_catches_one_wrong_input():
    """The flattened fast-mode gradcheck fails when only the 8-element input's gradient is
    wrong, by 1e-4 relative, beside a 200-element input with a correct one."""
    gen = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(2, 4, 5, 5, generator=gen, dtype=F64).to(
        memory_format=torch.channels_last))
    gamma = leaf(torch.rand(8, generator=gen, dtype=F64) + 0.5)

    def f(x, gamma):
        return x.sin().flatten(1)[:, :8] * gamma.exp()

    gradcheck(f, (x, gamma))
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        gradcheck(lambda x, gamma: f(x, _GradientOffBy1e4.apply(gamma)), (x, gamma))


def bn_relu(out: ops.TrainOutput) -> torch.Tensor:
    """relu(BN(conv)) as an ordinary tensor: bn_add_relu without a shortcut."""
    return ops.bn_add_relu(out.y, out.scale, out.shift)


# ---------------------------------------------------------------------------
# conv_bn_train
# ---------------------------------------------------------------------------

CONV_CASES = {  # c_in, c_out, k, stride, groups, H
    "3x3-dense": (4, 8, 3, 1, 1, 5),
    "3x3-grouped-s2": (8, 8, 3, 2, 2, 5),
    "1x1": (8, 4, 1, 1, 1, 4),
    "1x1-s2": (4, 8, 1, 2, 1, 5),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_train(case):
    """relu(BN(conv(x))): grads of x, the weight, gamma and beta."""
    c_in, c_out, k, stride, groups, h = CONV_CASES[case]
    inp = Inputs(c_in + k)
    x, w = inp.x(2, c_in, h, h), inp.weight(c_out, c_in // groups, k)

    def f(x, w, gamma, beta):
        return bn_relu(ops.conv_bn_train(x, w, train_bn(gamma, beta), stride=stride,
                                         groups=groups))

    gradcheck(f, (x, w, *inp.bn(c_out)))


def test_conv_bn_train_frozen():
    """relu(BN(conv(x))) with a frozen (eval-mode) BN: running statistics as constants."""
    inp = Inputs(5)
    x, w = inp.x(2, 8, 5, 5), inp.weight(8, 4, 3)
    running_mean = torch.randn(8, dtype=torch.float64, device=x.device) * 0.2
    running_var = torch.rand(8, dtype=torch.float64, device=x.device) + 0.5

    def f(x, w, gamma, beta):
        bn = BatchNormArgs(gamma, beta, running_mean, running_var, None, 1e-5, 0.1)
        return bn_relu(ops.conv_bn_train(x, w, bn, groups=2, frozen=True))

    gradcheck(f, (x, w, *inp.bn(8)))


def test_conv_bn_train_gate_only():
    """relu(BN(conv(x * gate))): a gate without an input affine (x is a real tensor)."""
    inp = Inputs(3)
    x, w, gate = inp.x(2, 8, 5, 4), inp.weight(8, 4, 3), inp.gate(2, 8)

    def f(x, w, gamma, beta, gate):
        return bn_relu(ops.conv_bn_train(x, w, train_bn(gamma, beta), groups=2, gate=gate))

    gradcheck(f, (x, w, *inp.bn(8), gate))


PROLOGUE_CASES = {  # k, stride, groups, in_relu, gated
    "conv-b": (3, 1, 2, True, False),       # after conv a's BN + ReLU
    "conv-c": (1, 1, 1, True, True),        # BN + ReLU, then the SE gate
    "affine-gated-s2": (3, 2, 4, False, True),
}


@pytest.mark.parametrize("case", list(PROLOGUE_CASES))
def test_conv_bn_train_prologue(case):
    """Two layers: the second conv reads the first's lazy BN output through its input
    prologue relu?(y * in_scale + in_shift) * gate; every tensor in the chain is an input."""
    k, stride, groups, in_relu, gated = PROLOGUE_CASES[case]
    inp = Inputs(k + 10 * stride + groups)
    x, w_a = inp.x(2, 4, 5, 5), inp.weight(8, 4, 1)
    w_b = inp.weight(8, 8 // groups, k)
    extra = (inp.gate(2, 8),) if gated else ()

    def f(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, gate=None):
        a = ops.conv_bn_train(x, w_a, train_bn(gamma_a, beta_a))
        return bn_relu(ops.conv_bn_train(a.y, w_b, train_bn(gamma_b, beta_b), stride=stride,
                                         groups=groups, in_scale=a.scale, in_shift=a.shift,
                                         in_relu=in_relu, gate=gate))

    gradcheck(f, (x, w_a, *inp.bn(8), w_b, *inp.bn(8), *extra))


# ---------------------------------------------------------------------------
# SE: se_squeeze, se_excite
# ---------------------------------------------------------------------------


def squeeze_tiles_per_image(hw: int) -> int:
    """Row tiles per image of the SE squeeze (8 channels)."""
    return -(-hw // _squeeze_tiles(hw, 8)[0])


@pytest.mark.parametrize("h", [4, 12])
def test_se_squeeze(h):
    """Per-tile SE squeeze sums of relu(BN(conv(x))); 12 x 12 = 144 pixels make two
    row tiles per image, so each tile's gradient must reach its own pixels."""
    assert squeeze_tiles_per_image(h * h) == (1 if h == 4 else 2)
    inp = Inputs(h)
    x, w = inp.x(2, 4, h, h), inp.weight(8, 4, 1)

    def f(x, w, gamma, beta):
        out = ops.conv_bn_train(x, w, train_bn(gamma, beta))
        return ops.se_squeeze(out.y, out.scale, out.shift)

    gradcheck(f, (x, w, *inp.bn(8)))


def test_se_excite():
    """gate = sigmoid(W2 relu(W1 mean + b1) + b2) from (N, T, C) partial sums and 1x1
    conv weights. Cheap enough for the full Jacobian."""
    gen = torch.Generator().manual_seed(0)
    n, t, c, s, hw = 2, 2, 8, 3, 9
    sums = torch.randn(n, t, c, generator=gen, dtype=F64) * hw
    w1 = torch.randn(s, c, 1, 1, generator=gen, dtype=F64) / c ** 0.5
    b1 = torch.randn(s, generator=gen, dtype=F64) * 0.1
    w2 = torch.randn(c, s, 1, 1, generator=gen, dtype=F64) / s ** 0.5
    b2 = torch.randn(c, generator=gen, dtype=F64) * 0.1
    inputs = tuple(leaf(v.to(DEVICE)) for v in (sums, w1, b1, w2, b2))
    gradcheck(lambda sums, *p: ops.se_excite(sums, hw, *p), inputs, fast_mode=False)


# ---------------------------------------------------------------------------
# bn_add_relu
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["identity", "projection", "none"])
def test_bn_add_relu(shortcut):
    """relu(BN(conv(x)) + shortcut'): the identity shortcut is a real tensor, the
    projection a second conv_bn_train of x (a lazy BN output, like y)."""
    inp = Inputs(len(shortcut))
    x, w = inp.x(2, 4, 5, 5), inp.weight(8, 4, 3)
    extra = ()
    if shortcut == "identity":
        extra = (inp.x(2, 8, 3, 3),)
    elif shortcut == "projection":
        extra = (inp.weight(8, 4, 1), *inp.bn(8))

    def f(x, w, gamma, beta, *sc):
        c = ops.conv_bn_train(x, w, train_bn(gamma, beta), stride=2)
        if shortcut == "identity":
            return ops.bn_add_relu(c.y, c.scale, c.shift, sc[0])
        if shortcut == "projection":
            p = ops.conv_bn_train(x, sc[0], train_bn(*sc[1:]), stride=2)
            return ops.bn_add_relu(c.y, c.scale, c.shift, p.y, p.scale, p.shift)
        return ops.bn_add_relu(c.y, c.scale, c.shift)

    gradcheck(f, (x, w, *inp.bn(8), *extra))


# ---------------------------------------------------------------------------
# Whole training blocks
# ---------------------------------------------------------------------------


class _TrainBlock(nn.Module):
    """block_forward_train as a module, for functional_call."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return block_forward_train(x, self.block)


def tiny_block(w_in, w_out, stride, group_width, se_width):
    """A small X/Y block (5 x 5 input) with random BN parameters and statistics."""
    torch.manual_seed(0)
    block = ResBottleneckBlock(w_in, w_out, stride, group_width, 1.0, se_width)
    randomize_bn(block, torch.Generator().manual_seed(0))
    return block.to(DEVICE, F64), 5


@pytest.mark.parametrize("make", [
    pytest.param(lambda: tiny_block(4, 8, 2, 4, 2), id="tiny-Y-proj-s2"),
    pytest.param(lambda: tiny_block(8, 8, 1, 4, 0), id="tiny-X-identity"),
    pytest.param(lambda: make_block("X-proj-s2", F64), id="X-proj-s2", marks=pytest.mark.slow),
    pytest.param(lambda: make_block("Y-proj-s2", F64), id="Y-proj-s2", marks=pytest.mark.slow),
])
def test_block(make):
    """block_forward_train of a float64 block: grads of the input and of every
    parameter. The BN running statistics (float64) are updated by each call; the
    training-mode output does not read them.

    The parameters go in as one flat tensor: fast mode then takes 2 forwards for all
    of them rather than 2 per parameter (a block has up to 17). The op tests above
    check each input on its own; here a wrong gradient of any parameter still moves
    v^T J u for the random u over all of them."""
    block, h = make()
    model = _TrainBlock(block.train())
    names, params = zip(*model.named_parameters())
    sizes = [p.numel() for p in params]
    x = leaf(activation(2, block.w_in, h, h, F64, torch.Generator().manual_seed(1)))

    def f(x, flat):
        views = (v.view(p.shape) for v, p in zip(flat.split(sizes), params))
        return functional_call(model, dict(zip(names, views)), (x,))

    gradcheck(f, (x, leaf(torch.cat([p.flatten() for p in params]))))
