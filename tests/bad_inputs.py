"""Bad-input cases shared by every backend's tests: the argument checks are the same
Python functions whichever backend runs the op, and each backend must reject these."""
import torch

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


def _on(device, args):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


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

