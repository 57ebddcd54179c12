"""Fused RegNets: the reference builder given fused stem and blocks.

Eval mode: BN folded to per-channel scale/shift on every forward (`fold_block`, a few
foreach launches: nothing to go stale; `freeze` keeps one), then a Y block is 4 kernel
launches and an X block 3 (`block_forward_eval`); the C++ CPU backend takes a kept folding
packed for oneDNN instead (the BN scale in the weights: `pack_block`, run by its
`PackedBlock`). Training mode: BN batch statistics computed in the conv epilogues,
differentiable (`block_forward_train`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import dispatch
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
        """One (conv, BN) pair folded, as `fold_convs` folds them."""
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
    (`regnet_kernels.ops` for Triton, `regnet_kernels.ops.cpp` for the C++ ops;
    `dispatch.ops_for(backend)` gives either).
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
    autocast; and eval-mode BN folding, redone by every eval forward (no version counter
    sees a change through `.data` or of a BN's eps, so a cache would go stale) unless
    `freeze` asked for one folding, kept per (autocast dtype, device)."""

    backend = "auto"  # "auto": CPU tensors -> the C++ CPU ops, CUDA tensors -> Triton
                      # (the C++ extension's CUDA kernels where Triton is not installed)
    sync_bn = False   # True: training BN statistics over the default process group

    def _ops(self, x: torch.Tensor):
        """The module of the fused ops that run x (`dispatch.resolve`, `dispatch.ops_for`)."""
        return dispatch.ops_for(dispatch.resolve(self.backend, x.device, type(self).__name__))

    def extra_repr(self) -> str:
        if self.backend != "auto":
            return f"backend={self.backend!r}"
        on_cuda = dispatch.resolve("auto", "cuda")
        return f"backend='auto' (CPU tensors: 'cpu', CUDA tensors: {on_cuda!r})"

    def _eval_fusion(self, x: torch.Tensor, norms) -> bool:
        """The eval fusion (BN folded, no autograd) when every BN (`norms`, the
        `_norm_slots` values) is in eval mode and no gradient is needed; otherwise the
        differentiable path, in which each BN follows its own mode (frozen BN in a training
        model, or gradients through eval BN)."""
        if any(norm.training for norm in norms):
            return False
        return not (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _folded(self, dtype: Optional[torch.dtype], x: torch.Tensor, fused_ops):
        """This module's eval weights for x: folded now, or the folding `freeze` keeps. A
        kept folding is handed to the backend's packer where it has one (`pack_block` /
        `pack_conv`: the BN scale folded into the weights, reordered once into the layout
        its convolutions want), so a frozen model packs once; packing every forward would
        cost more than it saves. oneDNN picks the layout for an input shape, so a packing is
        kept per shape, one at a time: a new shape repacks and replaces it (with another
        shape oneDNN would reorder the weights on every call, 2.7x slower at regnety_8gf b4)."""
        frozen = self.__dict__.get("_frozen")
        if frozen is None:
            return self._fold(dtype)
        key = (dtype, x.device, fused_ops.__name__)
        pack = getattr(fused_ops, self._packer, None)
        if pack is not None:
            key += (tuple(x.shape),)
        if key not in frozen:
            for other_shape in [k for k in frozen if k[:3] == key[:3]]:
                del frozen[other_shape]
            frozen[key] = self._fold(dtype) if pack is None else pack(self._fold(dtype), x)
        return frozen[key]

    def train(self, mode: bool = True):
        if mode:  # a model that trains changes its weights: it is no longer frozen
            self.__dict__.pop("_frozen", None)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        norms = self._norm_slots().values()
        if any(type(norm) not in SUPPORTED_NORMS for norm in norms):
            check_norms(self)  # raises, naming them
        dtype = _autocast_dtype(x)
        x = _cast(x, dtype)
        if self._eval_fusion(x, norms):
            return self._eval_forward(x, self._ops(x), dtype)
        return self._train_forward(x, self._ops(x), dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        """Model-level input checks (the stem's); the ops check the rest."""

    def _norm_slots(self) -> dict:
        """{path within this module: norm layer} of the BNs the fused ops implement."""
        raise NotImplementedError

class FusedBlock(_FusedModule, ResBottleneckBlock):
    """ResBottleneckBlock through the fused ops: eval = BN folded from running
    statistics (3 or 4 launches), train = batch statistics with autograd."""

    _packer = "pack_block"  # the backend function that packs its eval weights, where one does

    def _norm_slots(self) -> dict:
        # Through _modules: every forward runs this, and nn.Sequential's indexing is slow.
        f = self._modules["f"]._modules
        slots = {f"f.{conv}.1": f[conv]._modules["1"] for conv in "abc"}
        proj = self._modules.get("proj")
        if proj is not None:
            slots["proj.1"] = proj._modules["1"]
        return slots

    def _train_forward(self, x, fused_ops, dtype):
        return block_forward_train(x, self, fused_ops, dtype, self.sync_bn)

    def _fold(self, dtype):
        return fold_block(self, dtype)

    def _eval_forward(self, x, fused_ops, dtype):
        weights = self._folded(dtype, x, fused_ops)
        if isinstance(weights, FoldedBlock):
            return block_forward_eval(x, weights, fused_ops)
        return weights(x)  # packed by the backend, which runs them


class FusedStem(_FusedModule, Stem):
    """The stem (3x3 stride-2 conv, BN, ReLU) as one conv_bn_act in eval; in training
    conv_bn_train plus one pass that writes relu(BN(y)) (the blocks read a real input)."""

    _packer = "pack_conv"  # the backend function that packs its eval weights, where one does

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

    def _fold(self, dtype):
        return FoldedConv.of(self[0], self[1], dtype)

    def _eval_forward(self, x, fused_ops, dtype):
        weights = self._folded(dtype, x, fused_ops)
        if not isinstance(weights, FoldedConv):
            return weights(x)  # packed by the backend, which runs them
        return fused_ops.conv_bn_act(x, weights.weight, weights.scale, weights.shift,
                                     stride=weights.stride)


_FUSED = {Stem: FusedStem, ResBottleneckBlock: FusedBlock}


def resolved_backend(model: nn.Module, device: torch.device | str) -> str:
    """Which fused ops `model` runs for tensors on device: "triton", "cpu" (the C++ CPU ops)
    or "cuda" (the C++ extension's CUDA kernels), as its `backend=` resolves ("auto": by
    the device). Raises ValueError for a model without fused modules or whose modules
    resolve differently."""
    resolved = {dispatch.resolve(m.backend, device, type(m).__name__)
                for m in model.modules() if isinstance(m, _FusedModule)}
    if not resolved:
        raise ValueError(f"resolved_backend: {type(model).__name__} has no fused modules "
                         "(build it with fused_model() or convert it with fuse())")
    if len(resolved) > 1:
        raise ValueError(f"resolved_backend: the fused modules run different backends on "
                         f"{device}: {sorted(resolved)}")
    return resolved.pop()


def _set_options(model: nn.Module, backend: str, sync_bn: bool) -> None:
    for module in model.modules():
        if isinstance(module, _FusedModule):
            module.backend = backend
            module.sync_bn = sync_bn


def _store_weights_channels_last(model: nn.Module) -> None:
    """A new model's k x k conv weights in channels_last memory format: the layout every
    backend reads them in (the implicit GEMM's (kh, kw, c_in) order, oneDNN's NHWC convs),
    so the fold of each forward (`fold_convs`) does not permute them every call. Values
    and state_dict are unchanged; loading a checkpoint copies into this layout."""
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1):
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)


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
    dispatch.check_name(backend)
    model = RegNet(resolve_params(name_or_params), num_classes, stem=FusedStem, block=FusedBlock)
    _set_options(model, backend, sync_bn)
    _store_weights_channels_last(model)
    return model


