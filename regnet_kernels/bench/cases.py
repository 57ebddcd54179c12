"""Benchmark cases: a reference module, its inputs, the fused equivalent and what it must cost.

Three levels, all derived from a model's stages (see `shapes`):
- "op": each fused op at every distinct layer shape (the stem's conv, and a, b, se, c of every
  (stage, block kind)); its baseline is the same computation as reference PyTorch modules.
- "block": one Y and one X block (the model's most frequent block shape).
- "model": whole networks, eval forward and training step.

A case builds everything on the CPU in float32; providers move it to their device, dtype and
memory format. Inputs are random (never zeros), BN statistics random, so no kernel can take a
shortcut on trivial data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..ops import dispatch
from ..complexity import INPUT_CHANNELS
from ..models.fused import fuse
from ..models.reference import (ResBottleneckBlock, SqueezeExcite, Stem, conv_bn,
                                reference_model)
from ..zoo import resolve_params
from .shapes import BlockShape, block_shapes, representative_blocks, stem_output_size
from .traffic import Cost, DTYPE_BYTES, block_cost, fused_layer_cost, model_traffic


@dataclass
class Case:
    """One thing to time.

    make_module() -> the reference nn.Module (fp32, CPU, eval, random BN statistics).
    make_inputs(batch, dtype, fused) -> the input tensors on the CPU: activations in ``dtype``;
        with fused=True in the fused op's convention (e.g. fp32 gates and SE sums).
    fused_fn(module, backend) -> a callable on the fused inputs, from a fresh reference module
        already on its device and dtype (block and model levels convert it in place: `fuse`).
    cost(batch, dtype) -> the bytes and FLOP one call must move and do (the roofline's input).
    """

    level: str
    name: str
    op: str
    model: str
    make_module: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.dtype, bool], tuple]
    fused_fn: Callable[[nn.Module, str], Callable]
    cost: Callable[[int, str], Cost]
    modes: tuple[str, ...] = ("eval",)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine and running statistics, random SE biases; returns the module in eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
    return module.eval()


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------
# Op level: reference modules computing exactly what one fused op computes
# ---------------------------------------------------------------------------


class ConvBNSqueeze(nn.Module):
    """conv + BN + ReLU, and the SE pool of its output (what conv_bn_act(squeeze=True) does)."""

    def __init__(self, conv: nn.Sequential) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.mean((2, 3))


class Excite(SqueezeExcite):
    """The SE gate from the pooled input (what se_excite does; the pool is in conv b)."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))


class GateResidual(nn.Module):
    """relu(BN(conv1x1(b * gate)) + shortcut(x)): what conv1x1_gate_residual does."""

    def __init__(self, conv: nn.Sequential, proj: nn.Sequential | None) -> None:
        super().__init__()
        self.conv = conv
        self.proj = proj

    def forward(self, b: torch.Tensor, gate: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if gate is not None:
            b = b * gate
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(self.conv(b) + shortcut)


def _conv_case(name: str, model: str, module: Callable[[], nn.Module], c_in: int, size: int,
               squeeze: bool, cost: Callable[[int, str], Cost]) -> Case:
    def make_inputs(batch, dtype, fused):
        return (_randn(batch, c_in, size, size, dtype=dtype),)

    def fused_fn(module, backend):
        seq = module.conv if squeeze else module
        conv, bn = seq[0], seq[1]
        scale, shift = ops.fold_bn(bn)
        op = dispatch.ops_for(backend).conv_bn_act
        return lambda x: op(x, conv.weight, scale, shift, stride=conv.stride[0],
                            groups=conv.groups, relu=len(seq) > 2, squeeze=squeeze)

    return Case("op", name, "conv_bn_act", model, module, make_inputs, fused_fn, cost)


def _excite_case(name: str, shape: BlockShape, cost) -> Case:
    w_b, hw = shape.w_b, shape.out_size ** 2

    def make_inputs(batch, dtype, fused):
        mean = _randn(batch, w_b)
        if fused:  # the squeeze sums conv b wrote: (N, tiles, C) fp32
            return (mean.mul(hw).unsqueeze(1),)
        return (mean.to(dtype)[:, :, None, None],)

    def fused_fn(module, backend):
        op = dispatch.ops_for(backend).se_excite
        weights = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
        return lambda sums: op(sums, hw, *weights)

    return Case("op", name, "se_excite", shape.model,
                lambda: randomize(Excite(w_b, shape.spec.se_width)), make_inputs, fused_fn, cost)


def _gate_residual_case(name: str, shape: BlockShape, cost) -> Case:
    s, ho = shape.spec, shape.out_size

    def make_module():
        proj = conv_bn(s.w_in, s.w_out, 1, s.stride, relu=False) if shape.has_proj else None
        return randomize(GateResidual(conv_bn(shape.w_b, s.w_out, 1, relu=False), proj))

    def make_inputs(batch, dtype, fused):
        b = _randn(batch, shape.w_b, ho, ho, dtype=dtype, seed=2).relu()
        x = _randn(batch, s.w_in, shape.size, shape.size, dtype=dtype, seed=3)
        gate = torch.sigmoid(_randn(batch, shape.w_b, seed=4)) if s.se_width else None
        if gate is not None and not fused:
            gate = gate.to(dtype)[:, :, None, None]
        return b, gate, x

    def fused_fn(module, backend):
        op = dispatch.ops_for(backend).conv1x1_gate_residual
        scale, shift = ops.fold_bn(module.conv[1])
        proj = {}
        if module.proj is not None:
            p_scale, p_shift = ops.fold_bn(module.proj[1])
            proj = dict(proj_weight=module.proj[0].weight, proj_scale=p_scale,
                        proj_shift=p_shift, proj_stride=module.proj[0].stride[0])
        return lambda b, gate, x: op(b, module.conv[0].weight, scale, shift, x, gate=gate, **proj)

    return Case("op", name, "conv1x1_gate_residual", shape.model, make_module, make_inputs,
                fused_fn, cost)


def _layer_case(shape: BlockShape, layer: str) -> Case:
    s = shape.spec
    name = f"{shape.name}.{layer}"

    def cost(batch, dtype):
        return fused_layer_cost(shape, layer, batch, DTYPE_BYTES[dtype])

    if layer == "a":
        return _conv_case(name, shape.model, lambda: randomize(conv_bn(s.w_in, shape.w_b, 1)),
                          s.w_in, shape.size, False, cost)
    if layer == "b":
        squeeze = bool(s.se_width)

        def make_module():
            conv = conv_bn(shape.w_b, shape.w_b, 3, s.stride, groups=shape.groups)
            return randomize(ConvBNSqueeze(conv) if squeeze else conv)

        return _conv_case(name, shape.model, make_module, shape.w_b, shape.size, squeeze, cost)
    if layer == "se":
        return _excite_case(name, shape, cost)
    return _gate_residual_case(name, shape, cost)


def _stem_case(model: str, resolution: int, stem_width: int) -> Case:
    size = stem_output_size(resolution)

    def cost(batch, dtype):
        elem = DTYPE_BYTES[dtype]
        acts = (INPUT_CHANNELS * resolution ** 2 + stem_width * size ** 2) * batch * elem
        macs = 9 * INPUT_CHANNELS * stem_width * size ** 2
        return Cost(acts + 9 * INPUT_CHANNELS * stem_width * elem + 8 * stem_width,
                    2 * macs * batch, 1)

    return _conv_case("stem", model, lambda: randomize(Stem(INPUT_CHANNELS, stem_width)),
                      INPUT_CHANNELS, resolution, False, cost)


def op_cases(model: str, resolution: int = 224) -> list[Case]:
    """Every fused op at every distinct layer shape of ``model``."""
    cases = [_stem_case(model, resolution, resolve_params(model).stem_width)]
    for shape in block_shapes(model, resolution):
        cases += [_layer_case(shape, layer) for layer in shape.layers()]
    return cases


# ---------------------------------------------------------------------------
# Block and model levels: the reference module against its fused conversion
# ---------------------------------------------------------------------------


def block_cases(model: str, resolution: int = 224) -> list[Case]:
    """One Y block and one X block of the model's most frequent block shape."""
    cases = []
    for kind, shape in representative_blocks(model, resolution).items():
        s = shape.spec

        def make_module(s=s, shape=shape):
            return randomize(ResBottleneckBlock(s.w_in, s.w_out, s.stride, s.group_width, 1.0,
                                                s.se_width))

        def make_inputs(batch, dtype, fused, s=s, shape=shape):
            return (_randn(batch, s.w_in, shape.size, shape.size, dtype=dtype),)

        def cost(batch, dtype, shape=shape):
            return block_cost(shape, batch, DTYPE_BYTES[dtype])

        cases.append(Case("block", f"{kind} block {shape.name}", "block", model, make_module,
                          make_inputs, fuse, cost, ("eval", "train")))
    return cases


def model_case(model: str, resolution: int = 224) -> Case:
    """A whole network, eval forward and training step."""
    def make_inputs(batch, dtype, fused):
        return (_randn(batch, INPUT_CHANNELS, resolution, resolution, dtype=dtype),)

    def cost(batch, dtype):
        return model_traffic(model, resolution, dtype).cost(batch)

    return Case("model", model, "model", model, lambda: randomize(reference_model(model)),
                make_inputs, fuse, cost, ("eval", "train"))
