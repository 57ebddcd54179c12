"""The fused ops of the C++ extension (`torch.ops.regnet_kernels.*`): its CPU kernels
and its CUDA kernels (csrc/cuda; the dispatcher picks by device).

Same Python signatures, argument checks and results as the Triton functions in
`regnet_kernels.ops` (float32, bfloat16, float16; any input layout, channels_last
output). The extension is built on the first call (see `build.py`; the CUDA
kernels on the first call with CUDA tensors); importing this module builds nothing.

Eval (BN folded): conv_bn_act, se_excite, conv1x1_gate_residual. The fused models' eval
forward on CPU tensors (float32, bfloat16) of a frozen model (`regnet_kernels.freeze`) runs
`pack_block` / `pack_conv`'s weights instead: each BN's scale folded into its conv weight,
prepacked in oneDNN's layout once per kept fold,
and conv, bias, ReLU and the residual add as one oneDNN primitive (`PackedBlock`, through
the ops' .folded overloads); a block runs a large batch a few images at a time, so that its
intermediates stay in the L2 caches (`choose_images_per_chunk`).
Training (BN from batch statistics, differentiable, deterministic):
conv_bn_train, se_squeeze, se_excite, bn_add_relu; with these,
`regnet_kernels.models.fused.block_forward_train(x, block, block_ops=cpp)` trains
a block on the CPU or a CUDA device. Their autograd follows the Triton ops' lazy BN output
convention (see `regnet_kernels.ops.conv_bn_train`): the raw conv output y
stands for v = y * scale + shift, and its gradient is dL/dv.

The SE squeeze sums of `conv_bn_act(..., squeeze=True)` are (N, T, C) partial sums over row
tiles, as the Triton op's: T = 1 on the CPU, the row tiles of the CUDA kernels' tile choice
(`cuda_tiles.squeeze_row_tiles`) on CUDA; `se_squeeze`'s are (N, 1, C) on both.

Their fake implementations and se_excite's autograd formula are in `fakes.py`; the other
training ops' autograd is in C++ (csrc/autograd.cpp).
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ...ops.checks import (check_bn_add_relu_args, check_conv_bn_act_args,
                           check_conv_bn_train_args, check_gate_residual_args,
                           check_se_excite_args, check_se_squeeze_args, op_errors)
from ...ops.dispatch import BACKENDS
from ...ops.sync_batchnorm import ConvBnPrimitives, sync_conv_bn_train
from ...ops.types import BatchNormArgs, TrainOutput
from . import build, fakes


def _ops():
    """torch.ops.regnet_kernels, building and loading the extension on first use."""
    if not fakes.registered:
        build.load()
        fakes.register()
    return torch.ops.regnet_kernels


def load_library() -> None:
    """Builds (first use only) and loads the extension with its fakes now: the dispatcher
    calls this before the first op runs, also when torch.compile traces that first call
    (a build cannot be traced)."""
    _ops()


def available() -> tuple[bool, str]:
    """(True, "") when the C++ CPU backend can run (builds and loads it if needed, with its
    fakes and autograd formulas: call it before torch.compile traces the ops, since the
    build cannot be traced), else (False, reason)."""
    ok, reason = build.available()
    if ok:
        fakes.register()
    return ok, reason


def cpu_status() -> tuple[bool, str]:
    """The "cpu" backend's (usable, reason) for the dispatcher's table."""
    usable, reason = available()  # builds the extension on first use
    return usable, reason or "C++ extension built and loaded"


def cuda_status() -> tuple[bool, str]:
    """The "cuda" backend's (usable, reason) for the dispatcher's table."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    usable, reason = build.available(cuda=True)  # builds the CUDA kernels on first use
    return usable, reason or "CUDA kernels built and loaded"


# ---------------------------------------------------------------------------
# The functions: the Triton functions' checks, with the extension's device checks
# ---------------------------------------------------------------------------


def _check_device(name: str, t: torch.Tensor) -> None:
    """CPU kernels, or the CUDA kernels (built and loaded on first use)."""
    if t.device.type == "cuda":
        ok, reason = build.available(cuda=True)
        if not ok:
            raise RuntimeError(f"{name} is on {t.device}, and the C++ extension's CUDA kernels "
                               f"cannot run: {reason}")
    elif t.device.type not in ("cpu", "meta"):
        raise RuntimeError(f"{name} is on {t.device}: the C++ extension runs CPU and CUDA tensors")


