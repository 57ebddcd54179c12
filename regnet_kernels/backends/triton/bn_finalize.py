"""BatchNorm finalize for training: per-channel batch statistics from the conv
epilogue's per-tile partials, the folded scale/shift the next kernel applies,
and (a separate, mutating op) the running-statistics update, exactly as
nn.BatchNorm2d does it.

Each row tile of the producing conv wrote, per channel, the tile's sum and its
centered sum of squares M2 = sum((y - tile_mean)^2). They are merged here in a
fixed order: blocks of tiles at once (the block's mean first, then its M2 =
sum M2_t + sum n_t (mean_t - block mean)^2), the blocks with Chan's parallel
update. No cancellation from E[y^2] - E[y]^2, and no atomics, so the result is
bit-identical run to run. Many tiles (a 1x1 conv at 112x112 and batch 256
writes 50,176) are first merged in groups by a wide grid, so that no program
walks them all.

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
import triton
import triton.language as tl

from ...ops.checks import check_batch_norm, check_same, op_errors
from ...ops.types import STAT_ROWS, BatchNormArgs, check_count
from .igemm import acc_constexpr, check_device

BLOCK_C = 128
# Tiles a finalize program loads at once; the group-merge pass's tiles and channels at once,
# and the tile count above which it runs (with at most ~4 programs per SM of a large GPU).
BLOCK_T = 16
MERGE_BLOCK_T, MERGE_BLOCK_C = 32, 64
MERGE_ABOVE_TILES = 256
MERGE_PROGRAMS = 528


class BatchStats(NamedTuple):
    """Per-channel results of a BN finalize (var is the biased batch variance), in the
    partials' dtype (float32; float64 for float64 activations)."""
    mean: torch.Tensor
    inv_std: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    var: torch.Tensor


@triton.jit
def _merge_tiles(sum_ptr, m2_ptr, c, c_ok, t_lo, t_hi, C, count, rows_per_tile,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(n, mean, M2) of channels c over the row tiles [t_lo, t_hi): BLOCK_T tiles at a time,
    each block's mean first and then its M2, the blocks merged in order (Chan)."""
    n = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_hi
        rows = tl.minimum(rows_per_tile, count - t * rows_per_tile)
        n_t = tl.where(t_ok, rows, 0).to(ACC_DTYPE)
        off = t.to(tl.int64)[:, None] * C + c[None, :]
        mask = t_ok[:, None] & c_ok[None, :]
        s_t = tl.load(sum_ptr + off, mask=mask, other=0.0)
        m2_t = tl.load(m2_ptr + off, mask=mask, other=0.0)
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(s_t, axis=0) / n_b
        d = tl.where(mask, s_t / tl.maximum(n_t, 1.0)[:, None] - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t, axis=0) + tl.sum(n_t[:, None] * d * d, axis=0)
        delta = mean_b - mean
        n_new = n + n_b
        mean += delta * (n_b / n_new)
        m2 += m2_b + delta * delta * (n * n_b / n_new)
        n = n_new
    return n, mean, m2


@triton.jit
def _bn_merge_kernel(sum_ptr, m2_ptr, out_sum_ptr, out_m2_ptr, C, T, count, rows_per_tile,
                     tiles_per_group, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC_DTYPE: tl.constexpr):
    """Group g of `tiles_per_group` tiles merged into one partial of the same form (its
    sum and M2): the partials of tiles of tiles_per_group * rows_per_tile rows."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    g = tl.program_id(1)
    t_lo = g * tiles_per_group
    n, mean, m2 = _merge_tiles(sum_ptr, m2_ptr, c, c_ok, t_lo,
                               tl.minimum(t_lo + tiles_per_group, T), C, count, rows_per_tile,
                               BLOCK_T, BLOCK_C, ACC_DTYPE)
    tl.store(out_sum_ptr + g.to(tl.int64) * C + c, mean * n, mask=c_ok)
    tl.store(out_m2_ptr + g.to(tl.int64) * C + c, m2, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(sum_ptr, m2_ptr, gamma_ptr, beta_ptr, stats_ptr,
                        C, T, count, rows_per_tile,
                        eps: tl.float64,  # passed exactly, rounded to ACC_DTYPE here
                        AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                        ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n, mean, m2 = _merge_tiles(sum_ptr, m2_ptr, c, c_ok, 0, T, C, count, rows_per_tile,
                               BLOCK_T, BLOCK_C, ACC_DTYPE)
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


def merge_groups(t: int, c: int) -> int:
    """Tiles per group of the group-merge pass for (t, c) partials, or 0 when the finalize
    reads them directly (few tiles)."""
    if t <= MERGE_ABOVE_TILES:
        return 0
    groups = max(1, min(triton.cdiv(t, MERGE_BLOCK_T),
                        MERGE_PROGRAMS // triton.cdiv(c, MERGE_BLOCK_C)))
    return triton.cdiv(triton.cdiv(t, groups), MERGE_BLOCK_T) * MERGE_BLOCK_T


def finalize_launch(tile_sum, tile_m2, count, rows_per_tile, weight, bias, eps) -> torch.Tensor:
    """Launch the finalize kernel (after the group-merge pass when there are many tiles);
    returns (5, C) rows STAT_ROWS in the partials' dtype."""
    t, c = tile_sum.shape
    acc = acc_constexpr(tile_sum.dtype)
    per_group = merge_groups(t, c)
    if per_group:
        groups = triton.cdiv(t, per_group)
        merged = torch.empty((2, groups, c), dtype=tile_sum.dtype, device=tile_sum.device)
        _bn_merge_kernel[(triton.cdiv(c, MERGE_BLOCK_C), groups)](
            tile_sum, tile_m2, merged[0], merged[1], c, t, count, rows_per_tile, per_group,
            BLOCK_T=MERGE_BLOCK_T, BLOCK_C=MERGE_BLOCK_C, ACC_DTYPE=acc)
        tile_sum, tile_m2, t, rows_per_tile = merged[0], merged[1], groups, per_group * rows_per_tile
    out = torch.empty((len(STAT_ROWS), c), dtype=tile_sum.dtype, device=tile_sum.device)
    _bn_finalize_kernel[(triton.cdiv(c, BLOCK_C),)](
        tile_sum, tile_m2, weight, bias, out, c, t, count, rows_per_tile, eps,
        AFFINE=weight is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, ACC_DTYPE=acc)
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


def update_running_stats(args: BatchNormArgs, stats: torch.Tensor, count: int) -> None:
    """Update the BN's running statistics (if tracked) from (5, C) finalize output."""
    if args.running_mean is not None:
        _bn_update_running_op(stats.detach(), count, args.running_mean, args.running_var,
                              args.num_batches_tracked, args.momentum)


@op_errors("bn_finalize", "triton")
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
    check_batch_norm(args, c, tile_sum)
    w, b = (None if v is None else v.detach() for v in (args.weight, args.bias))
    stats = _bn_finalize_op(tile_sum, tile_m2, int(count), int(rows_per_tile), w, b, args.eps)
    update_running_stats(args, stats, int(count))
    return BatchStats(*stats.unbind(0))

