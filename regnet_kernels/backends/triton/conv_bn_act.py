"""conv + BatchNorm (eval) + ReLU in one kernel, with an optional SE squeeze epilogue.

    y = act(conv(x, w, stride, padding=k // 2, groups) * scale + shift)

`scale`/`shift` are the eval BatchNorm folded per output channel
(scale = gamma / sqrt(var + eps), shift = beta - mean * scale) and applied in the
epilogue, so the conv weight stays untouched. With `squeeze=True` the kernel
also writes per-(image, row tile, channel) sums of y in the accumulation dtype
(fp32, fp64 for fp64 inputs): the SE block's global average pool without
another pass over y. Row tiles then never straddle two images, and
`se_excite` sums the tiles (a deterministic reduction, no atomics).

Activations are NHWC: inputs with unit channel stride (channels_last) are read as
they are, others are copied to channels_last first; the output is always
channels_last.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...ops.checks import check_conv_bn_act_args, check_prologue_conv, op_errors
from ...ops.types import acc_dtype, conv_output_size, new_activation
from .igemm import (
    acc_constexpr,
    conv_accumulate,
    conv_tiles,
    dot_precision,
    group_channels,
    launch_config,
    nhwc_strides,
    output_rows,
    packed_weight,
    row_alignment,
    TRITON_CHECKS,
    unit_channel_stride,
)
from .tuning import launch_tuned


@triton.jit(do_not_specialize=["M"])
def _conv_bn_act_kernel(
    x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, gate_ptr, scale_ptr, shift_ptr,
    y_ptr, sums_ptr, m2_ptr,
    H, W, Ho, Wo, groups, M, tiles_per_image, tiles_n, stride, pad,
    sxn, sxh, sxw, sgn,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KSIZE: tl.constexpr, IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr, SQUEEZE: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # One program per (row tile, group, channel tile), the channel tiles of a row tile
    # adjacent in launch order: the row tile's input is read from HBM once, then from L2.
    pid = tl.program_id(0)
    tiles_gn = groups * tiles_n
    pid_m = pid // tiles_gn
    pid_n = pid - pid_m * tiles_gn
    group = pid_n // tiles_n
    _, co_ok, co = group_channels(group, pid_n % tiles_n, COUT_G, BLOCK_N)
    Cout = groups * COUT_G
    HWo = Ho * Wo
    m, n_rows, oh, ow, row_ok = output_rows(pid_m, M, HWo, Wo, tiles_per_image,
                                            SQUEEZE, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = conv_accumulate(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, gate_ptr,
                          n_rows, oh, ow, row_ok, group * CIN_G, co, co_ok,
                          H, W, stride, pad, sxn, sxh, sxw, sgn,
                          CIN_G, KSIZE, IN_AFFINE, IN_RELU, HAS_GATE, BLOCK_K, X_ALIGN,
                          DOT_PRECISION, ACC_DTYPE)

    mask = row_ok[:, None] & co_ok[None, :]
    y_off = m.to(tl.int64)[:, None] * Cout + co[None, :]
    stat_off = pid_m.to(tl.int64) * Cout + co
    if STATS:
        # Training: BN needs the whole batch's statistics, so write the raw
        # output and this tile's per-channel sum and centered sum of squares.
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)
        total = tl.sum(tl.where(mask, acc, 0.0), axis=0)
        tile_mean = total / tl.sum(row_ok.to(ACC_DTYPE), axis=0)
        centered = tl.where(mask, acc - tile_mean[None, :], 0.0)
        tl.store(sums_ptr + stat_off, total, mask=co_ok)
        tl.store(m2_ptr + stat_off, tl.sum(centered * centered, axis=0), mask=co_ok)
    else:
        y = acc  # raw (an eval-mode BN inside a training model applies it later)
        if AFFINE:
            scale = tl.load(scale_ptr + co, mask=co_ok, other=0.0)
            shift = tl.load(shift_ptr + co, mask=co_ok, other=0.0)
            y = acc * scale[None, :] + shift[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
        if SQUEEZE:
            # pid_m = image * tiles_per_image + tile: partial sums land at [image, tile, :]
            tl.store(sums_ptr + stat_off, tl.sum(tl.where(mask, y, 0.0), axis=0), mask=co_ok)


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int, squeeze: bool):
    """Output size, tiles and row tiles per image; from shapes and dtype only (the fake
    impls use it)."""
    n, c_in, h, w = x.shape
    c_out, cin_g, k, _ = weight.shape
    ho, wo = conv_output_size(h, k, stride), conv_output_size(w, k, stride)
    rows = ho * wo if squeeze else n * ho * wo
    block_m, block_n, block_k = conv_tiles(rows, c_out // groups, cin_g, x.dtype)
    tiles_per_image = triton.cdiv(ho * wo, block_m)
    return ho, wo, (block_m, block_n, block_k), tiles_per_image


def _aux_shape(x, weight, stride, groups, squeeze, stats):
    """Shape of the side output (in acc_dtype): SE squeeze partials (N, T, C), BN partials
    (2, T, C) (sum, centered M2 per row tile), or nothing."""
    n, c_out = x.shape[0], weight.shape[0]
    ho, wo, (block_m, _, _), tiles_per_image = _geometry(x, weight, stride, groups, squeeze)
    if squeeze:
        return (n, tiles_per_image, c_out)
    if stats:
        return (2, triton.cdiv(n * ho * wo, block_m), c_out)
    return (0,)


def _launch(x, weight, stride, groups, *, scale=None, shift=None, relu=False, squeeze=False,
            stats=False, in_scale=None, in_shift=None, in_relu=False, gate=None):
    n, c_in, h, w = x.shape
    c_out, cin_g, k, _ = weight.shape
    ho, wo, (block_m, block_n, block_k), tiles_per_image = _geometry(x, weight, stride, groups, squeeze)
    y = new_activation(n, c_out, ho, wo, x)
    aux = torch.empty(_aux_shape(x, weight, stride, groups, squeeze, stats),
                      dtype=acc_dtype(x.dtype), device=x.device)
    if y.numel() == 0:
        return y, aux.zero_()
    cout_g = c_out // groups
    tiles_n = triton.cdiv(cout_g, block_n)
    m_tiles = n * tiles_per_image if squeeze else triton.cdiv(n * ho * wo, block_m)
    unused = aux  # placeholder for pointers a variant does not read
    x = unit_channel_stride(x)
    args = (
        x, packed_weight(weight),
        in_scale if in_scale is not None else unused, in_shift if in_shift is not None else unused,
        gate if gate is not None else unused,
        scale if scale is not None else unused, shift if shift is not None else unused,
        y, aux, aux[1] if stats else unused,
        h, w, ho, wo, groups, n * ho * wo, tiles_per_image, tiles_n, stride, k // 2,
        *nhwc_strides(x)[:3], gate.stride(0) if gate is not None else 0)
    constexprs = dict(
        CIN_G=cin_g, COUT_G=cout_g, KSIZE=k, IN_AFFINE=in_scale is not None, IN_RELU=in_relu,
        HAS_GATE=gate is not None, AFFINE=scale is not None, RELU=relu, SQUEEZE=squeeze,
        STATS=stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        X_ALIGN=row_alignment(x),
        DOT_PRECISION=dot_precision(x.dtype), ACC_DTYPE=acc_constexpr(x.dtype))
    launch_tuned(_conv_bn_act_kernel, (m_tiles * groups * tiles_n,), args, constexprs,
                 n * ho * wo,
                 launch_config(block_m, block_n, prologue=in_scale is not None or gate is not None),
                 x.device)
    return y, aux


def _fake(x, weight, stride, groups, squeeze=False, stats=False):
    ho, wo, _, _ = _geometry(x, weight, stride, groups, squeeze)
    y = new_activation(x.shape[0], weight.shape[0], ho, wo, x)
    return y, x.new_empty(_aux_shape(x, weight, stride, groups, squeeze, stats),
                          dtype=acc_dtype(x.dtype))


@torch.library.custom_op("regnet_triton::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor, stride: int, groups: int, relu: bool) -> torch.Tensor:
    return _launch(x, weight, stride, groups, scale=scale, shift=shift, relu=relu)[0]


@_conv_bn_act_op.register_fake
def _(x, weight, scale, shift, stride, groups, relu):
    return _fake(x, weight, stride, groups)[0]


@torch.library.custom_op("regnet_triton::conv_bn_act_squeeze", mutates_args=())
def _conv_bn_act_squeeze_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, stride: int, groups: int,
                            relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, stride, groups, scale=scale, shift=shift, relu=relu, squeeze=True)


@_conv_bn_act_squeeze_op.register_fake
def _(x, weight, scale, shift, stride, groups, relu):
    return _fake(x, weight, stride, groups, squeeze=True)


@torch.library.custom_op("regnet_triton::conv_bn_stats", mutates_args=())
def _conv_bn_stats_op(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int,
                      in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor],
                      in_relu: bool, gate: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, stride, groups, stats=True, in_scale=in_scale, in_shift=in_shift,
                   in_relu=in_relu, gate=gate)


@_conv_bn_stats_op.register_fake
def _(x, weight, stride, groups, in_scale, in_shift, in_relu, gate):
    return _fake(x, weight, stride, groups, stats=True)


@op_errors("conv_bn_act", "triton")
def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, stride: int = 1, groups: int = 1, relu: bool = True, squeeze: bool = False):
    """Fused conv (k x k, padding k // 2) + folded BN + optional ReLU.

    Args:
        x: (N, C_in, H, W) activation, float32/float16/bfloat16, or float64 (computed in
            float64 throughout); channels_last is fastest.
        weight: (C_out, C_in / groups, k, k) conv weight, same dtype and device as x.
        scale, shift: (C_out,) folded BatchNorm (see `fold_bn`): float32, float64 for a
            float64 x (the accumulation dtype, `acc_dtype`).
        stride: 1 or 2 (any positive stride works).
        groups: conv groups; must divide C_in and C_out.
        relu: apply ReLU after the BN.
        squeeze: also return SE squeeze partial sums of the output (acc_dtype), shape
            (N, T, C_out) for T row tiles per image; `sums.sum(1)` is the per-image
            channel sum and `se_excite` takes them as they are.

    Returns:
        y (channels_last, x's dtype), or (y, sums) when squeeze=True.
    """
    check_conv_bn_act_args(x, weight, scale, shift, stride, groups, **TRITON_CHECKS)
    if squeeze:
        return _conv_bn_act_squeeze_op(x, weight, scale, shift, stride, groups, relu)
    return _conv_bn_act_op(x, weight, scale, shift, stride, groups, relu)


class ConvStats(NamedTuple):
    """Training-mode conv output: raw (pre-BN) y and its BN partial statistics.
    Row tile t covers output rows (n, oh, ow flattened) [t * rows_per_tile, ...)."""
    y: torch.Tensor
    tile_sum: torch.Tensor
    tile_m2: torch.Tensor
    rows_per_tile: int

    @property
    def count(self) -> int:
        """Rows (N * Ho * Wo) the statistics run over."""
        return self.y.shape[0] * self.y.shape[2] * self.y.shape[3]


@op_errors("conv_bn_stats", "triton")
def conv_bn_stats(x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, groups: int = 1,
                  in_scale: Optional[torch.Tensor] = None, in_shift: Optional[torch.Tensor] = None,
                  in_relu: bool = False, gate: Optional[torch.Tensor] = None) -> ConvStats:
    """Training-mode conv: the raw output and per-row-tile BN partials in one kernel.

    The conv input is x, or x transformed as it is loaded (the previous layer's
    BN and ReLU, and the SE gate): u = relu?(x * in_scale[c] + in_shift[c]) * gate[n, c].
    Feed the partials to `bn_finalize` for the batch statistics.

    Args:
        x: (N, C_in, H, W) activation (raw output of the previous conv when a
            prologue is given); weight: (C_out, C_in / groups, k, k), x's dtype.
        in_scale, in_shift: optional (C_in,) per-channel affine of the input (float32;
            float64 for a float64 x, like every vector here: `acc_dtype`).
        in_relu: ReLU after the affine.
        gate: optional (N, C_in) SE gate.

    Returns:
        ConvStats(y (channels_last, x's dtype), tile_sum, tile_m2 ((T, C_out), acc_dtype),
        rows_per_tile).
    """
    check_prologue_conv(x, weight, stride, groups, in_scale, in_shift, gate, **TRITON_CHECKS)
    y, stats = _conv_bn_stats_op(x, weight, stride, groups, in_scale, in_shift, in_relu, gate)
    _, _, (block_m, _, _), _ = _geometry(x, weight, stride, groups, squeeze=False)
    return ConvStats(y, stats[0], stats[1], block_m)
