"""Fused RegNets: the reference builder given fused stem and blocks.

Eval mode: BN folded to per-channel scale/shift on every forward (`fold_block`, a few
foreach launches: nothing to go stale), then a Y block is 4 kernel launches and an X
block 3 (`block_forward_eval`). Training mode: BN batch statistics computed in
the conv epilogues, differentiable (`block_forward_train`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import _triton
from ..design import RegNetParams
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
    def of(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d,
           dtype: Optional[torch.dtype] = None) -> "FoldedConv":
        return fold_convs([(conv, bn)], dtype)[0]


def fold_convs(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]],
               dtype: Optional[torch.dtype] = None) -> list[FoldedConv]:
    """(conv, BN) pairs folded, the BNs together (`ops.fold_bns`). dtype: the weights'
    compute dtype (autocast), None to keep it. The weights are channels_last ((kh, kw,
    c_in) contiguous, the order of the implicit GEMM's reduction and of oneDNN's NHWC
    convs, which otherwise reorder them every call; a no-op copy for 1x1 convs)."""
    folded = ops.fold_bns([bn for _, bn in pairs])
    return [FoldedConv(_cast(conv.weight.detach(), dtype).contiguous(
                           memory_format=torch.channels_last),
                       scale, shift, conv.stride[0], conv.groups)
            for (conv, _), (scale, shift) in zip(pairs, folded)]


@dataclass(frozen=True)
class FoldedBlock:
    """What an eval-mode fused block reads: folded convs a, b, c, the optional
    projection shortcut and the optional SE weights (w1, b1, w2, b2)."""
    a: FoldedConv
    b: FoldedConv
    c: FoldedConv
    proj: Optional[FoldedConv]
    se: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def fold_block(block: nn.Module, dtype: Optional[torch.dtype] = None) -> FoldedBlock:
    """Fold a reference ResBottleneckBlock (torchvision layout) for eval; conv
    weights cast to dtype (the autocast dtype) unless it is None."""
    f = block.f
    se = getattr(f, "se", None)
    layers = [f.a, f.b, f.c] + ([] if block.proj is None else [block.proj])
    a, b, c, *proj = fold_convs([(layer[0], layer[1]) for layer in layers], dtype)
    return FoldedBlock(
        a=a, b=b, c=c, proj=proj[0] if proj else None,
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


def block_forward_train(x: torch.Tensor, block: nn.Module, block_ops=ops,
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One training-mode X/Y block through the fused ops, differentiable.

    Each BN module does what its own mode says, as nn.BatchNorm2d would: in training
    mode batch statistics and a running-statistics update; in eval mode (frozen BN)
    the running statistics, unchanged. Each conv writes its raw output; its BN's
    scale/shift are applied by the next kernel as it loads (no normalized tensor is
    written). Gradients reach x and every parameter of the block.

    block_ops: the module providing conv_bn_train, se_squeeze, se_excite and bn_add_relu.
    dtype: the conv weights' compute dtype (autocast; a differentiable cast), None to keep it.
    """
    f = block.f

    def conv_bn(x, layers, **kwargs):  # layers: (conv, BN[, ReLU]); the ReLU is fused later
        conv, bn = layers[0], layers[1]
        return block_ops.conv_bn_train(x, _cast(conv.weight, dtype), bn, stride=conv.stride[0],
                                       groups=conv.groups, frozen=not bn.training, **kwargs)

    a = conv_bn(x, f.a)
    b = conv_bn(a.y, f.b, in_scale=a.scale, in_shift=a.shift, in_relu=True)
    gate = None
    se = getattr(f, "se", None)
    if se is not None:
        sums = block_ops.se_squeeze(b.y, b.scale, b.shift)
        gate = block_ops.se_excite(sums, b.y.shape[2] * b.y.shape[3], se.fc1.weight, se.fc1.bias,
                                   se.fc2.weight, se.fc2.bias)
    c = conv_bn(b.y, f.c, in_scale=b.scale, in_shift=b.shift, in_relu=True, gate=gate)
    if block.proj is None:
        return block_ops.bn_add_relu(c.y, c.scale, c.shift, x)
    p = conv_bn(x, block.proj)
    return block_ops.bn_add_relu(c.y, c.scale, c.shift, p.y, p.scale, p.shift)


# ---------------------------------------------------------------------------
# Fused modules: the reference modules' parameters, buffers and state_dict keys,
# with forwards through the fused ops (so the reference builder builds fused models)
# ---------------------------------------------------------------------------

