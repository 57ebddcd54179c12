"""The types and layouts both backends' ops share: their results, the BatchNorm they
read, the rows of the BN statistics tensor, output shapes and accumulation dtypes.

Imports only torch: the Triton and the C++ backends (regnet_kernels.backends) build on it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Rows of the (5, C) BN statistics tensor that the training conv ops return (Triton's
# bn_finalize writes them; the C++ kernels write the same layout).
STAT_ROWS = ("mean", "inv_std", "scale", "shift", "var")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for activations of `dtype`, which is also the dtype of
    every per-channel vector that goes with them (BN scale/shift, statistics and
    partials, SE squeeze sums and gate, weight gradients): float64 for float64
    activations, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_size(size: int, k: int, stride: int) -> int:
    """Output height (or width) of a k x k conv with padding k // 2."""
    return (size + 2 * (k // 2) - k) // stride + 1


def new_activation(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized NHWC (channels_last) activation."""
    return torch.empty((n, c, h, w), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def check_count(count: int) -> None:
    if count < 2:
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got {count}")


class TrainOutput(NamedTuple):
    """The lazy BN output of `conv_bn_train`: raw conv output y and the per-channel batch
    statistics (var biased; float32, float64 for a float64 y); the BN output is
    v = y * scale + shift. y stands for v in autograd (docs/ops.md): pass it only to
    ops that take (y, scale, shift). The statistics are not differentiable."""
    y: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    var: torch.Tensor


class BatchNormArgs(NamedTuple):
    """What a training-mode BN reads and updates (any may be None but eps/momentum)."""
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    eps: float
    momentum: Optional[float]

    @classmethod
    def of(cls, bn: torch.nn.BatchNorm2d) -> "BatchNormArgs":
        """From a module, honouring its `affine` and `track_running_stats`."""
        track = bn.track_running_stats
        return cls(bn.weight, bn.bias, bn.running_mean if track else None,
                   bn.running_var if track else None, bn.num_batches_tracked if track else None,
                   float(bn.eps), None if bn.momentum is None else float(bn.momentum))

    def frozen_stats(self, channels: int, ref: torch.Tensor) -> torch.Tensor:
        """(5, C) STAT_ROWS from the running statistics (an eval-mode BN: frozen), in
        ref's accumulation dtype, detached: BN's gamma/beta gradients come from the
        conv op's backward, not through these."""
        if self.running_mean is None:
            raise ValueError("a frozen (eval-mode) BatchNorm needs running statistics")
        dtype = acc_dtype(ref.dtype)
        with torch.no_grad():
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
            inv_std = torch.rsqrt(var + self.eps)
            scale = inv_std if self.weight is None else inv_std * self.weight.to(dtype)
            shift = -mean * scale if self.bias is None else self.bias.to(dtype) - mean * scale
            return torch.stack([mean, inv_std, scale, shift, var]).reshape(5, channels)
