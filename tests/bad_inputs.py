"""Bad-input cases shared by every backend's tests: the argument checks are the same
Python functions whichever backend runs the op, and each backend must reject these (the
op files run each table per backend). Every bad-input assertion of the tests goes through
expect_rejected, so a check of the messages' common form belongs there."""
import copy

import pytest
import torch

from regnet_kernels.ops import BatchNormArgs

CONV_BN_ACT_CASES = [
    (dict(x=torch.randn(16, 7, 7)), ValueError, "4-D"),
    (dict(x=torch.randn(2, 24, 7, 7)), ValueError, "input channels"),
    (dict(groups=3), ValueError, "does not divide"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float16)), TypeError, "dtype"),
    (dict(x=torch.randn(2, 16, 7, 7).long()), TypeError, "dtype"),
    (dict(x=torch.randn(2, 16, 7, 7).double()), TypeError, "dtype"),
    (dict(weight=torch.randn(16, 8, 2, 2)), ValueError, "odd"),
    (dict(scale=torch.ones(15)), ValueError, r"scale must have shape \(16,\)"),
    (dict(shift=torch.zeros(16, dtype=torch.float64)), TypeError, "float32"),
    (dict(stride=0), ValueError, "stride"),
]

PROJ = dict(shortcut=torch.randn(2, 8, 13, 13), proj_weight=torch.randn(24, 8, 1, 1),
             proj_scale=torch.ones(24), proj_shift=torch.zeros(24), proj_stride=2)

GATE_RESIDUAL_CASES = [
    (dict(weight=torch.randn(24, 16, 3, 3)), ValueError, "1x1"),
    (dict(shortcut=torch.randn(2, 16, 7, 7)), ValueError, "identity shortcut"),
    (dict(shortcut=torch.randn(2, 24, 5, 4)), ValueError, "identity shortcut"),
    (dict(gate=torch.rand(2, 15)), ValueError, "gate must have shape"),
    (dict(gate=torch.rand(2, 16).half()), TypeError, "gate must be float32"),
    (dict(shortcut=torch.randn(2, 24, 7, 7).half()), TypeError, "dtype"),
    (dict(proj_scale=torch.ones(24)), ValueError, "without proj_weight"),
    (dict(PROJ, proj_stride=1), ValueError, "stride-1 projection"),
    (dict(PROJ, proj_weight=torch.randn(24, 9, 1, 1)), ValueError, "input channels"),
    (dict(PROJ, proj_weight=torch.randn(16, 8, 1, 1)), ValueError, "proj_weight must have shape"),
    (dict(PROJ, proj_scale=None), ValueError, "proj_scale"),
    (dict(PROJ, proj_shift=None), ValueError, "needs proj_scale"),
]

# se_excite: sums (2, 16), C = 16 channels, S = 4 (se_excite_args)
SE_EXCITE_CASES = [
    (dict(sums=torch.randn(2, 16).double()), TypeError, "float32"),
    (dict(sums=torch.randn(16)), ValueError, "sums must be"),
    (dict(w1=torch.randn(4, 15)), ValueError, "w1 must have shape"),
    (dict(w1=torch.randn(3, 16)), ValueError, "b1 must have shape"),
    (dict(w2=torch.randn(16, 3)), ValueError, "w2 must have shape"),
    (dict(b2=torch.randn(15)), ValueError, "b2 must have shape"),
    (dict(b2=torch.randn(16).long()), TypeError, "dtype"),
    (dict(hw=0), ValueError, "hw"),
]

# se_squeeze: y (2, 8, 5, 5), scale, shift (se_squeeze_args)
SE_SQUEEZE_CASES = [
    (dict(y=torch.randn(8, 5, 5)), ValueError, "4-D"),
    (dict(scale=torch.ones(7)), ValueError, r"scale must have shape \(8,\)"),
    (dict(shift=torch.ones(8).double()), TypeError, "float32"),
    (dict(shift=torch.ones(8, device="meta")), RuntimeError, "is on meta"),
]
# The C++ backends only: they have no float64 (Triton runs a float64 y, with float64 vectors)
SE_SQUEEZE_CPP_CASES = [(dict(y=torch.randn(2, 8, 5, 5).double()), TypeError, "dtype")]

# bn_add_relu: y (2, 8, 5, 5), scale, shift and the shortcut arguments (bn_add_relu_args)
_Y, _S = torch.randn(2, 8, 5, 5), torch.ones(8)
BN_ADD_RELU_CASES = [
    (dict(shortcut=torch.randn(2, 8, 5, 4)), ValueError, "differ in shape"),
    (dict(shortcut=_Y.half()), TypeError, "dtype"),
    (dict(shortcut=_Y, sc_scale=_S), ValueError, "both sc_scale and sc_shift"),
    (dict(sc_scale=_S, sc_shift=_S), ValueError, "without a shortcut"),
    (dict(shortcut=_Y, sc_scale=torch.ones(9), sc_shift=_S), ValueError,
     r"sc_scale must have shape \(8,\)"),
    (dict(y=_Y.long()), TypeError, "dtype"),
    (dict(shortcut=_Y.to("meta")), RuntimeError, "is on meta"),
]

