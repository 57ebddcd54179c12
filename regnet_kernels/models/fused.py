"""Fused RegNets: the reference builder given fused stem and blocks.

Eval mode: BN folded to per-channel scale/shift (`fold_block`, cached until a
parameter or buffer changes), then a Y block is 4 kernel launches and an X
block 3 (`block_forward_eval`). Training mode: BN batch statistics computed in
the conv epilogues, differentiable (`block_forward_train`).
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..design import RegNetParams
from ..ops._implicit_gemm import interpreting
from ..zoo import resolve_params
from .reference import RegNet, ResBottleneckBlock, Stem


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


def block_forward_eval(x: torch.Tensor, fb: FoldedBlock, block_ops=ops) -> torch.Tensor:
    """One eval-mode X/Y block through the fused ops: 3 launches (X) or 4 (Y).

    block_ops: the module providing conv_bn_act, se_excite and conv1x1_gate_residual
    (`regnet_kernels.ops` for Triton, `regnet_kernels.ops.cpp` for the C++ CPU ops).
    """
    a = block_ops.conv_bn_act(x, fb.a.weight, fb.a.scale, fb.a.shift)
    gate = None
    if fb.se is None:
        b = block_ops.conv_bn_act(a, fb.b.weight, fb.b.scale, fb.b.shift,
                                  stride=fb.b.stride, groups=fb.b.groups)
    else:
        b, sums = block_ops.conv_bn_act(a, fb.b.weight, fb.b.scale, fb.b.shift,
                                        stride=fb.b.stride, groups=fb.b.groups, squeeze=True)
        gate = block_ops.se_excite(sums, b.shape[2] * b.shape[3], *fb.se)
    proj = {} if fb.proj is None else dict(proj_weight=fb.proj.weight, proj_scale=fb.proj.scale,
                                           proj_shift=fb.proj.shift, proj_stride=fb.proj.stride)
    return block_ops.conv1x1_gate_residual(b, fb.c.weight, fb.c.scale, fb.c.shift, x, gate=gate,
                                           **proj)


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


# ---------------------------------------------------------------------------
# Fused modules: the reference modules' parameters, buffers and state_dict keys,
# with forwards through the fused ops (so the reference builder builds fused models)
# ---------------------------------------------------------------------------

BACKENDS = ("triton", "cpu")


def _state_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in itertools.chain(module.parameters(), module.buffers()))


class _FusedModule:
    """What the fused stem and blocks share: the backend choice, and eval-mode BN
    folding cached until a parameter or buffer changes, so an eval forward
    launches only the fused kernels (4 per Y block, 3 per X)."""

    backend = "auto"  # "auto": CUDA tensors -> Triton, CPU tensors -> the C++ CPU ops

    def _eval_ops(self, x: torch.Tensor):
        """The module of eval ops (conv_bn_act, se_excite, conv1x1_gate_residual) for x."""
        if self.backend == "cpu" or (self.backend == "auto" and x.device.type == "cpu"):
            from ..ops import cpp
            return cpp
        return ops

    def _check_training(self, x: torch.Tensor) -> None:
        cpu = self.backend == "cpu" or (self.backend == "auto" and x.device.type == "cpu"
                                        and not interpreting())
        if cpu:
            raise NotImplementedError(
                f"{type(self).__name__}: training on the C++ CPU backend is not implemented yet "
                "(it has the eval ops); train on a CUDA device, or with backend='triton' under "
                "TRITON_INTERPRET=1 (slow)")

    def _folded(self, fold):
        if torch.compiler.is_compiling():  # traced once; the compiler fuses the folding
            return fold(self)
        key = _state_key(self)
        if getattr(self, "_fold_cache", (None,))[0] != key:
            self._fold_cache = (key, fold(self))
        return self._fold_cache[1]

    def _warn_if_grad(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled() and not getattr(self, "_warned", False) and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            self._warned = True
            warnings.warn(f"{type(self).__name__}: the eval-mode fused forward does not "
                          "backpropagate (no gradients reach its input or parameters); use "
                          "torch.no_grad() for inference, or .train() to train", stacklevel=3)


class FusedBlock(_FusedModule, ResBottleneckBlock):
    """ResBottleneckBlock through the fused ops: eval = BN folded from running
    statistics (3 or 4 launches), train = batch statistics with autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._check_training(x)
            return block_forward_train(x, self)
        self._warn_if_grad(x)
        return block_forward_eval(x, self._folded(fold_block), self._eval_ops(x))


class FusedStem(_FusedModule, Stem):
    """The stem (3x3 stride-2 conv, BN, ReLU) as one conv_bn_act in eval; in training
    conv_bn_train plus one pass that writes relu(BN(y)) (the blocks read a real input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        if self.training:
            self._check_training(x)
            out = ops.conv_bn_train(x, conv.weight, bn, stride=conv.stride[0])
            return ops.bn_add_relu(out.y, out.scale, out.shift)
        self._warn_if_grad(x)
        folded = self._folded(lambda stem: FoldedConv.of(stem[0], stem[1]))
        return self._eval_ops(x).conv_bn_act(x, folded.weight, folded.scale, folded.shift,
                                             stride=folded.stride)


_FUSED = {Stem: FusedStem, ResBottleneckBlock: FusedBlock}


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))


def _set_backend(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, _FusedModule):
            module.backend = backend


def fused_model(name_or_params: str | RegNetParams, backend: str = "auto",
                num_classes: int = 1000) -> RegNet:
    """A RegNet built by the reference builder with fused stem and blocks: the same
    state_dict keys and shapes as `reference_model`, so checkpoints load into it.

    backend: "auto" (CUDA tensors -> Triton; CPU tensors -> the C++ CPU ops in eval, and
    in training the Triton interpreter when TRITON_INTERPRET=1), "triton" (CUDA tensors,
    or CPU tensors under TRITON_INTERPRET=1) or "cpu" (the C++ CPU ops; eval only so far).
    """
    _check_backend(backend)
    model = RegNet(resolve_params(name_or_params), num_classes, stem=FusedStem, block=FusedBlock)
    _set_backend(model, backend)
    return model


def fuse(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make a reference RegNet (or any model built from the reference stem and
    blocks) run through the fused ops, in place: parameters and buffers are kept."""
    _check_backend(backend)
    for module in model.modules():
        if type(module) in _FUSED:
            module.__class__ = _FUSED[type(module)]
    _set_backend(model, backend)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse` in place (for debugging: the plain PyTorch forward again)."""
    reference = {fused: ref for ref, fused in _FUSED.items()}
    for module in model.modules():
        if type(module) in reference:
            for attr in ("_fold_cache", "backend", "_warned"):
                module.__dict__.pop(attr, None)
            module.__class__ = reference[type(module)]
    return model
