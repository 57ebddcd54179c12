"""Fused RegNets: the reference builder given fused stem and blocks.

Eval mode: BN folded to per-channel scale/shift (`fold_block`, cached until a
parameter or buffer changes), then a Y block is 4 kernel launches and an X
block 3 (`block_forward_eval`). Training mode: BN batch statistics computed in
the conv epilogues, differentiable (`block_forward_train`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import _triton
from ..ops.sync_batchnorm import sync_group
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
        """dtype: the weight's compute dtype (autocast), None to keep it. The weight is
        kept channels_last ((kh, kw, c_in) contiguous, the order of the implicit GEMM's
        reduction and of oneDNN's NHWC convs, which otherwise reorder it every call)."""
        scale, shift = ops.fold_bn(bn)
        weight = _cast(conv.weight.detach(), dtype).contiguous(memory_format=torch.channels_last)
        return cls(weight, scale, shift, conv.stride[0], conv.groups)


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
    return FoldedBlock(
        a=FoldedConv.of(f.a[0], f.a[1], dtype),
        b=FoldedConv.of(f.b[0], f.b[1], dtype),
        c=FoldedConv.of(f.c[0], f.c[1], dtype),
        proj=None if block.proj is None else FoldedConv.of(block.proj[0], block.proj[1], dtype),
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
                        dtype: Optional[torch.dtype] = None, sync_bn: bool = False) -> torch.Tensor:
    """One training-mode X/Y block through the fused ops, differentiable.

    Each BN module does what its own mode says, as nn.BatchNorm2d would: in training
    mode batch statistics and a running-statistics update; in eval mode (frozen BN)
    the running statistics, unchanged. Each conv writes its raw output; its BN's
    scale/shift are applied by the next kernel as it loads (no normalized tensor is
    written). Gradients reach x and every parameter of the block.

    block_ops: the module providing conv_bn_train, se_squeeze, se_excite and bn_add_relu.
    dtype: the conv weights' compute dtype (autocast; a differentiable cast), None to keep it.
    sync_bn: every training-mode BN takes the statistics of all ranks of the default
    process group (an nn.SyncBatchNorm does so over its own group in any case).
    """
    f = block.f

    def conv_bn(x, layers, **kwargs):  # layers: (conv, BN[, ReLU]); the ReLU is fused later
        return _conv_bn_train(block_ops, x, layers[0], layers[1], dtype, sync_bn, **kwargs)

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


def _conv_bn_train(block_ops, x, conv: nn.Conv2d, bn: nn.Module, dtype, sync_bn: bool, **kwargs):
    """One conv + BN of a training forward: the BN's mode says batch or running statistics,
    `sync_group` whether the batch statistics are this rank's or every rank's."""
    return block_ops.conv_bn_train(x, _cast(conv.weight, dtype), bn, stride=conv.stride[0],
                                   groups=conv.groups, frozen=not bn.training,
                                   sync_group=sync_group(bn, sync_bn), **kwargs)


# The norm layers the fused ops implement; anything else in a BN slot is refused by name.
SUPPORTED_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def check_norms(model: nn.Module) -> None:
    """Raise a TypeError naming every norm layer of a fused stem or block that the fused
    ops do not implement (e.g. torchvision's FrozenBatchNorm2d, GroupNorm, a BatchNorm2d
    subclass with its own forward), instead of running BN arithmetic in its place."""
    bad = [f"{name + '.' if name else ''}{slot} ({type(norm).__name__})"
           for name, module in model.named_modules() if isinstance(module, _FusedModule)
           for slot, norm in module._norm_slots().items() if type(norm) not in SUPPORTED_NORMS]
    if bad:
        raise TypeError("fused RegNet: the fused ops implement nn.BatchNorm2d and "
                        "nn.SyncBatchNorm only; unsupported norm layers: " + ", ".join(bad)
                        + " (unfuse the model to run them in PyTorch)")


# ---------------------------------------------------------------------------
# Fused modules: the reference modules' parameters, buffers and state_dict keys,
# with forwards through the fused ops (so the reference builder builds fused models)
# ---------------------------------------------------------------------------

BACKENDS = ("triton", "cpu", "cuda")


def _state_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in itertools.chain(module.parameters(), module.buffers()))


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
    autocast; and eval-mode BN folding cached until a parameter or buffer changes, so
    an eval forward launches only the fused kernels."""

    backend = "auto"  # "auto": CPU tensors -> the C++ CPU ops, CUDA tensors -> Triton
                      # (the C++ extension's CUDA kernels where Triton is not installed)
    sync_bn = False   # True: training BN statistics over the default process group

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
        if any(m.training for m in self.modules() if isinstance(m, SUPPORTED_NORMS)):
            return False
        return not (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if any(type(norm) not in SUPPORTED_NORMS for norm in self._norm_slots().values()):
            check_norms(self)  # raises, naming them
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if self._eval_fusion(x):
            return self._eval_forward(x, self._ops(x), dtype)
        return self._train_forward(x, self._ops(x), dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        """Model-level input checks (the stem's); the ops check the rest."""

    def _norm_slots(self) -> dict:
        """{path within this module: norm layer} of the BNs the fused ops implement."""
        raise NotImplementedError

    def _folded(self, fold, dtype: Optional[torch.dtype]):
        if torch.compiler.is_compiling():  # traced once; the compiler fuses the folding
            return fold(self, dtype)
        key = (_state_key(self), dtype)
        if getattr(self, "_fold_cache", (None,))[0] != key:
            self._fold_cache = (key, fold(self, dtype))
        return self._fold_cache[1]


class FusedBlock(_FusedModule, ResBottleneckBlock):
    """ResBottleneckBlock through the fused ops: eval = BN folded from running
    statistics (3 or 4 launches), train = batch statistics with autograd."""

    def _norm_slots(self) -> dict:
        f = self.f
        slots = {"f.a.1": f.a[1], "f.b.1": f.b[1], "f.c.1": f.c[1]}
        if self.proj is not None:
            slots["proj.1"] = self.proj[1]
        return slots

    def _train_forward(self, x, fused_ops, dtype):
        return block_forward_train(x, self, fused_ops, dtype, self.sync_bn)

    def _eval_forward(self, x, fused_ops, dtype):
        return block_forward_eval(x, self._folded(fold_block, dtype), fused_ops)


class FusedStem(_FusedModule, Stem):
    """The stem (3x3 stride-2 conv, BN, ReLU) as one conv_bn_act in eval; in training
    conv_bn_train plus one pass that writes relu(BN(y)) (the blocks read a real input)."""

    def _check_input(self, x: torch.Tensor) -> None:
        channels = self[0].in_channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"the model takes (N, {channels}, H, W) images, got shape "
                             f"{tuple(x.shape)}")

    def _norm_slots(self) -> dict:
        return {"1": self[1]}

    def _train_forward(self, x, fused_ops, dtype):
        out = _conv_bn_train(fused_ops, x, self[0], self[1], dtype, self.sync_bn)
        return fused_ops.bn_add_relu(out.y, out.scale, out.shift)

    def _eval_forward(self, x, fused_ops, dtype):
        folded = self._folded(lambda stem, dt: FoldedConv.of(stem[0], stem[1], dt), dtype)
        return fused_ops.conv_bn_act(x, folded.weight, folded.scale, folded.shift,
                                     stride=folded.stride)


