"""BatchNorm finalize for training: per-channel batch statistics from the conv
epilogue's per-tile partials, the folded scale/shift the next kernel applies,
and (a separate, mutating op) the running-statistics update, exactly as
nn.BatchNorm2d does it.

Each row tile of the producing conv wrote, per channel, the tile's sum and its
centered sum of squares M2 = sum((y - tile_mean)^2). They are merged here with
Chan's parallel update in a fixed order: no cancellation from E[y^2] - E[y]^2,
and no atomics, so the result is bit-identical run to run.

    mean, var = merged statistics (biased var)           over count = N*H*W rows
    inv_std   = 1 / sqrt(var + eps)
    scale     = gamma * inv_std,  shift = beta - mean * scale
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
with f = momentum, or 1 / num_batches_tracked (after its increment) when
momentum is None (cumulative average). num_batches_tracked is incremented too.
The update is its own op because autograd formulas need functional ops.
Everything runs in the partials' dtype: float32, or float64 for a float64 model.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._triton import tl, triton
from ._implicit_gemm import acc_constexpr, acc_dtype, check_device, check_same

BLOCK_C = 128
STAT_ROWS = ("mean", "inv_std", "scale", "shift", "var")


class BatchStats(NamedTuple):
    """Per-channel results of a BN finalize (var is the biased batch variance), in the
    partials' dtype (float32; float64 for float64 activations)."""
    mean: torch.Tensor
    inv_std: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    var: torch.Tensor