# conv_bn_train: the conv cases that concern its arguments (it has no scale / shift), and
# its own (conv_bn_train_args: 2 groups of 8 channels, 3x3, BatchNorm2d(16))
CONV_BN_TRAIN_CASES = [
    pytest.param(over, err, match, id=f"conv-{i}")
    for i, (over, err, match) in enumerate(CONV_BN_ACT_CASES)
    if set(over) <= {"x", "weight", "groups", "stride"}
] + [
    (dict(in_scale=torch.ones(16)), ValueError, "both in_scale and in_shift"),
    (dict(in_scale=torch.ones(15), in_shift=torch.zeros(15)), ValueError, r"\(16,\)"),
    (dict(in_scale=torch.ones(16).double(), in_shift=torch.zeros(16)), TypeError, "float32"),
    (dict(gate=torch.rand(2, 15)), ValueError, "gate must have shape"),
    (dict(gate=torch.rand(2, 16).half()), TypeError, "gate must be float32"),
    (dict(bn=torch.nn.BatchNorm2d(24)), ValueError, r"BN weight must have shape \(16,\)"),
    (dict(bn=BatchNormArgs(None, None, torch.zeros(16), torch.ones(16), None, 1e-5, None)),
     ValueError, "needs num_batches_tracked"),
    (dict(x=torch.randn(1, 16, 1, 1)), ValueError, "more than 1 value"),
    # the weight, not x: the C++ backend is named by x's device (cpu / cuda)
    (dict(weight=torch.randn(16, 8, 3, 3, device="meta")), RuntimeError, "is on meta"),
]


def _to(device, v):
    """v on device: tensors (but a meta one), BN modules, BatchNormArgs' tensors."""
    if isinstance(v, torch.Tensor):
        return v if v.is_meta else v.to(device)
    if isinstance(v, torch.nn.Module):  # the tables' modules are shared: a copy elsewhere
        state = next(iter(v.state_dict().values()), None)
        on_device = state is None or state.device.type == torch.device(device).type
        return v if on_device else copy.deepcopy(v).to(device)
    if isinstance(v, BatchNormArgs):
        return BatchNormArgs(*(_to(device, f) for f in v))
    return v


def _on(device, args):
    return {k: _to(device, v) for k, v in args.items()}


def conv_bn_act_args(device, **over):
    """Valid conv_bn_act arguments (2 groups of 8 channels, 3x3), with `over` replacing some."""
    args = dict(x=torch.randn(2, 16, 7, 7), weight=torch.randn(16, 8, 3, 3),
                scale=torch.ones(16), shift=torch.zeros(16), groups=2)
    return _on(device, {**args, **over})


def gate_residual_args(device, **over):
    """Valid conv1x1_gate_residual arguments (16 -> 24 channels, identity shortcut)."""
    args = dict(x=torch.randn(2, 16, 7, 7), weight=torch.randn(24, 16, 1, 1),
                scale=torch.ones(24), shift=torch.zeros(24), shortcut=torch.randn(2, 24, 7, 7))
    return _on(device, {**args, **over})


def se_excite_args(device, **over):
    """Valid se_excite arguments (C = 16, S = 4, one tile), with `over` replacing some."""
    args = dict(sums=torch.randn(2, 16), hw=9, w1=torch.randn(4, 16), b1=torch.randn(4),
                w2=torch.randn(16, 4), b2=torch.randn(16))
    return _on(device, {**args, **over})


def se_squeeze_args(device, **over):
    """Valid se_squeeze arguments (8 channels), with `over` replacing some (a meta tensor
    stays on meta)."""
    args = dict(y=torch.randn(2, 8, 5, 5), scale=torch.ones(8), shift=torch.ones(8))
    return _on(device, {**args, **over})


def bn_add_relu_args(device, **over):
    """Valid bn_add_relu arguments (8 channels, no shortcut), with `over` replacing some."""
    args = dict(y=_Y, scale=_S, shift=_S)
    return _on(device, {**args, **over})


def conv_bn_train_args(device, **over):
    """Valid conv_bn_train arguments (2 groups of 8 channels, 3x3), `over` replacing some."""
    args = dict(x=torch.randn(2, 16, 7, 7), weight=torch.randn(16, 8, 3, 3),
                bn=torch.nn.BatchNorm2d(16), groups=2)
    return _on(device, {**args, **over})


def expect_rejected(op: str, backend: str, call, err, match: str):
    """Every bad-input assertion of the tests goes through here: `call()` (the op `op` of
    the backend `backend`) raises `err` with a message that `match` finds (re.search) and
    that starts with the one prefix every layer writes, `regnet_kernels.<op> (<backend>): `."""
    with pytest.raises(err, match=match) as raised:
        call()
    prefix = f"regnet_kernels.{op} ({backend}): "
    assert str(raised.value).startswith(prefix), f"{str(raised.value)!r} lacks {prefix!r}"
