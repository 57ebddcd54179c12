"""The fused ops of the C++ extension (`torch.ops.regnet_kernels.*`): its CPU kernels
and its CUDA kernels (csrc/cuda; the dispatcher picks by device).

Same Python signatures, argument checks and results as the Triton functions in
`regnet_kernels.ops` (float32, bfloat16, float16; any input layout, channels_last
output). The extension is built on the first call (see `_extension.py`; the CUDA
kernels on the first call with CUDA tensors); importing this module builds nothing.

Eval (BN folded): conv_bn_act, se_excite, conv1x1_gate_residual.
Training (BN from batch statistics, differentiable, deterministic):
conv_bn_train, se_squeeze, se_excite, bn_add_relu; with these,
`regnet_kernels.models.fused.block_forward_train(x, block, block_ops=cpp)` trains
a block on the CPU or a CUDA device. Their autograd follows the Triton ops' lazy BN output
convention (see `regnet_kernels.ops.conv_bn_train`): the raw conv output y
stands for v = y * scale + shift, and its gradient is dL/dv.

One difference: the SE squeeze sums (of `conv_bn_act(..., squeeze=True)` and of
`se_squeeze`) have one row tile per image, shape (N, 1, C).

The fake implementations below (and se_excite's autograd formula) are registered once
the library is loaded; the C++ library names this module (`set_python_module`), so
torch imports it when it needs them. The other training ops' autograd is in C++
(csrc/autograd.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from .checks import (check_bn_add_relu_args, check_conv_bn_act_args, check_conv_bn_train_args,
                     check_gate_residual_args, check_se_excite_args, check_se_squeeze_args)
from .se_autograd import se_excite_backward, se_excite_setup_context
from .sync_batchnorm import ConvBnPrimitives, sync_conv_bn_train
from .types import STAT_ROWS, BatchNormArgs, TrainOutput, conv_output_size, new_activation


def _ops():
    """torch.ops.regnet_kernels, building and loading the extension on first use."""
    if not _registered:
        _extension.load()
        _register()
    return torch.ops.regnet_kernels


def available() -> tuple[bool, str]:
    """(True, "") when the C++ CPU backend can run (builds and loads it if needed, with its
    fakes and autograd formulas: call it before torch.compile traces the ops, since the
    build cannot be traced), else (False, reason)."""
    ok, reason = _extension.available()
    if ok:
        _register()
    return ok, reason


# ---------------------------------------------------------------------------
# Fake implementations (shapes only, for torch.compile and opcheck) and autograd
# ---------------------------------------------------------------------------


def _conv_out(x, weight, stride):
    k = weight.shape[-1]
    ho, wo = conv_output_size(x.shape[2], k, stride), conv_output_size(x.shape[3], k, stride)
    return new_activation(x.shape[0], weight.shape[0], ho, wo, x)


_registered = False


def _register() -> None:
    """Registers the fakes and the autograd formulas; the ops must exist (the library loaded)."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("regnet_kernels::conv_bn_act")
    def _(x, weight, scale, shift, stride, groups, relu):
        return _conv_out(x, weight, stride)

    @torch.library.register_fake("regnet_kernels::conv_bn_act_squeeze")
    def _(x, weight, scale, shift, stride, groups, relu):
        return (_conv_out(x, weight, stride),
                x.new_empty((x.shape[0], 1, weight.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("regnet_kernels::se_excite")
    def _(sums, hw, w1, b1, w2, b2):
        return sums.new_empty((sums.shape[0], sums.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::conv1x1_gate_residual")
    def _(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift,
          proj_stride):
        return new_activation(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], x)

    @torch.library.register_fake("regnet_kernels::conv_bn_train")
    def _(x, weight, stride, groups, in_scale, in_shift, in_relu, gate, bn_weight, bn_bias, eps,
          frozen_stats):
        return (_conv_out(x, weight, stride),
                x.new_empty((len(STAT_ROWS), weight.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("regnet_kernels::conv_bn_train_backward")
    def _(grad, x, weight, y, stats, stride, groups, in_scale, in_shift, in_relu, gate, frozen,
          output_mask, bn_grads=None):
        need_x, need_w = output_mask
        none = stats.new_empty((0,))
        return (new_activation(*x.shape, x) if need_x else x.new_empty((0,)),
                weight.new_empty(weight.shape) if need_w else weight.new_empty((0,)),
                stats.new_empty(gate.shape) if need_x and gate is not None else none,
                stats.new_empty((weight.shape[0],)), stats.new_empty((weight.shape[0],)))

    @torch.library.register_fake("regnet_kernels::bn_update_running")
    def _(stats, count, running_mean, running_var, num_batches_tracked, momentum):
        return None

    @torch.library.register_fake("regnet_kernels::se_squeeze")
    def _(y, scale, shift):
        return y.new_empty((y.shape[0], 1, y.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::se_squeeze_backward")
    def _(grad_sums, y, scale, shift):
        return new_activation(*y.shape, y)

    @torch.library.register_fake("regnet_kernels::bn_add_relu")
    def _(y, scale, shift, shortcut, sc_scale, sc_shift):
        return new_activation(*y.shape, y)

    @torch.library.register_fake("regnet_kernels::bn_add_relu_backward")
    def _(grad, out):
        return new_activation(*out.shape, out)

    # The SE MLP's backward is shared with the Triton op (ops/se_autograd.py); the other
    # training ops have their autograd in C++ (csrc/autograd.cpp).
    torch.library.register_autograd("regnet_kernels::se_excite", se_excite_backward,
                                    setup_context=se_excite_setup_context)
    _registered = True


# The library loaded by other means (torch imports this module for the fakes, see
# set_python_module in csrc/ops.cpp): register them now.
if hasattr(torch.ops.regnet_kernels, "conv_bn_act"):
    _register()


# ---------------------------------------------------------------------------
# The functions: the Triton functions' checks, with the extension's device checks
# ---------------------------------------------------------------------------


def _check_device(name: str, t: torch.Tensor) -> None:
    """CPU kernels, or the CUDA kernels (built and loaded on first use)."""
    if t.device.type == "cuda":
        ok, reason = _extension.available(cuda=True)
        if not ok:
            raise RuntimeError(f"{name} is on {t.device}, and the C++ extension's CUDA kernels "
                               f"cannot run: {reason}")
    elif t.device.type not in ("cpu", "meta"):
        raise RuntimeError(f"{name} is on {t.device}: the C++ extension runs CPU and CUDA tensors")


# The C++ kernels' activation dtypes (no float64 kernels), and the argument checks every
# op here passes to `ops.checks`.
CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_CHECKS = dict(device_check=_check_device, dtypes=CPP_DTYPES)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, stride: int = 1, groups: int = 1, relu: bool = True, squeeze: bool = False):
    """Fused conv (k x k, padding k // 2) + folded BN + optional ReLU (CPU or CUDA).

    As `regnet_kernels.ops.conv_bn_act`; with squeeze=True the sums are (N, 1, C_out).
    """
    check_conv_bn_act_args(x, weight, scale, shift, stride, groups, **CPP_CHECKS)
    ops = _ops()
    if squeeze:
        return ops.conv_bn_act_squeeze(x, weight, scale, shift, stride, groups, relu)
    return ops.conv_bn_act(x, weight, scale, shift, stride, groups, relu)


def se_excite(sums: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """gate = sigmoid(W2 relu(W1 mean + b1) + b2) from SE squeeze sums (CPU or CUDA).

    As `regnet_kernels.ops.se_excite`: sums (N, C) or (N, T, C) float32; returns (N, C) float32.
    Differentiable in sums and the SE weights (the Triton op's backward formula).
    """
    sums = check_se_excite_args(sums, hw, w1, b1, w2, b2, **CPP_CHECKS)
    return _ops().se_excite(sums.contiguous(), int(hw), w1, b1, w2, b2)


def conv1x1_gate_residual(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    shortcut: torch.Tensor, *, gate: Optional[torch.Tensor] = None,
    proj_weight: Optional[torch.Tensor] = None, proj_scale: Optional[torch.Tensor] = None,
    proj_shift: Optional[torch.Tensor] = None, proj_stride: int = 1,
) -> torch.Tensor:
    """relu(conv1x1(x * gate) * scale + shift + shortcut branch) (CPU or CUDA).

    As `regnet_kernels.ops.conv1x1_gate_residual` (identity or projection shortcut).
    """
    check_gate_residual_args(x, weight, scale, shift, shortcut, gate, proj_weight, proj_scale,
                             proj_shift, proj_stride, **CPP_CHECKS)
    return _ops().conv1x1_gate_residual(x, weight, scale, shift, gate, shortcut, proj_weight,
                                        proj_scale, proj_shift,
                                        proj_stride if proj_weight is not None else 1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def conv_bn_train(x: torch.Tensor, weight: torch.Tensor, bn: BatchNormArgs | torch.nn.BatchNorm2d,
                  *, stride: int = 1, groups: int = 1, in_scale: Optional[torch.Tensor] = None,
                  in_shift: Optional[torch.Tensor] = None, in_relu: bool = False,
                  gate: Optional[torch.Tensor] = None, frozen: bool = False,
                  sync_group=None) -> TrainOutput:
    """Training-mode conv + BN with batch statistics, differentiable (CPU or CUDA).

    As `regnet_kernels.ops.conv_bn_train`: the conv reads relu?(x * in_scale + in_shift)
    * gate, y is the raw conv output (channels_last) standing for the BN output in
    autograd, the BN's running statistics are updated in place as nn.BatchNorm2d does,
    and gradients flow to x (dL/dv_prev when in_scale is given), weight, gate and the
    BN's weight and bias. frozen: BN as in eval mode (running statistics, not updated).
    sync_group: a process group whose ranks' statistics are merged (SyncBatchNorm).
    """
    args, c_out, count = check_conv_bn_train_args(x, weight, bn, stride, groups, in_scale, in_shift,
                                                 gate, frozen, **CPP_CHECKS)
    ops = _ops()

    def update_running(stats, count):
        if args.running_mean is not None:
            ops.bn_update_running(stats.detach(), count, args.running_mean, args.running_var,
                                  args.num_batches_tracked, args.momentum)

    if sync_group is not None and not frozen:
        prims = ConvBnPrimitives(ops.conv_bn_train, ops.conv_bn_train_backward, update_running)
        y, stats = sync_conv_bn_train(prims, sync_group, x, weight, stride, groups, in_scale,
                                      in_shift, in_relu, gate, args.weight, args.bias, args.eps)
        return TrainOutput(y, *stats.unbind(0))
    y, stats = ops.conv_bn_train(x, weight, stride, groups, in_scale, in_shift, in_relu, gate,
                                 args.weight, args.bias, args.eps,
                                 args.frozen_stats(c_out, x) if frozen else None)
    if not frozen:
        update_running(stats, count)
    return TrainOutput(y, *stats.unbind(0))


def se_squeeze(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-image channel sums of relu(y * scale + shift), fp32 (N, 1, C) (CPU or CUDA).

    As `regnet_kernels.ops.se_squeeze` (one row tile per image): y is a lazy BN output,
    its gradient is dL/dv, v = y * scale + shift.
    """
    check_se_squeeze_args(y, scale, shift, **CPP_CHECKS)
    return _ops().se_squeeze(y, scale, shift)


def bn_add_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                shortcut: Optional[torch.Tensor] = None, sc_scale: Optional[torch.Tensor] = None,
                sc_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(y * scale + shift + shortcut'), shortcut' = shortcut or its BN affine (CPU or CUDA).

    As `regnet_kernels.ops.bn_add_relu`: y and a projection shortcut are lazy BN outputs.
    """
    check_bn_add_relu_args(y, scale, shift, shortcut, sc_scale, sc_shift, **CPP_CHECKS)
    return _ops().bn_add_relu(y, scale, shift, shortcut, sc_scale, sc_shift)


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "conv_bn_train", "se_squeeze",
           "bn_add_relu", "TrainOutput", "BatchNormArgs", "available"]
