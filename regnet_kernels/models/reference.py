"""Plain PyTorch RegNet modules, the reference the fused kernels are checked against.

Module names and parameter shapes follow torchvision's layout exactly, so torchvision state
dicts load with ``strict=True``::

    stem.0 (conv), stem.1 (BN)
    trunk_output.block{S}.block{S}-{B}.f.{a,b,c}.{0: conv, 1: BN}      S from 1, B from 0
    trunk_output.block{S}.block{S}-{B}.f.se.{fc1,fc2}                   Y models only
    trunk_output.block{S}.block{S}-{B}.proj.{0: conv, 1: BN}            when the shape changes
    fc

:class:`RegNet` takes the stem, block and head types as constructor arguments, so a fused
model reuses the same builder with fused modules that keep these names.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..design import AnyNetParams, RegNetParams, StageSpec
from ..zoo import resolve_params

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def conv_bn(w_in: int, w_out: int, kernel_size: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding), BatchNorm and optionally ReLU: children 0, 1[, 2]."""
    layers = [
        nn.Conv2d(w_in, w_out, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(w_out, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Stem(nn.Sequential):
    """3x3 conv with stride 2, BN, ReLU: halves the resolution."""

    def __init__(self, w_in: int, w_out: int) -> None:
        super().__init__(*conv_bn(w_in, w_out, 3, stride=2))


class SqueezeExcite(nn.Module):
    """Channel gate: x * sigmoid(fc2(relu(fc1(mean over H, W of x)))), fc1/fc2 1x1 convs."""

    def __init__(self, width: int, se_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(width, se_width, 1, bias=True)
        self.fc2 = nn.Conv2d(se_width, width, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate


class BottleneckTransform(nn.Sequential):
    """The residual branch: 1x1 (a), grouped 3x3 with the stride (b), SE, 1x1 (c)."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int,
                 bottleneck_ratio: float, se_width: int) -> None:
        w_b = round(w_out * bottleneck_ratio)
        layers = OrderedDict(
            a=conv_bn(w_in, w_b, 1),
            b=conv_bn(w_b, w_b, 3, stride, groups=w_b // group_width),
        )
        if se_width:
            layers["se"] = SqueezeExcite(w_b, se_width)
        layers["c"] = conv_bn(w_b, w_out, 1, relu=False)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """RegNet's X block (Y block with ``se_width > 0``): relu(shortcut(x) + f(x)).

    The shortcut is the identity when the shape is unchanged, else ``proj``: a strided 1x1
    conv and BN.
    """

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int,
                 bottleneck_ratio: float = 1.0, se_width: int = 0) -> None:
        super().__init__()
        self.w_in = w_in
        self.w_out = w_out
        self.stride = stride
        self.group_width = group_width
        self.se_width = se_width
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = conv_bn(w_in, w_out, 1, stride, relu=False)
        self.f = BottleneckTransform(w_in, w_out, stride, group_width, bottleneck_ratio, se_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(shortcut + self.f(x))


class Stage(nn.Sequential):
    """The blocks of one stage, named ``block{S}-{B}`` as torchvision names them."""

    def __init__(self, stage: StageSpec, block: Callable[..., nn.Module],
                 bottleneck_ratio: float) -> None:
        super().__init__()
        for spec in stage.blocks():
            self.add_module(
                f"block{spec.stage_index + 1}-{spec.block_index}",
                block(spec.w_in, spec.w_out, spec.stride, spec.group_width,
                      bottleneck_ratio=bottleneck_ratio, se_width=spec.se_width),
            )


class Head(nn.Linear):
    """Global average pool, flatten, classifier.

    An ``nn.Linear`` itself, registered as the model's ``fc``, so that its parameters are
    torchvision's top-level ``fc.weight`` / ``fc.bias``. The fused models keep it as it is:
    pooling in the last block's epilogue would save 0.3% of the traffic (docs/ops.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.mean((2, 3)))


class RegNet(nn.Module):
    """A RegNet built from :class:`~regnet_kernels.RegNetParams` (or an AnyNet from
    :class:`~regnet_kernels.design.AnyNetParams`: the same blocks, per-stage settings).

    Args:
        params: the network's parameters.
        num_classes: classifier outputs.
        stem: ``stem(w_in=3, w_out=stem_width)`` -> module.
        block: ``block(w_in, w_out, stride, group_width, bottleneck_ratio=, se_width=)`` ->
            module.
        head: ``head(w_in, num_classes)`` -> module mapping [N, C, H, W] to [N, num_classes].
    """

    def __init__(self, params: RegNetParams | AnyNetParams, num_classes: int = 1000,
                 stem: Callable[..., nn.Module] = Stem,
                 block: Callable[..., nn.Module] = ResBottleneckBlock,
                 head: Callable[..., nn.Module] = Head) -> None:
        super().__init__()
        self.params = params
        stages = params.stages()
        self.stem = stem(3, params.stem_width)
        self.trunk_output = nn.Sequential(OrderedDict(
            (f"block{s.index + 1}", Stage(s, block, s.bottleneck_ratio)) for s in stages
        ))
        self.fc = head(stages[-1].width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk_output(self.stem(x)))


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """torchvision's (and pycls's) initialization.

    Conv weights ~ N(0, sqrt(2 / (k*k*out_channels))) (no division by groups), BN weight 1 and
    bias 0, Linear weight ~ N(0, 0.01) and bias 0. Conv biases (only the SE convs have them)
    keep PyTorch's default initialization, as torchvision leaves them.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)


def reference_model(name_or_params: str | RegNetParams, num_classes: int = 1000) -> RegNet:
    """A freshly initialized reference RegNet, by model name or parameters.

    >>> model = reference_model("regnety_400mf")  # doctest: +SKIP
    >>> model(torch.randn(1, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([1, 1000])
    """
    return RegNet(resolve_params(name_or_params), num_classes)