def _conv_bn_mismatch(layers: nn.Module, k: int, relu: bool) -> Optional[str]:
    """Why layers is not (k x k Conv2d with 'same' zero padding and no bias, BatchNorm2d
    with running statistics[, ReLU]), or None."""
    expected = "conv, BN, ReLU" if relu else "conv, BN"
    if not isinstance(layers, nn.Sequential) or len(layers) != (3 if relu else 2):
        return f"expected ({expected}), found {type(layers).__name__}"
    conv, bn = layers[0], layers[1]
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (k, k) and conv.bias is None
            and conv.padding == (k // 2, k // 2) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and conv.stride[0] == conv.stride[1]):
        return f"{conv} is not a {k}x{k} conv with 'same' zero padding and no bias"
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or not bn.affine:
        return f"{bn} is not an affine BatchNorm2d with running statistics"
    if relu and type(layers[2]) is not nn.ReLU:
        return f"{layers[2]} is not a ReLU"
    return None


def _block_mismatch(block: nn.Module) -> Optional[str]:
    """Why block does not compute relu(proj(x) or x + c(se(b(a(x))))) as the fused block
    does (torchvision's ResBottleneckBlock: same structure, same state_dict keys), or None."""
    f = getattr(block, "f", None)
    if not isinstance(f, nn.Module) or not hasattr(block, "proj"):
        return "no residual branch `f` and shortcut `proj`"
    if list(f._modules) not in (["a", "b", "c"], ["a", "b", "se", "c"]):
        return f"its branch f has parts {list(f._modules)}, not a, b[, se], c"
    parts = [("f.a", f.a, 1, True), ("f.b", f.b, 3, True), ("f.c", f.c, 1, False)]
    if block.proj is not None:
        parts.append(("proj", block.proj, 1, False))
    for name, layers, k, relu in parts:
        why = _conv_bn_mismatch(layers, k, relu)
        if why:
            return f"{name}: {why}"
    if any(layers[0].groups != 1 for name, layers, _, _ in parts if name != "f.b") or \
            f.a[0].stride != (1, 1) or f.c[0].stride != (1, 1):
        return "its 1x1 convs a and c must be dense with stride 1"
    se = getattr(f, "se", None)
    if se is not None:
        convs = [getattr(se, name, None) for name in ("fc1", "fc2")]
        if not all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) and c.bias is not None
                   for c in convs):
            return "its SE is not fc1, fc2: 1x1 convs with bias"
        if type(getattr(se, "activation", nn.ReLU())) is not nn.ReLU or \
                type(getattr(se, "scale_activation", nn.Sigmoid())) is not nn.Sigmoid:
            return "its SE is not ReLU then sigmoid"
    if type(getattr(block, "activation", nn.ReLU())) is not nn.ReLU:
        return f"its output activation {block.activation} is not a ReLU"
    return None


