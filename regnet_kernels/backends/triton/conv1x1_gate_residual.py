"""The end of a RegNet block in one kernel: 1x1 conv c with the SE gate applied
in its prologue, folded BN, the shortcut, and the final ReLU.

    y = relu((x * gate[n, :]) @ w * scale + shift + shortcut)
    shortcut = identity                                   (proj_weight is None)
             = (block_input[:, :, ::s, ::s] @ w_p) * scale_p + shift_p   (projection)

The projection is a second GEMM over the block input accumulated into its own
accumulator in the same program, so its output never touches memory.
Activations are NHWC (inputs without unit channel stride are copied to channels_last
first; the output is channels_last).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops.checks import check_gate_residual_args, op_errors
from ...ops.types import new_activation
from .igemm import (
    acc_constexpr,
    conv_accumulate,
    conv_tiles,
    dot_precision,
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
def _conv1x1_gate_residual_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, gate_ptr, res_ptr, pw_ptr, pscale_ptr, pshift_ptr, y_ptr,
    Ho, Wo, M, Hr, Wr, proj_stride, tiles_n,
    sxn, sxh, sxw, sgn, srn, srh, srw,
    CIN: tl.constexpr, COUT: tl.constexpr, C_RES: tl.constexpr, HAS_GATE: tl.constexpr, PROJECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    X_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # The channel tiles of a row tile are adjacent in launch order: x's row tile (and the
    # shortcut's) is read from HBM once, then from L2.
    pid = tl.program_id(0)
    pid_m = pid // tiles_n
    co = (pid - pid_m * tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    m, n_rows, oh, ow, row_ok = output_rows(pid_m, M, Ho * Wo, Wo, 0, False, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = conv_accumulate(acc, x_ptr, w_ptr, x_ptr, x_ptr, gate_ptr,
                          n_rows, oh, ow, row_ok, 0, co, co_ok,
                          Ho, Wo, 1, 0, sxn, sxh, sxw, sgn,
                          CIN, 1, False, False, HAS_GATE, BLOCK_K, X_ALIGN,
                          DOT_PRECISION, ACC_DTYPE)
    scale = tl.load(scale_ptr + co, mask=co_ok, other=0.0)
    shift = tl.load(shift_ptr + co, mask=co_ok, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    mask = row_ok[:, None] & co_ok[None, :]

    if PROJECT:
        acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        acc_p = conv_accumulate(acc_p, res_ptr, pw_ptr, res_ptr, res_ptr, res_ptr,
                                n_rows, oh, ow, row_ok, 0, co, co_ok,
                                Hr, Wr, proj_stride, 0, srn, srh, srw, 0,
                                C_RES, 1, False, False, False, BLOCK_K, R_ALIGN,
                                DOT_PRECISION, ACC_DTYPE)
        pscale = tl.load(pscale_ptr + co, mask=co_ok, other=0.0)
        pshift = tl.load(pshift_ptr + co, mask=co_ok, other=0.0)
        y += acc_p * pscale[None, :] + pshift[None, :]
    else:
        r_rows = tl.multiple_of(n_rows.to(tl.int64) * srn + (oh * srh + ow * srw), R_ALIGN)
        r_off = r_rows[:, None] + co[None, :]
        y += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(ACC_DTYPE)

    y = tl.maximum(y, 0.0)
    y_off = m.to(tl.int64)[:, None] * COUT + co[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift,
            proj_stride):
    n, c_in, ho, wo = x.shape
    c_out = weight.shape[0]
    y = new_activation(n, c_out, ho, wo, x)
    if y.numel() == 0:
        return y
    project = proj_weight is not None
    k_max = max(c_in, shortcut.shape[1]) if project else c_in
    block_m, block_n, block_k = conv_tiles(n * ho * wo, c_out, k_max, x.dtype)
    tiles_n = triton.cdiv(c_out, block_n)
    _, cr, hr, wr = shortcut.shape
    x = unit_channel_stride(x)
    shortcut = unit_channel_stride(shortcut)
    pw = packed_weight(proj_weight) if project else weight
    args = (
        x, packed_weight(weight), scale, shift,
        gate if gate is not None else scale, shortcut,
        pw, proj_scale if project else scale, proj_shift if project else shift, y,
        ho, wo, n * ho * wo, hr, wr, proj_stride, tiles_n,
        *nhwc_strides(x)[:3], gate.stride(0) if gate is not None else 0,
        *nhwc_strides(shortcut)[:3])
    constexprs = dict(
        CIN=c_in, COUT=c_out, C_RES=cr, HAS_GATE=gate is not None, PROJECT=project,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        X_ALIGN=row_alignment(x), R_ALIGN=row_alignment(shortcut),
        DOT_PRECISION=dot_precision(x.dtype), ACC_DTYPE=acc_constexpr(x.dtype))
    launch_tuned(_conv1x1_gate_residual_kernel, (triton.cdiv(n * ho * wo, block_m) * tiles_n,),
                 args, constexprs, n * ho * wo,
                 launch_config(block_m, block_n, prologue=gate is not None), x.device)
    return y


@torch.library.custom_op("regnet_triton::conv1x1_gate_residual", mutates_args=())
def _conv1x1_gate_residual_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    gate: Optional[torch.Tensor], shortcut: torch.Tensor, proj_weight: Optional[torch.Tensor],
    proj_scale: Optional[torch.Tensor], proj_shift: Optional[torch.Tensor], proj_stride: int,
) -> torch.Tensor:
    return _launch(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift,
                   proj_stride)


@_conv1x1_gate_residual_op.register_fake
def _(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift, proj_stride):
    return new_activation(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], x)


@op_errors("conv1x1_gate_residual", "triton")
def conv1x1_gate_residual(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    shortcut: torch.Tensor, *, gate: Optional[torch.Tensor] = None,
    proj_weight: Optional[torch.Tensor] = None, proj_scale: Optional[torch.Tensor] = None,
    proj_shift: Optional[torch.Tensor] = None, proj_stride: int = 1,
) -> torch.Tensor:
    """relu(conv1x1(x * gate) * scale + shift + shortcut branch), in one kernel.

    Args:
        x: (N, C_b, Ho, Wo) input of the 1x1 conv (conv b's output in a block):
            float32/float16/bfloat16, or float64 (computed in float64 throughout).
        weight: (C_out, C_b, 1, 1) conv weight; scale, shift: (C_out,) folded BN, float32
            (float64 for a float64 x, like the gate and the projection's: `acc_dtype`).
        shortcut: the block input. Without `proj_weight` it is added as it is and
            must be (N, C_out, Ho, Wo); with it, it is (N, C_in, H, W) and goes
            through the projection 1x1 conv of stride `proj_stride`, whose output
            must be Ho x Wo.
        gate: optional (N, C_b) SE gate multiplied into x as it is loaded.
        proj_weight: (C_out, C_in, 1, 1) projection weight; proj_scale, proj_shift:
            (C_out,) folded BN of the projection.

    Returns:
        (N, C_out, Ho, Wo) channels_last, in x's dtype.
    """
    check_gate_residual_args(x, weight, scale, shift, shortcut, gate, proj_weight, proj_scale,
                             proj_shift, proj_stride, **TRITON_CHECKS)
    if proj_weight is None:
        return _conv1x1_gate_residual_op(x, weight, scale, shift, gate, shortcut,
                                         None, None, None, 1)
    return _conv1x1_gate_residual_op(x, weight, scale, shift, gate, shortcut,
                                     proj_weight, proj_scale, proj_shift, proj_stride)