# What every op here passes to the shared argument checks (`ops.checks`): its device check and
# the dtypes the backend table declares (no float64 kernels).
CPP_CHECKS = dict(device_check=_check_device, dtypes=BACKENDS["cpu"].dtypes)


@op_errors("conv_bn_act")
def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, stride: int = 1, groups: int = 1, relu: bool = True, squeeze: bool = False):
    """Fused conv (k x k, padding k // 2) + folded BN + optional ReLU (CPU or CUDA).

    As `regnet_kernels.ops.conv_bn_act`; with squeeze=True the sums are (N, 1, C_out).
    """
    check_conv_bn_act_args(x, weight, scale, shift, stride, groups, **CPP_CHECKS)
    ops = _ops()
    if squeeze:
        return ops.conv_bn_act_squeeze(x, weight, scale, shift, stride, groups, relu)
    return ops.conv_bn_act(x, weight, scale, shift, stride, groups, relu)


@op_errors("se_excite")
def se_excite(sums: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """gate = sigmoid(W2 relu(W1 mean + b1) + b2) from SE squeeze sums (CPU or CUDA).

    As `regnet_kernels.ops.se_excite`: sums (N, C) or (N, T, C) float32; returns (N, C) float32.
    Differentiable in sums and the SE weights (the Triton op's backward formula).
    """
    sums = check_se_excite_args(sums, hw, w1, b1, w2, b2, **CPP_CHECKS)
    return _ops().se_excite(sums.contiguous(), int(hw), w1, b1, w2, b2)


@op_errors("conv1x1_gate_residual")
def conv1x1_gate_residual(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    shortcut: torch.Tensor, *, gate: Optional[torch.Tensor] = None,
    proj_weight: Optional[torch.Tensor] = None, proj_scale: Optional[torch.Tensor] = None,
    proj_shift: Optional[torch.Tensor] = None, proj_stride: int = 1,
) -> torch.Tensor:
    """relu(conv1x1(x * gate) * scale + shift + shortcut branch) (CPU or CUDA).

    As `regnet_kernels.ops.conv1x1_gate_residual` (identity or projection shortcut).
    """
    check_gate_residual_args(x, weight, scale, shift, shortcut, gate, proj_weight, proj_scale,
                             proj_shift, proj_stride, **CPP_CHECKS)
    return _ops().conv1x1_gate_residual(x, weight, scale, shift, gate, shortcut, proj_weight,
                                        proj_scale, proj_shift,
                                        proj_stride if proj_weight is not None else 1)


# ---------------------------------------------------------------------------
# Eval with prepacked weights (the fused models' eval forward on the CPU)
# ---------------------------------------------------------------------------

#: The activation dtypes of the oneDNN path; float16 runs the ops above.
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedConv:
    """A conv with its eval BN folded into it: weight * scale, and the shift as a bias (in the
    activations' dtype, as oneDNN takes it). The weight is prepacked: in oneDNN's preferred
    layout for the input shape and thread count it was packed for (another shape still runs:
    oneDNN then reorders it on every call, so the fused models repack for a new shape)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    groups: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """relu(conv(x) + bias): the stem."""
        return _ops().conv_bn_act.folded(x, self.weight, self.bias, self.stride, self.groups,
                                         True)


@dataclass(frozen=True)
class PackedBlock:
    """A block's packed convs a, b, c, the optional projection and the SE weights, run on
    `images_per_chunk` images at a time (see `pack_block`)."""

    a: PackedConv
    b: PackedConv
    c: PackedConv
    proj: Optional[PackedConv]
    se: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    images_per_chunk: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The eval block over chunks of images (balanced sizes), their outputs concatenated."""
        chunks = -(-x.shape[0] // self.images_per_chunk)
        if chunks <= 1:
            return self._run(x)
        return torch.cat([self._run(part) for part in torch.tensor_split(x, chunks)])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The eval block: 3 oneDNN primitives (4 with a projection); with SE, the squeeze
        pass over b and the gate's pass over c's input."""
        ops = _ops()
        a = ops.conv_bn_act.folded(x, self.a.weight, self.a.bias, 1, 1, True)
        b_args = (self.b.weight, self.b.bias, self.b.stride, self.b.groups, True)
        gate = None
        if self.se is None:
            b = ops.conv_bn_act.folded(a, *b_args)
        else:
            b, sums = ops.conv_bn_act_squeeze.folded(a, *b_args)
            gate = ops.se_excite(sums, b.shape[2] * b.shape[3], *self.se)
        proj = self.proj
        return ops.conv1x1_gate_residual.folded(
            b, self.c.weight, self.c.bias, gate, x, None if proj is None else proj.weight,
            None if proj is None else proj.bias, 1 if proj is None else proj.stride)


def _packs(x: torch.Tensor) -> bool:
    """Whether the oneDNN path runs x: CPU float32 / bfloat16 tensors, outside torch.compile's
    trace (which cannot hold a oneDNN tensor; its graph runs the folded-scale ops)."""
    return (x.device.type == "cpu" and x.dtype in PACKED_DTYPES
            and not torch.compiler.is_compiling())


def _pack(folded, input_shape: list[int]) -> PackedConv:
    """A FoldedConv's weight * scale (rounded once to the weight's dtype), prepacked."""
    scale = folded.scale.view(-1, 1, 1, 1)
    weight = (folded.weight.float() * scale).to(folded.weight.dtype)
    pad = weight.shape[-1] // 2
    weight = torch.ops.mkldnn._reorder_convolution_weight(
        weight, [pad, pad], [folded.stride] * 2, [1, 1], folded.groups, input_shape)
    return PackedConv(weight, folded.shift.to(weight.dtype), folded.stride, folded.groups)


def pack_conv(folded, x: torch.Tensor):
    """A FoldedConv (the stem's) prepacked for input x (`PackedConv`), or `folded` itself
    where the oneDNN path does not run x (`_packs`)."""
    return _pack(folded, list(x.shape)) if _packs(x) else folded


@functools.cache
def l2_cache_bytes() -> int:
    """One core's L2 cache in bytes (Linux sysfs), or 1 MiB where it cannot be read."""
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as level, \
                    open(os.path.join(index, "type")) as kind, \
                    open(os.path.join(index, "size")) as size:
                if level.read().strip() != "2" or kind.read().strip() == "Instruction":
                    continue
                text = size.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[-1:] in units and text[:-1].isdigit():
            return int(text[:-1]) * units[text[-1]]
        if text.isdigit():
            return int(text)
    return 1 << 20


#: glibc's largest mmap threshold: a larger intermediate is a fresh mapping on every call.
MMAP_THRESHOLD_MAX = 32 << 20


def chunk_budget_bytes() -> int:
    """How much of conv b's output one chunk of a packed block may have: the L2 caches of the
    threads that run it, at most `MMAP_THRESHOLD_MAX`."""
    return min(l2_cache_bytes() * torch.get_num_threads(), MMAP_THRESHOLD_MAX)


def choose_images_per_chunk(b_shape: list[int], dtype: torch.dtype) -> int:
    """Images a packed block runs at a time, for conv b's output shape (N, C, H, W): as many
    as keep that output (the widest of the block's intermediates, read again by the squeeze,
    the gate and conv c) within `chunk_budget_bytes`, at least one, at most N. Chunks also
    keep the intermediates below glibc's mmap threshold: whole-batch ones were fresh mappings
    every forward, whose page faults were ~20% of regnety_8gf's frozen forward at batch 32
    on 2 cores."""
    n, c, h, w = b_shape
    per_image = c * h * w * dtype.itemsize
    return max(1, min(n, chunk_budget_bytes() // max(1, per_image)))


def pack_block(folded, x: torch.Tensor):
    """A FoldedBlock prepacked for input x (`PackedBlock`), or `folded` itself where the
    oneDNN path does not run x (`_packs`). The convs are packed for a chunk's input shape
    (`choose_images_per_chunk`); a last, smaller chunk runs with the same packing."""
    if not _packs(x):
        return folded
    n, c_in, h, w = x.shape
    w_b, stride = folded.a.weight.shape[0], folded.b.stride
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    per_chunk = choose_images_per_chunk([n, w_b, h_out, w_out], x.dtype)
    chunks = max(1, -(-n // per_chunk))  # one for an empty batch
    packed_n = -(-n // chunks)  # the largest of tensor_split's balanced chunks
    x_shape = [packed_n, c_in, h, w]
    return PackedBlock(
        a=_pack(folded.a, x_shape), b=_pack(folded.b, [packed_n, w_b, h, w]),
        c=_pack(folded.c, [packed_n, w_b, h_out, w_out]),
        proj=None if folded.proj is None else _pack(folded.proj, x_shape),
        se=folded.se, images_per_chunk=per_chunk)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@op_errors("conv_bn_train")
def conv_bn_train(x: torch.Tensor, weight: torch.Tensor, bn: BatchNormArgs | torch.nn.BatchNorm2d,
                  *, stride: int = 1, groups: int = 1, in_scale: Optional[torch.Tensor] = None,
                  in_shift: Optional[torch.Tensor] = None, in_relu: bool = False,
                  gate: Optional[torch.Tensor] = None, frozen: bool = False,
                  sync_group=None) -> TrainOutput:
    """Training-mode conv + BN with batch statistics, differentiable (CPU or CUDA).

    As `regnet_kernels.ops.conv_bn_train`: the conv reads relu?(x * in_scale + in_shift)
    * gate, y is the raw conv output (channels_last) standing for the BN output in
    autograd, the BN's running statistics are updated in place as nn.BatchNorm2d does,
    and gradients flow to x (dL/dv_prev when in_scale is given), weight, gate and the
    BN's weight and bias. frozen: BN as in eval mode (running statistics, not updated).
    sync_group: a process group whose ranks' statistics are merged (SyncBatchNorm).
    """
    args, c_out, count = check_conv_bn_train_args(x, weight, bn, stride, groups, in_scale, in_shift,
                                                 gate, frozen, **CPP_CHECKS)
    ops = _ops()

    def update_running(stats, count):
        if args.running_mean is not None:
            ops.bn_update_running(stats.detach(), count, args.running_mean, args.running_var,
                                  args.num_batches_tracked, args.momentum)

    if sync_group is not None and not frozen:
        prims = ConvBnPrimitives(ops.conv_bn_train, ops.conv_bn_train_backward, update_running)
        y, stats = sync_conv_bn_train(prims, sync_group, x, weight, stride, groups, in_scale,
                                      in_shift, in_relu, gate, args.weight, args.bias, args.eps)
        return TrainOutput(y, *stats.unbind(0))
    y, stats = ops.conv_bn_train(x, weight, stride, groups, in_scale, in_shift, in_relu, gate,
                                 args.weight, args.bias, args.eps,
                                 args.frozen_stats(c_out, x) if frozen else None)
    if not frozen:
        update_running(stats, count)
    return TrainOutput(y, *stats.unbind(0))


@op_errors("se_squeeze")
def se_squeeze(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-image channel sums of relu(y * scale + shift), fp32 (N, 1, C) (CPU or CUDA).

    As `regnet_kernels.ops.se_squeeze` (one row tile per image): y is a lazy BN output,
    its gradient is dL/dv, v = y * scale + shift.
    """
    check_se_squeeze_args(y, scale, shift, **CPP_CHECKS)
    return _ops().se_squeeze(y, scale, shift)


@op_errors("bn_add_relu")
def bn_add_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                shortcut: Optional[torch.Tensor] = None, sc_scale: Optional[torch.Tensor] = None,
                sc_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(y * scale + shift + shortcut'), shortcut' = shortcut or its BN affine (CPU or CUDA).

    As `regnet_kernels.ops.bn_add_relu`: y and a projection shortcut are lazy BN outputs.
    """
    check_bn_add_relu_args(y, scale, shift, shortcut, sc_scale, sc_shift, **CPP_CHECKS)
    return _ops().bn_add_relu(y, scale, shift, shortcut, sc_scale, sc_shift)


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "conv_bn_train", "se_squeeze",
           "bn_add_relu", "TrainOutput", "BatchNormArgs", "available"]