# Other libraries' RegNet modules with the reference's structure and state_dict keys
# (torchvision's), by class name: the fused class, and why one is not fusable (or None).
_LOOKALIKES = {
    "ResBottleneckBlock": (FusedBlock, _block_mismatch),
    "SimpleStemIN": (FusedStem, lambda stem: _conv_bn_mismatch(stem, 3, relu=True)),
}


def fuse(model: nn.Module, backend: str = "auto", sync_bn: bool = False) -> nn.Module:
    """Make a RegNet run through the fused ops, in place: parameters and buffers are kept.

    Fuses the reference stem and blocks (`reference_model`, or any model built from them)
    and torchvision's RegNets (`torchvision.models.regnet_*`: their SimpleStemIN and
    ResBottleneckBlocks, checked to have the reference's structure). Raises ValueError, before
    changing anything, for a block of those names it cannot compute, or when it finds
    nothing to fuse (a timm or pycls model: load its state_dict into `fused_model`).
    sync_bn: as for `fused_model`. A norm layer the fused ops do not implement (anything
    but BatchNorm2d and SyncBatchNorm) raises a TypeError naming it, the model left as it
    was given. The parameters keep their storage (FSDP / DDP views stay valid); where
    nothing holds views of them, `model.to(memory_format=torch.channels_last)` stores the
    3x3 conv weights as the kernels read them (one permute less per conv and forward)."""
    dispatch.check_name(backend)
    plan = []
    for path, module in model.named_modules():
        fused_class = _FUSED.get(type(module))
        name = type(module).__name__
        if fused_class is None and name in _LOOKALIKES and not isinstance(module, _FusedModule):
            fused_class, mismatch = _LOOKALIKES[name]
            why = mismatch(module)
            if why:
                raise ValueError(f"fuse: {path or 'the model'} ({type(module).__module__}."
                                 f"{name}) is not what the fused ops compute: {why}")
        if fused_class is not None:
            plan.append((module, fused_class))
    if not plan and not any(isinstance(m, _FusedModule) for m in model.modules()):
        raise ValueError(
            f"fuse: found no RegNet stem or block in {type(model).__name__}. fuse converts "
            "regnet_kernels' reference models and torchvision's RegNets; for a timm or pycls "
            "RegNet, load its weights into a fused model: model = rk.fused_model(name); "
            "rk.load_checkpoint(model, other.state_dict())")
    for module, fused_class in plan:
        module._unfused_class = type(module)
        module.__class__ = fused_class
    _set_options(model, backend, sync_bn)
    try:
        check_norms(model)
    except TypeError:
        unfuse(model)  # the model as it was given
        raise
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse` in place (for debugging: the plain PyTorch forward again); the modules of
    `fused_model` become the reference's."""
    reference = {fused: ref for ref, fused in _FUSED.items()}
    for module in model.modules():
        if isinstance(module, _FusedModule):
            original = module.__dict__.pop("_unfused_class", None) or reference.get(type(module))
            if original is not None:
                for attr in ("backend", "sync_bn", "_frozen"):
                    module.__dict__.pop(attr, None)
                module.__class__ = original
    return model


def freeze(model: nn.Module) -> nn.Module:
    """For inference: each fused module folds its BNs once (at its next eval forward, per
    autocast dtype and device) and reuses that folding, instead of refolding in every eval
    forward (a few ms per forward on a CPU; ~6 small launches per block on a GPU). The
    folding is then a snapshot: later changes of the weights, statistics or BN eps may not be
    seen until `unfreeze(model)`; `model.train()` unfreezes. Returns model."""
    fused = [m for m in model.modules() if isinstance(m, _FusedModule)]
    if not fused:
        raise ValueError(f"freeze: {type(model).__name__} has no fused modules (build it with "
                         "fused_model() or convert it with fuse())")
    for module in fused:
        module._frozen = {}
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo `freeze`: every eval forward folds the BNs again. Returns model."""
    for module in model.modules():
        if isinstance(module, _FusedModule):
            module.__dict__.pop("_frozen", None)
    return model
