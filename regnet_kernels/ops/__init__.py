"""Fused RegNet block ops (Triton backend), as plain functions.

Each op is a torch custom op in the `regnet_triton` namespace (so it traces
under torch.compile) with a fake implementation.

Eval (BN folded from running statistics):
  conv_bn_act            k x k grouped conv + folded BN + ReLU (+ SE squeeze sums)
  se_excite              SE squeeze sums -> sigmoid gate
  conv1x1_gate_residual  gate * x -> 1x1 conv + folded BN + identity/projection shortcut + ReLU
An eval-mode Y block is 4 launches, an X block 3.

Training (BN from batch statistics; differentiable, deterministic):
  conv_bn_train          conv of relu(x * s + t) * gate -> raw y, batch stats, running-stat
                         update (built from conv_bn_stats + bn_finalize)
  se_squeeze             SE squeeze of relu(y * s + t) from the raw conv output
  bn_add_relu            relu(BN(y) + shortcut or BN(projection))
  conv_dgrad, conv_wgrad, bn_act_backward: the gradient kernels behind them
"""
from __future__ import annotations

from typing import Sequence

import torch

from .bn_act_backward import bn_act_backward
from .bn_add_relu import bn_add_relu
from .bn_finalize import BatchStats, bn_finalize
from .conv1x1_gate_residual import conv1x1_gate_residual
from .conv_bn_act import ConvStats, conv_bn_act, conv_bn_stats
from .conv_bn_train import conv_bn_train
from .conv_grad import DyPrologue, UPrologue, conv_dgrad, conv_wgrad
from .se_excite import se_excite, se_squeeze
from .types import BatchNormArgs, TrainOutput, acc_dtype
from . import cpp  # the C++ extension's ops: importing builds nothing (see cpp.py)


def fold_bn(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as a per-channel (scale, shift), float32 (float64 for a float64 BN):
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a BatchNorm with running statistics")
    dtype = acc_dtype(bn.running_var.dtype)
    var = bn.running_var.to(dtype)
    mean = bn.running_mean.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale.detach().contiguous(), shift.detach().contiguous()


def fold_bns(bns: Sequence[torch.nn.BatchNorm2d]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`fold_bn` of several BatchNorms at once, with torch._foreach_* ops (a handful of
    launches for all of them instead of ~6 each): the fused eval forward folds on every
    call, so that no change of a weight, statistic or eps (`.data` included) goes unseen."""
    def batchable(bn):
        dtype = acc_dtype(bn.running_var.dtype) if bn.running_var is not None else None
        return (bn.running_mean is not None and bn.weight is not None and bn.bias is not None
                and all(t.dtype == dtype for t in (bn.running_var, bn.running_mean, bn.weight,
                                                   bn.bias)))
    if not all(batchable(bn) for bn in bns):
        return [fold_bn(bn) for bn in bns]
    with torch.no_grad():
        scale = torch._foreach_add([bn.running_var for bn in bns], [float(bn.eps) for bn in bns])
        torch._foreach_rsqrt_(scale)
        torch._foreach_mul_(scale, [bn.weight for bn in bns])
        shift = torch._foreach_mul(scale, [bn.running_mean for bn in bns])
        shift = torch._foreach_sub([bn.bias for bn in bns], shift)
    return list(zip(scale, shift))


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "fold_bn", "fold_bns",
           "conv_bn_stats", "ConvStats", "bn_finalize", "BatchStats", "BatchNormArgs",
           "se_squeeze", "bn_add_relu", "conv_bn_train", "TrainOutput", "conv_dgrad", "conv_wgrad", "DyPrologue", "UPrologue",
           "bn_act_backward", "cpp"]