@triton.jit
def _bn_finalize_kernel(sum_ptr, m2_ptr, gamma_ptr, beta_ptr, stats_ptr,
                        C, T, count, rows_per_tile,
                        eps: tl.float64,  # passed exactly, rounded to ACC_DTYPE here
                        AFFINE: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    sum_row = sum_ptr + c
    m2_row = m2_ptr + c
    for t in range(0, T):
        n_t = tl.minimum(rows_per_tile, count - t * rows_per_tile).to(ACC_DTYPE)
        s_t = tl.load(sum_row, mask=c_ok, other=0.0)
        m2_t = tl.load(m2_row, mask=c_ok, other=0.0)
        sum_row += C  # pointer arithmetic: 64-bit however many tiles
        m2_row += C
        delta = s_t / n_t - mean
        n_new = n + n_t
        mean += delta * (n_t / n_new)
        m2 += m2_t + delta * delta * (n * n_t / n_new)
        n = n_new
    var = m2 / n
    inv_std = 1.0 / tl.sqrt(var + tl.full((BLOCK_C,), eps, ACC_DTYPE))
    scale = inv_std
    shift = -mean * inv_std
    if AFFINE:
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        scale = gamma * inv_std
        shift = beta - mean * scale
    # rows of stats: STAT_ROWS
    tl.store(stats_ptr + c, mean, mask=c_ok)
    tl.store(stats_ptr + C + c, inv_std, mask=c_ok)
    tl.store(stats_ptr + 2 * C + c, scale, mask=c_ok)
    tl.store(stats_ptr + 3 * C + c, shift, mask=c_ok)
    tl.store(stats_ptr + 4 * C + c, var, mask=c_ok)


@triton.jit
def _bn_running_update_kernel(stats_ptr, rmean_ptr, rvar_ptr, nbt_ptr, C, count,
                              momentum: tl.float64,  # passed exactly, rounded to ACC_DTYPE here
                              CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
                              ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if CUMULATIVE:
        f = 1.0 / (tl.load(nbt_ptr).to(ACC_DTYPE) + 1.0)
    else:
        f = tl.full((BLOCK_C,), momentum, ACC_DTYPE)
    mean = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
    var = tl.load(stats_ptr + 4 * C + c, mask=c_ok, other=0.0)
    m = count.to(ACC_DTYPE)
    unbiased = var * (m / (m - 1.0))
    rmean = tl.load(rmean_ptr + c, mask=c_ok, other=0.0)
    rvar = tl.load(rvar_ptr + c, mask=c_ok, other=0.0)
    tl.store(rmean_ptr + c, ((1.0 - f) * rmean.to(ACC_DTYPE) + f * mean).to(rmean.dtype),
             mask=c_ok)
    tl.store(rvar_ptr + c, ((1.0 - f) * rvar.to(ACC_DTYPE) + f * unbiased).to(rvar.dtype),
             mask=c_ok)


def finalize_launch(tile_sum, tile_m2, count, rows_per_tile, weight, bias, eps) -> torch.Tensor:
    """Launch the finalize kernel; returns (5, C) rows STAT_ROWS in the partials' dtype."""
    t, c = tile_sum.shape
    out = torch.empty((len(STAT_ROWS), c), dtype=tile_sum.dtype, device=tile_sum.device)
    _bn_finalize_kernel[(triton.cdiv(c, BLOCK_C),)](
        tile_sum, tile_m2, weight, bias, out, c, t, count, rows_per_tile, eps,
        AFFINE=weight is not None, BLOCK_C=BLOCK_C, ACC_DTYPE=acc_constexpr(tile_sum.dtype))
    return out


@torch.library.custom_op("regnet_triton::bn_finalize", mutates_args=())
def _bn_finalize_op(tile_sum: torch.Tensor, tile_m2: torch.Tensor, count: int, rows_per_tile: int,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float) -> torch.Tensor:
    return finalize_launch(tile_sum, tile_m2, count, rows_per_tile, weight, bias, eps)


@_bn_finalize_op.register_fake
def _(tile_sum, tile_m2, count, rows_per_tile, weight, bias, eps):
    return tile_sum.new_empty((len(STAT_ROWS), tile_sum.shape[1]))


@torch.library.custom_op("regnet_triton::bn_update_running",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _bn_update_running_op(stats: torch.Tensor, count: int, running_mean: torch.Tensor,
                          running_var: torch.Tensor, num_batches_tracked: Optional[torch.Tensor],
                          momentum: Optional[float]) -> None:
    c = stats.shape[1]
    _bn_running_update_kernel[(triton.cdiv(c, BLOCK_C),)](
        stats, running_mean, running_var, num_batches_tracked, c, count,
        0.0 if momentum is None else momentum, CUMULATIVE=momentum is None, BLOCK_C=BLOCK_C,
        ACC_DTYPE=acc_constexpr(stats.dtype))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)


@_bn_update_running_op.register_fake
def _(stats, count, running_mean, running_var, num_batches_tracked, momentum):
    return None


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

    def update_running(self, stats: torch.Tensor, count: int) -> None:
        """Update the running statistics (if tracked) from (5, C) finalize output."""
        if self.running_mean is not None:
            _bn_update_running_op(stats.detach(), count, self.running_mean, self.running_var,
                                  self.num_batches_tracked, self.momentum)

    def check(self, channels: int, ref: torch.Tensor) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(self, name)
            if v is not None:
                if v.shape != (channels,):
                    raise ValueError(f"BN {name} must have shape ({channels},), got {tuple(v.shape)}")
                check_same(f"BN {name}", v, ref, "the activations", dtype=False)
        if (self.weight is None) != (self.bias is None):
            raise ValueError("pass both BN weight and bias, or neither")
        if (self.running_mean is None) != (self.running_var is None):
            raise ValueError("pass both running_mean and running_var, or neither")
        if self.running_mean is not None and self.momentum is None and self.num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")


def bn_finalize(tile_sum: torch.Tensor, tile_m2: torch.Tensor, count: int, rows_per_tile: int,
                bn: Optional[torch.nn.BatchNorm2d] = None, *, weight=None, bias=None,
                running_mean=None, running_var=None, num_batches_tracked=None,
                eps: float = 1e-5, momentum: Optional[float] = 0.1) -> BatchStats:
    """Batch statistics from per-tile partials; updates running statistics in place.
    Not differentiable: training with autograd goes through `conv_bn_train`.

    Args:
        tile_sum, tile_m2: (T, C) per-row-tile sums and centered sums of squares
            (as written by `conv_bn_stats`: float32, float64 for float64 activations,
            and the statistics are computed in that dtype); tile t covers rows
            [t * rows_per_tile, min(count, (t + 1) * rows_per_tile)).
        count: rows in all, N * H * W of the normalized tensor (> 1).
        bn: take weight, bias, running stats, eps and momentum from this module
            (its `track_running_stats` and `affine` are honoured); or pass them one by one.

    Returns:
        BatchStats(mean, inv_std, scale, shift, var), (C,) in the partials' dtype.
    """
    args = BatchNormArgs.of(bn) if bn is not None else BatchNormArgs(
        weight, bias, running_mean, running_var, num_batches_tracked, float(eps),
        None if momentum is None else float(momentum))
    for name, t in (("tile_sum", tile_sum), ("tile_m2", tile_m2)):
        if t.dim() != 2 or t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be a 2-D float32 or float64 (tiles, channels) "
                             f"tensor, got {tuple(t.shape)} {t.dtype}")
    check_device("tile_sum", tile_sum)
    check_same("tile_m2", tile_m2, tile_sum, "tile_sum")
    if tile_m2.shape != tile_sum.shape:
        raise ValueError(f"tile_m2 {tuple(tile_m2.shape)} and tile_sum {tuple(tile_sum.shape)} differ")
    t, c = tile_sum.shape
    check_count(count)
    if rows_per_tile < 1 or triton.cdiv(count, rows_per_tile) != t:
        raise ValueError(f"{t} tiles of {rows_per_tile} rows do not cover {count} rows")
    args.check(c, tile_sum)
    w, b = (None if v is None else v.detach() for v in (args.weight, args.bias))
    stats = _bn_finalize_op(tile_sum, tile_m2, int(count), int(rows_per_tile), w, b, args.eps)
    args.update_running(stats, int(count))
    return BatchStats(*stats.unbind(0))


def check_count(count: int) -> None:
    if count < 2:
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got {count}")
