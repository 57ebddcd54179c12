"""Fused RegNet block ops (Triton backend), as plain functions.

Each op is a torch custom op in the `regnet_triton` namespace (so it traces
under torch.compile) with a fake implementation:

  conv_bn_act            k x k grouped conv + folded BN + ReLU (+ SE squeeze sums)
  se_excite              SE squeeze sums -> sigmoid gate
  conv1x1_gate_residual  gate * x -> 1x1 conv + folded BN + identity/projection shortcut + ReLU

With these, an eval-mode Y block is 4 launches and an X block 3.
"""
from __future__ import annotations

import torch

from .conv1x1_gate_residual import conv1x1_gate_residual
from .conv_bn_act import conv_bn_act
from .se_excite import se_excite


def fold_bn(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as a per-channel float32 (scale, shift):
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a BatchNorm with running statistics")
    var = bn.running_var.float()
    mean = bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale.detach().contiguous(), shift.detach().contiguous()


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "fold_bn"]
