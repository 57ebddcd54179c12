"""Training-mode conv + BatchNorm as one differentiable op.

Forward (3 launches): the conv kernel reads its input through the previous
layer's BN + ReLU and the SE gate (the prologue) and writes the raw output y
with per-tile BN partials; the finalize kernel turns them into the batch mean,
inv_std and the folded scale/shift; a third updates the running statistics (its
own op: autograd formulas need functional ops). No normalized tensor is written.

Lazy BN outputs. The BN output v = y * scale + shift exists only as (y, scale,
shift): the ops that read it apply the affine as they load. In autograd the
tensor y stands for v: its gradient is dL/dv, and (scale, shift) are
non-differentiable decoding parameters. So a consumer's backward hands over dv
exactly as it computed it, and this op's backward applies BN's backward in one
step (rounding once, as cuDNN does), with M = N*Ho*Wo and xh = (y - mean) * inv_std:
    dbeta = sum dv,  dgamma = sum dv * xh                  (one reduction pass)
    dy = scale * dv - scale / M * dbeta - scale * inv_std / M * dgamma * (y - mean)
       = A[c] * dv + B[c] * y + C[c]          applied as the gradient kernels load dv
Only y and the per-channel statistics are saved; the conv input is recomputed
from the previous layer's raw output in the weight-gradient kernel's prologue.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from ...ops.checks import check_conv_bn_train_args, op_errors
from ...ops.sync_batchnorm import ConvBnPrimitives, sync_conv_bn_train
from ...ops.types import STAT_ROWS, BatchNormArgs, TrainOutput, acc_dtype
from .bn_act_backward import bn_act_backward
from .bn_finalize import finalize_launch, update_running_stats
from .conv_bn_act import _fake as _conv_fake, _geometry as _conv_geometry, _launch as _conv_launch
from .conv_grad import DyPrologue, UPrologue, conv_dgrad, conv_wgrad
from .igemm import TRITON_CHECKS


@torch.library.custom_op("regnet_triton::conv_bn_train", mutates_args=())
def _conv_bn_train_op(
    x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int,
    in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor], in_relu: bool,
    gate: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], eps: float, frozen_stats: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    if frozen_stats is not None:  # eval-mode BN: the running statistics, given; raw y only
        y, _ = _conv_launch(x, weight, stride, groups, in_scale=in_scale, in_shift=in_shift,
                            in_relu=in_relu, gate=gate)
        return y, frozen_stats.clone()
    y, partials = _conv_launch(x, weight, stride, groups, stats=True, in_scale=in_scale,
                                in_shift=in_shift, in_relu=in_relu, gate=gate)
    rows_per_tile = _conv_geometry(x, weight, stride, groups, False)[2][0]
    count = y.shape[0] * y.shape[2] * y.shape[3]
    stats = finalize_launch(partials[0], partials[1], count, rows_per_tile, bn_weight, bn_bias,
                            eps)
    return y, stats


@_conv_bn_train_op.register_fake
def _(x, weight, stride, groups, in_scale, in_shift, in_relu, gate, bn_weight, bn_bias, eps,
      frozen_stats):
    y, _ = _conv_fake(x, weight, stride, groups)
    return y, x.new_empty((len(STAT_ROWS), weight.shape[0]), dtype=acc_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, stride, groups, in_scale, in_shift, in_relu, gate, bn_weight, *_ = inputs
    y, stats = output
    ctx.mark_non_differentiable(stats)  # decoding parameters of the lazy BN output y
    ctx.save_for_backward(x, weight, in_scale, in_shift, gate, bn_weight, y, stats)
    ctx.conv = (stride, groups, in_relu)
    ctx.frozen = inputs[-1] is not None


def _backward(ctx, grad_v, _grad_stats):
    x, weight, in_scale, in_shift, gate, bn_weight, y, stats = ctx.saved_tensors
    stride, groups, in_relu = ctx.conv
    need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[7]
    grad_x, grad_w, grad_gate, d_gamma, d_beta = conv_bn_train_backward(
        grad_v, x, weight, y, stats, stride, groups, in_scale, in_shift, in_relu, gate,
        ctx.frozen, (need_x, ctx.needs_input_grad[1]))
    grad_gamma = grad_beta = None
    if bn_weight is not None:
        grad_gamma, grad_beta = d_gamma.to(bn_weight.dtype), d_beta.to(bn_weight.dtype)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_w, None, None, None, None, None,
            grad_gate, grad_gamma, grad_beta, None, None)


def conv_bn_train_backward(grad_v, x, weight, y, stats, stride, groups, in_scale, in_shift,
                           in_relu, gate, frozen, output_mask, bn_grads=None):
    """The op's backward from grad_v = dL/dv, as the C++ op `conv_bn_train_backward`:
    (grad_x, grad_weight, grad_gate, grad_gamma, grad_beta), None where output_mask =
    (x and gate, weight) says not needed. bn_grads: (2, C) rows (d_beta, d_gamma) used
    for BN's backward instead of this batch's (SyncBatchNorm: every rank's, scaled to this
    batch's row count); grad_gamma / grad_beta are then those rows."""
    mean, inv_std, scale, _, _ = stats.unbind(0)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if bn_grads is None:
        sums = bn_act_backward(grad_v, y, relu=False, write_dv=False, reduce=True)
        d_beta = sums.sum_dv
        d_gamma = inv_std * (sums.sum_dv_y - mean * sums.sum_dv)
    else:
        d_beta, d_gamma = bn_grads.unbind(0)
    if not any(output_mask):
        return None, None, None, d_gamma, d_beta
    if frozen:  # constant statistics: dy = scale * dv
        dy = DyPrologue(y, scale, torch.zeros_like(scale), torch.zeros_like(scale))
    else:
        b = -scale * inv_std / count * d_gamma
        dy = DyPrologue(y, scale, b, -scale / count * d_beta - b * mean)

    grad_x = grad_w = grad_gate = None
    if output_mask[0]:
        du = conv_dgrad(grad_v, weight, x.shape[2:], stride, groups, dy_prologue=dy)
        if in_scale is None and gate is None:
            grad_x = du
        else:  # x is the previous lazy BN output: hand back dL/dv_prev
            pro = bn_act_backward(du, x, in_scale, in_shift, relu=in_relu, gate=gate)
            grad_x, grad_gate = pro.dv, pro.dgate
    if output_mask[1]:
        identity = dict(dtype=stats.dtype, device=x.device)  # for a gate without an affine
        u_prologue = None if in_scale is None and gate is None else UPrologue(
            in_scale if in_scale is not None else torch.ones(x.shape[1], **identity),
            in_shift if in_shift is not None else torch.zeros(x.shape[1], **identity),
            in_relu, gate)
        dw = conv_wgrad(x, grad_v, weight.shape[-1], stride, groups, u_prologue=u_prologue,
                        dy_prologue=dy)
        # in the weight's own strides: the gradient layout contract DDP's buckets expect
        grad_w = torch.empty_like(weight).copy_(dw)
    return grad_x, grad_w, grad_gate, d_gamma, d_beta


_conv_bn_train_op.register_autograd(_backward, setup_context=_setup_context)


@op_errors("conv_bn_train", "triton")
def conv_bn_train(x: torch.Tensor, weight: torch.Tensor, bn: BatchNormArgs | torch.nn.BatchNorm2d,
                  *, stride: int = 1, groups: int = 1, in_scale: Optional[torch.Tensor] = None,
                  in_shift: Optional[torch.Tensor] = None, in_relu: bool = False,
                  gate: Optional[torch.Tensor] = None, frozen: bool = False,
                  sync_group=None) -> TrainOutput:
    """Training-mode conv + BN with batch statistics, differentiable.

    Args:
        x: (N, C_in, H, W): the conv input, or the previous layer's lazy BN output
            (its y, with in_scale/in_shift = its scale/shift); then the gradient
            returned for x is dL/dv of that BN output.
        weight: (C_out, C_in / groups, k, k), x's dtype.
        bn: the BatchNorm2d (or its BatchNormArgs): gamma, beta, running statistics
            (updated in place, as nn.BatchNorm2d in train mode), eps, momentum.
        in_relu: ReLU after the input affine. gate: (N, C_in) SE gate.
        frozen: BN as in eval mode (e.g. frozen BN while fine-tuning): normalize with the
            running statistics, leave them unchanged; still differentiable (dy = scale * dv,
            and gamma/beta get their gradients).
        sync_group: a torch.distributed process group: the batch statistics of all its
            ranks, as nn.SyncBatchNorm (see `sync_batchnorm`); None: this rank's own.
        x may be float32/float16/bfloat16 or float64; in_scale, in_shift, the gate and
        the statistics are float32, float64 for a float64 x (computed in float64
        throughout: `acc_dtype`).

    Returns:
        TrainOutput(y raw channels_last, mean, inv_std, scale, shift, var); gradients
        flow to x, weight, gate and the BN's weight and bias.
    """
    args, c_out, count = check_conv_bn_train_args(x, weight, bn, stride, groups, in_scale, in_shift,
                                                 gate, frozen, **TRITON_CHECKS)
    if sync_group is not None and not frozen:
        prims = ConvBnPrimitives(_conv_bn_train_op, conv_bn_train_backward,
                                 partial(update_running_stats, args))
        y, stats = sync_conv_bn_train(prims, sync_group, x, weight, stride, groups, in_scale,
                                      in_shift, in_relu, gate, args.weight, args.bias, args.eps)
        return TrainOutput(y, *stats.unbind(0))
    frozen_stats = args.frozen_stats(c_out, x) if frozen else None
    y, stats = _conv_bn_train_op(x, weight, stride, groups, in_scale, in_shift, in_relu, gate,
                                 args.weight, args.bias, args.eps, frozen_stats)
    if not frozen:
        update_running_stats(args, stats, count)
    return TrainOutput(y, *stats.unbind(0))
