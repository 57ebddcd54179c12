"""Elementwise backward of a lazily applied BN + ReLU + SE gate, and the two
per-channel reductions of a training BN's backward, in one pass.

Training kernels never write a normalized tensor: a BN output v is kept as the
raw conv output y with per-channel (scale, shift), v = y * scale + shift, and the
next kernel applies the rest as it loads:
    a = relu(v)  (or a = v),   o = a * gate[n, c]  (or o = a)
Given G = dL/do (a full tensor, or one value per (image, row tile, channel)
when o was only summed, as by the SE squeeze), this kernel computes
    dv    = G * gate * relu'(v)   relu' from v, or from mask_src > 0 (a ReLU
                                  applied after an add, as at a block's end)
    dgate = sum over (h, w) of G * a                      per (image, channel)
and, for the BN's own backward (`reduce=True`), per channel
    sum of dv * y,   sum of dv
All sums are per row tile, then reduced in a fixed order: deterministic. The
arithmetic, the sums, dgate and the vectors are float32, or float64 for a float64 y
(`acc_dtype`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...ops.checks import (
    check_activation,
    check_gate,
    check_optional_affine,
    check_same,
    check_vector_dtype,
    op_errors,
)
from ...ops.types import acc_dtype, new_activation
from .igemm import acc_constexpr, nhwc_strides, output_rows, TRITON_CHECKS


class BnActGrads(NamedTuple):
    dv: Optional[torch.Tensor]         # x's dtype, channels_last (None with write_dv=False)
    sum_dv_y: Optional[torch.Tensor]   # (C,) acc_dtype, with reduce=True
    sum_dv: Optional[torch.Tensor]     # (C,) acc_dtype, with reduce=True
    dgate: Optional[torch.Tensor]      # (N, C) acc_dtype, with a gate


@triton.jit
def _bn_act_backward_kernel(
    g_ptr, y_ptr, scale_ptr, shift_ptr, gate_ptr, mask_ptr, dv_ptr, part_ptr, dgate_ptr,
    C, HW, W, tiles_per_image, g_tiles, g_rows_per_tile, total_tiles,
    sgn, sgh, sgw, sgc, syn, syh, syw, syc, smn, smh, smw, smc, sgate,
    G_PER_TILE: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr,
    HAS_GATE: tl.constexpr, EXTERNAL_MASK: tl.constexpr, WRITE_DV: tl.constexpr,
    REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    m, n_rows, h, w, row_ok = output_rows(pid_m, 0, HW, W, tiles_per_image, True, BLOCK_M)
    mask = row_ok[:, None] & c_ok[None, :]
    n64 = n_rows.to(tl.int64)
    y = tl.load(y_ptr + (n64 * syn + h * syh + w * syw)[:, None] + (c * syc)[None, :],
                mask=mask, other=0.0).to(ACC_DTYPE)
    if G_PER_TILE:
        # one gradient per (image, row tile of the forward's squeeze, channel)
        p = m - n_rows * HW
        g_off = ((n64 * g_tiles + p // g_rows_per_tile) * C)[:, None] + c[None, :]
    else:
        g_off = (n64 * sgn + h * sgh + w * sgw)[:, None] + (c * sgc)[None, :]
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(ACC_DTYPE)

    v = y
    if AFFINE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        v = y * scale[None, :] + shift[None, :]
    act = v
    if RELU:
        act = tl.maximum(v, 0.0)
    dv = g
    if HAS_GATE:
        dv = dv * tl.load(gate_ptr + (n64 * sgate)[:, None] + c[None, :], mask=mask, other=0.0)
    if EXTERNAL_MASK:
        ext = tl.load(mask_ptr + (n64 * smn + h * smh + w * smw)[:, None] + (c * smc)[None, :],
                      mask=mask, other=0.0)
        dv = tl.where(ext > 0, dv, 0.0)
    elif RELU:
        dv = tl.where(v > 0, dv, 0.0)
    dv = tl.where(mask, dv, 0.0)
    if WRITE_DV:
        tl.store(dv_ptr + m.to(tl.int64)[:, None] * C + c[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=mask)
    stat = pid_m.to(tl.int64) * C + c
    if REDUCE:
        tl.store(part_ptr + stat, tl.sum(dv * y, axis=0), mask=c_ok)
        tl.store(part_ptr + total_tiles * C + stat, tl.sum(dv, axis=0), mask=c_ok)
    if HAS_GATE:
        tl.store(dgate_ptr + stat, tl.sum(tl.where(mask, g * act, 0.0), axis=0), mask=c_ok)


def _tiles(hw: int, c: int) -> tuple[int, int]:
    return min(128, triton.next_power_of_2(hw)), min(64, triton.next_power_of_2(c))


def _num_warps(block_m: int, block_c: int) -> int:
    """32 elements of each tile a thread: with more, the full variant (affine, ReLU, gate)
    spills on sm_90."""
    return 8 if block_m * block_c >= 8192 else 4


def _shapes(x, gate, write_dv, reduce):
    n, c, h, w = x.shape
    tiles = triton.cdiv(h * w, _tiles(h * w, c)[0])
    return (n * tiles, c) if reduce else (0,), (n, tiles, c) if gate is not None else (0,), tiles


@torch.library.custom_op("regnet_triton::bn_act_backward", mutates_args=())
def _bn_act_backward_op(
    grad: torch.Tensor, y: torch.Tensor, scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], relu: bool, gate: Optional[torch.Tensor],
    mask_src: Optional[torch.Tensor], grad_rows_per_tile: int, write_dv: bool, reduce: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = y.shape
    part_shape, dgate_shape, tiles = _shapes(y, gate, write_dv, reduce)
    dv = new_activation(n, c, h, w, y) if write_dv else y.new_empty((0,))
    parts = torch.empty((2,) + part_shape if reduce else part_shape, dtype=acc_dtype(y.dtype),
                        device=y.device)
    dgate = torch.empty(dgate_shape, dtype=acc_dtype(y.dtype), device=y.device)
    if y.numel() == 0:
        return dv, parts.zero_(), dgate.zero_()
    per_tile = grad.dim() == 3
    g_strides = (0, 0, 0, 0) if per_tile else nhwc_strides(grad)
    m_strides = nhwc_strides(mask_src) if mask_src is not None else (0, 0, 0, 0)
    block_m, block_c = _tiles(h * w, c)
    _bn_act_backward_kernel[(n * tiles, triton.cdiv(c, block_c))](
        grad, y, scale if scale is not None else y, shift if shift is not None else y,
        gate if gate is not None else y, mask_src if mask_src is not None else y,
        dv, parts, dgate,
        c, h * w, w, tiles, grad.shape[1] if per_tile else 0, grad_rows_per_tile, n * tiles,
        *g_strides, *nhwc_strides(y), *m_strides, gate.stride(0) if gate is not None else 0,
        G_PER_TILE=per_tile, AFFINE=scale is not None, RELU=relu, HAS_GATE=gate is not None,
        EXTERNAL_MASK=mask_src is not None, WRITE_DV=write_dv, REDUCE=reduce,
        BLOCK_M=block_m, BLOCK_C=block_c, ACC_DTYPE=acc_constexpr(y.dtype),
        num_warps=_num_warps(block_m, block_c),
    )
    return dv, parts, dgate


@_bn_act_backward_op.register_fake
def _(grad, y, scale, shift, relu, gate, mask_src, grad_rows_per_tile, write_dv, reduce):
    part_shape, dgate_shape, _ = _shapes(y, gate, write_dv, reduce)
    dv = new_activation(*y.shape, y) if write_dv else y.new_empty((0,))
    parts = y.new_empty((2,) + part_shape if reduce else part_shape, dtype=acc_dtype(y.dtype))
    return dv, parts, y.new_empty(dgate_shape, dtype=acc_dtype(y.dtype))


@op_errors("bn_act_backward", "triton")
def bn_act_backward(grad: torch.Tensor, y: torch.Tensor, scale: Optional[torch.Tensor] = None,
                    shift: Optional[torch.Tensor] = None, *, relu: bool = True,
                    gate: Optional[torch.Tensor] = None, mask_src: Optional[torch.Tensor] = None,
                    grad_rows_per_tile: int = 0, write_dv: bool = True,
                    reduce: bool = False) -> BnActGrads:
    """dv (and dgate, and the BN reductions) of o = relu?(y * scale + shift) * gate.

    Args:
        grad: dL/do, (N, C, H, W); or (N, T, C) when o was summed over row tiles of
            `grad_rows_per_tile` pixels of each image (the SE squeeze).
        y: the raw tensor (N, C, H, W), float32/float16/bfloat16 or float64; scale,
            shift: (C,), or None for v = y. Per-channel vectors, the gate, a per-tile
            grad and the sums are float32, float64 for a float64 y (`acc_dtype`).
        relu: a ReLU after the affine. gate: (N, C) gate o was multiplied by.
        mask_src: take the ReLU mask from mask_src > 0 instead of from v.
        write_dv: write dv (x's dtype, channels_last). reduce: also return the
            per-channel sums of dv * y and dv.
    """
    check_activation("y", y, **TRITON_CHECKS)
    n, c, h, w = y.shape
    if grad.dim() == 3:
        if grad.shape[0] != n or grad.shape[2] != c:
            raise ValueError(f"per-tile grad must be ({n}, T, {c}), got {tuple(grad.shape)}")
        check_vector_dtype("per-tile grad", grad, y)
        if grad_rows_per_tile < 1 or triton.cdiv(h * w, grad_rows_per_tile) != grad.shape[1]:
            raise ValueError(f"{grad.shape[1]} tiles of {grad_rows_per_tile} pixels do not "
                             f"cover the {h}x{w} image")
        grad = grad.contiguous()
    else:
        check_activation("grad", grad, **TRITON_CHECKS)
        check_same("grad", grad, y, "y")
        if grad.shape != y.shape:
            raise ValueError(f"grad {tuple(grad.shape)} and y {tuple(y.shape)} differ in shape")
    check_optional_affine(("scale", "shift"), scale, shift, c, y)
    if gate is not None:
        check_gate(gate, n, c, y)
    if mask_src is not None:
        check_activation("mask_src", mask_src, **TRITON_CHECKS)
        if mask_src.shape != y.shape:
            raise ValueError(f"mask_src {tuple(mask_src.shape)} and y {tuple(y.shape)} differ")
    dv, parts, dgate = _bn_act_backward_op(grad, y, scale, shift, relu, gate, mask_src,
                                           int(grad_rows_per_tile), write_dv, reduce)
    sums = parts.sum(1) if reduce else (None, None)
    return BnActGrads(dv if write_dv else None, sums[0], sums[1],
                      dgate.sum(1) if gate is not None else None)
