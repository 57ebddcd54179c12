"""The end of a training-mode block: both branches' BN, the residual add and
the ReLU in one elementwise pass, reading the raw conv outputs.

    out = relu(y * scale + shift + shortcut')
    shortcut' = shortcut                                  (identity)
              = shortcut * sc_scale + sc_shift            (raw projection output + its BN)
              = 0                                         (no shortcut: the stem)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops.checks import check_bn_add_relu_args, op_errors
from ...ops.types import new_activation
from .bn_act_backward import bn_act_backward
from .igemm import TRITON_CHECKS, acc_constexpr, nhwc_strides


@triton.jit
def _bn_add_relu_kernel(y_ptr, scale_ptr, shift_ptr, r_ptr, rscale_ptr, rshift_ptr, out_ptr,
                        M, C, HW, W, syn, syh, syw, syc, srn, srh, srw, src,
                        HAS_SHORTCUT: tl.constexpr, PROJECT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = m < M
    c_ok = c < C
    mask = row_ok[:, None] & c_ok[None, :]
    n = (m // HW).to(tl.int64)
    h = (m % HW) // W
    w = m % W
    y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + (c * syc)[None, :],
                mask=mask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    out = y * scale[None, :] + shift[None, :]
    if HAS_SHORTCUT:
        r = tl.load(r_ptr + (n * srn + h * srh + w * srw)[:, None] + (c * src)[None, :],
                    mask=mask, other=0.0).to(ACC_DTYPE)
        if PROJECT:
            rscale = tl.load(rscale_ptr + c, mask=c_ok, other=0.0)
            rshift = tl.load(rshift_ptr + c, mask=c_ok, other=0.0)
            r = r * rscale[None, :] + rshift[None, :]
        out += r
    out = tl.maximum(out, 0.0)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * C + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("regnet_triton::bn_add_relu", mutates_args=())
def _bn_add_relu_op(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    shortcut: Optional[torch.Tensor], sc_scale: Optional[torch.Tensor],
                    sc_shift: Optional[torch.Tensor]) -> torch.Tensor:
    n, c, h, w = y.shape
    out = new_activation(n, c, h, w, y)
    if out.numel() == 0:
        return out
    block_m, block_c = 64, min(64, triton.next_power_of_2(c))
    project = sc_scale is not None
    has_shortcut = shortcut is not None
    _bn_add_relu_kernel[(triton.cdiv(n * h * w, block_m), triton.cdiv(c, block_c))](
        y, scale, shift, shortcut if has_shortcut else y, sc_scale if project else scale,
        sc_shift if project else shift, out, n * h * w, c, h * w, w, *nhwc_strides(y),
        *(nhwc_strides(shortcut) if has_shortcut else (0, 0, 0, 0)),
        HAS_SHORTCUT=has_shortcut, PROJECT=project, BLOCK_M=block_m, BLOCK_C=block_c,
        ACC_DTYPE=acc_constexpr(y.dtype))
    return out


@_bn_add_relu_op.register_fake
def _(y, scale, shift, shortcut, sc_scale, sc_shift):
    return new_activation(*y.shape, y)


def _setup(ctx, inputs, output):
    y, scale, shift, shortcut, sc_scale, sc_shift = inputs
    ctx.save_for_backward(y, shortcut, output)


def _backward(ctx, grad):
    """y (and a projection shortcut) are lazy BN outputs (see conv_bn_train), so
    every input's gradient is the same: dL/d(sum) = grad * (out > 0)."""
    y, shortcut, out = ctx.saved_tensors
    dz = bn_act_backward(grad, out, relu=True).dv
    return dz, None, None, dz if shortcut is not None else None, None, None


_bn_add_relu_op.register_autograd(_backward, setup_context=_setup)


@op_errors("bn_add_relu", "triton")
def bn_add_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                shortcut: Optional[torch.Tensor] = None, sc_scale: Optional[torch.Tensor] = None,
                sc_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(y * scale + shift + shortcut'), shortcut' = shortcut or its own BN affine.

    y and a projection shortcut are lazy BN outputs (`conv_bn_train`): in autograd
    they stand for v = y * scale + shift, and (scale, shift) are not differentiable.

    Args:
        y: (N, C, H, W) raw conv output, float32/float16/bfloat16 or float64 (computed
            in float64); scale, shift: (C,) its BN, float32 (float64 for a float64 y,
            like sc_scale/sc_shift: `acc_dtype`).
        shortcut: (N, C, H, W), y's dtype: the block input (identity) or the raw
            projection conv output, then with sc_scale, sc_shift: (C,); or
            None for relu(BN(y)) alone (a training stem's materialized output).
    Returns: (N, C, H, W) channels_last, y's dtype.
    """
    check_bn_add_relu_args(y, scale, shift, shortcut, sc_scale, sc_shift, **TRITON_CHECKS)
    return _bn_add_relu_op(y, scale, shift, shortcut, sc_scale, sc_shift)