BACKENDS = ("triton", "cpu", "cuda")


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs convolutions in for x's device, or None."""
    device = x.device.type
    if device == "meta":  # torch has no autocast for meta tensors (the static report runs there)
        return None
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class _FusedModule:
    """What the fused stem and blocks share: the backend choice; the path (the eval
    fusion, or the differentiable training path in which each BN follows its mode);
    autocast; and eval-mode BN folding, redone by every eval forward: no version counter
    sees a change through `.data` or of a BN's eps, and a cached fold would then be stale."""

    backend = "auto"  # "auto": CPU tensors -> the C++ CPU ops, CUDA tensors -> Triton
                      # (the C++ extension's CUDA kernels where Triton is not installed)

    def _ops(self, x: torch.Tensor):
        """The module of fused ops for x: `regnet_kernels.ops` (Triton) or `.ops.cpp` (the
        C++ extension: its CPU or CUDA kernels, by x's device)."""
        if self.backend in ("cpu", "cuda") and x.device.type != self.backend:
            raise RuntimeError(f"{type(self).__name__}: backend={self.backend!r} runs "
                               f"{self.backend.upper()} tensors, got a tensor on {x.device}")
        if self.backend == "triton" and _triton.IMPORT_ERROR is not None:
            raise _triton.TritonUnavailable(f"backend='triton': {_triton.unavailable_reason()}")
        if self.backend in ("cpu", "cuda") or (self.backend == "auto" and (
                x.device.type == "cpu" or _triton.IMPORT_ERROR is not None)):
            from ..ops import cpp
            return cpp
        return ops

    def _eval_fusion(self, x: torch.Tensor) -> bool:
        """The eval fusion (BN folded, no autograd) when every BN is in eval mode and no
        gradient is needed; otherwise the differentiable path, in which each BN follows
        its own mode (frozen BN in a training model, or gradients through eval BN)."""
        if any(m.training for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            return False
        return not (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if self._eval_fusion(x):
            return self._eval_forward(x, self._ops(x), dtype)
        return self._train_forward(x, self._ops(x), dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        """Model-level input checks (the stem's); the ops check the rest."""


class FusedBlock(_FusedModule, ResBottleneckBlock):
    """ResBottleneckBlock through the fused ops: eval = BN folded from running
    statistics (3 or 4 launches), train = batch statistics with autograd."""

    def _train_forward(self, x, fused_ops, dtype):
        return block_forward_train(x, self, fused_ops, dtype)

    def _eval_forward(self, x, fused_ops, dtype):
        return block_forward_eval(x, fold_block(self, dtype), fused_ops)


class FusedStem(_FusedModule, Stem):
    """The stem (3x3 stride-2 conv, BN, ReLU) as one conv_bn_act in eval; in training
    conv_bn_train plus one pass that writes relu(BN(y)) (the blocks read a real input)."""

    def _check_input(self, x: torch.Tensor) -> None:
        channels = self[0].in_channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"the model takes (N, {channels}, H, W) images, got shape "
                             f"{tuple(x.shape)}")

    def _train_forward(self, x, fused_ops, dtype):
        conv, bn = self[0], self[1]
        out = fused_ops.conv_bn_train(x, _cast(conv.weight, dtype), bn, stride=conv.stride[0],
                                      frozen=not bn.training)
        return fused_ops.bn_add_relu(out.y, out.scale, out.shift)

    def _eval_forward(self, x, fused_ops, dtype):
        folded = FoldedConv.of(self[0], self[1], dtype)
        return fused_ops.conv_bn_act(x, folded.weight, folded.scale, folded.shift,
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

    backend: "auto" (CPU tensors -> the C++ CPU ops; CUDA tensors -> Triton, or the C++
    extension's CUDA kernels where Triton is not installed), "triton"
    (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpu" (the C++ CPU ops) or
    "cuda" (the C++ extension's CUDA kernels);
    `regnet_kernels.available_backends()` says which can run here.

    Eval mode without autograd runs BN folded from the running statistics (3-4
    launches per block); otherwise the training kernels run, each BN as its mode says:
    batch statistics with the running-statistics update in training mode, the running
    statistics in eval mode (frozen BN in a training model, or gradients through an
    eval-mode model). Under torch.autocast the convs run in the autocast dtype.
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
            module.__dict__.pop("backend", None)
            module.__class__ = reference[type(module)]
    return model