_FUSED = {Stem: FusedStem, ResBottleneckBlock: FusedBlock}


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))


def _set_options(model: nn.Module, backend: str, sync_bn: bool) -> None:
    for module in model.modules():
        if isinstance(module, _FusedModule):
            module.backend = backend
            module.sync_bn = sync_bn


def fused_model(name_or_params: str | RegNetParams, backend: str = "auto",
                num_classes: int = 1000, sync_bn: bool = False) -> RegNet:
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

    sync_bn: training-mode BN takes the batch statistics of every rank of the default
    process group (torch.distributed initialized, more than one rank), as nn.SyncBatchNorm
    does, while the modules stay BatchNorm2d: so it runs on CPU (gloo) too, where torch's
    SyncBatchNorm does not. `nn.SyncBatchNorm.convert_sync_batchnorm(model)` works as well
    (each SyncBatchNorm syncs over its own process_group).
    """
    _check_backend(backend)
    model = RegNet(resolve_params(name_or_params), num_classes, stem=FusedStem, block=FusedBlock)
    _set_options(model, backend, sync_bn)
    return model


def fuse(model: nn.Module, backend: str = "auto", sync_bn: bool = False) -> nn.Module:
    """Make a reference RegNet (or any model built from the reference stem and
    blocks) run through the fused ops, in place: parameters and buffers are kept.
    sync_bn: as for `fused_model`. A norm layer the fused ops do not implement (anything
    but BatchNorm2d and SyncBatchNorm) raises a TypeError naming it."""
    _check_backend(backend)
    for module in model.modules():
        if type(module) in _FUSED:
            module.__class__ = _FUSED[type(module)]
    _set_options(model, backend, sync_bn)
    try:
        check_norms(model)
    except TypeError:
        unfuse(model)  # the model as it was given
        raise
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse` in place (for debugging: the plain PyTorch forward again)."""
    reference = {fused: ref for ref, fused in _FUSED.items()}
    for module in model.modules():
        if type(module) in reference:
            for attr in ("_fold_cache", "backend", "sync_bn"):
                module.__dict__.pop(attr, None)
            module.__class__ = reference[type(module)]
    return model
