"""Fused execution of RegNet blocks built by the reference builder.

Eval mode: BN folded to per-channel scale/shift once (`fold_block`), then a Y
block is 4 kernel launches and an X block 3 (`block_forward_eval`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops


@dataclass(frozen=True)
class FoldedConv:
    """A conv weight with its eval BN folded into a per-channel scale and shift."""
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    stride: int
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "FoldedConv":
        scale, shift = ops.fold_bn(bn)
        return cls(conv.weight.detach(), scale, shift, conv.stride[0], conv.groups)


@dataclass(frozen=True)
class FoldedBlock:
    """What an eval-mode fused block reads: folded convs a, b, c, the optional
    projection shortcut and the optional SE weights (w1, b1, w2, b2)."""
    a: FoldedConv
    b: FoldedConv
    c: FoldedConv
    proj: Optional[FoldedConv]
    se: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def fold_block(block: nn.Module) -> FoldedBlock:
    """Fold a reference ResBottleneckBlock (torchvision layout) for eval."""
    f = block.f
    se = getattr(f, "se", None)
    return FoldedBlock(
        a=FoldedConv.of(f.a[0], f.a[1]),
        b=FoldedConv.of(f.b[0], f.b[1]),
        c=FoldedConv.of(f.c[0], f.c[1]),
        proj=None if block.proj is None else FoldedConv.of(block.proj[0], block.proj[1]),
        se=None if se is None else tuple(
            t.detach() for t in (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)),
    )


def block_forward_eval(x: torch.Tensor, fb: FoldedBlock) -> torch.Tensor:
    """One eval-mode X/Y block through the fused ops: 3 launches (X) or 4 (Y)."""
    a = ops.conv_bn_act(x, fb.a.weight, fb.a.scale, fb.a.shift)
    gate = None
    if fb.se is None:
        b = ops.conv_bn_act(a, fb.b.weight, fb.b.scale, fb.b.shift,
                            stride=fb.b.stride, groups=fb.b.groups)
    else:
        b, sums = ops.conv_bn_act(a, fb.b.weight, fb.b.scale, fb.b.shift,
                                  stride=fb.b.stride, groups=fb.b.groups, squeeze=True)
        gate = ops.se_excite(sums, b.shape[2] * b.shape[3], *fb.se)
    if fb.proj is None:
        return ops.conv1x1_gate_residual(b, fb.c.weight, fb.c.scale, fb.c.shift, x, gate=gate)
    return ops.conv1x1_gate_residual(
        b, fb.c.weight, fb.c.scale, fb.c.shift, x, gate=gate,
        proj_weight=fb.proj.weight, proj_scale=fb.proj.scale, proj_shift=fb.proj.shift,
        proj_stride=fb.proj.stride)


def block_forward_train(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """One training-mode X/Y block through the fused ops, differentiable.

    BN uses batch statistics and updates the running statistics of `block`'s BN
    modules as nn.BatchNorm2d does. Each conv writes its raw output; its BN's
    scale/shift are applied by the next kernel as it loads (no normalized tensor
    is written). Gradients reach x and every parameter of the block.
    """
    f = block.f
    a = ops.conv_bn_train(x, f.a[0].weight, f.a[1])
    b = ops.conv_bn_train(a.y, f.b[0].weight, f.b[1], stride=f.b[0].stride[0],
                          groups=f.b[0].groups, in_scale=a.scale, in_shift=a.shift, in_relu=True)
    gate = None
    se = getattr(f, "se", None)
    if se is not None:
        sums = ops.se_squeeze(b.y, b.scale, b.shift)
        gate = ops.se_excite(sums, b.y.shape[2] * b.y.shape[3], se.fc1.weight, se.fc1.bias,
                             se.fc2.weight, se.fc2.bias)
    c = ops.conv_bn_train(b.y, f.c[0].weight, f.c[1], in_scale=b.scale, in_shift=b.shift,
                          in_relu=True, gate=gate)
    if block.proj is None:
        return ops.bn_add_relu(c.y, c.scale, c.shift, x)
    p = ops.conv_bn_train(x, block.proj[0].weight, block.proj[1], stride=block.proj[0].stride[0])
    return ops.bn_add_relu(c.y, c.scale, c.shift, p.y, p.scale, p.shift)
