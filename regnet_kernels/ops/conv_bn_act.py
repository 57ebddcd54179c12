"""conv + BatchNorm (eval) + ReLU in one kernel, with an optional SE squeeze epilogue.

    y = act(conv(x, w, stride, padding=k // 2, groups) * scale + shift)

`scale`/`shift` are the eval BatchNorm folded per output channel
(scale = gamma / sqrt(var + eps), shift = beta - mean * scale) and applied in the
epilogue, so the conv weight stays untouched. With `squeeze=True` the kernel
also writes per-(image, row tile, channel) fp32 sums of y: the SE block's global
average pool without another pass over y. Row tiles then never straddle two
images, and `se_excite` sums the tiles (a deterministic reduction, no atomics).

Activations are NHWC: any input strides are read correctly, channels_last is
the fast layout, and the output is always channels_last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._implicit_gemm import (
    check_activation,
    check_channel_vector,
    check_conv_weight,
    conv_accumulate,
    conv_tiles,
    dot_precision,
    launch_config,
    new_activation,
    nhwc_strides,
    output_rows,
)


@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, sums_ptr,
    H, W, Cin_g, Ho, Wo, Cout, Cout_g, M, tiles_per_image, tiles_n, stride, pad,
    sxn, sxh, sxw, sxc, swo, swi, swh, sww,
    KSIZE: tl.constexpr, RELU: tl.constexpr, SQUEEZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = pid_n // tiles_n
    co_g = (pid_n % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co_g < Cout_g
    co = group * Cout_g + co_g
    HWo = Ho * Wo
    m, n_rows, oh, ow, row_ok = output_rows(pid_m, M, HWo, Wo, tiles_per_image,
                                            SQUEEZE, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = conv_accumulate(acc, x_ptr, w_ptr, x_ptr,
                          n_rows, oh, ow, row_ok, group * Cin_g, co, co_ok,
                          H, W, Cin_g, stride, pad,
                          sxn, sxh, sxw, sxc, swo, swi, swh, sww, 0,
                          KSIZE, False, BLOCK_K, DOT_PRECISION)

    scale = tl.load(scale_ptr + co, mask=co_ok, other=0.0)
    shift = tl.load(shift_ptr + co, mask=co_ok, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    mask = row_ok[:, None] & co_ok[None, :]
    y_off = m.to(tl.int64)[:, None] * Cout + co[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SQUEEZE:
        # pid_m = image * tiles_per_image + tile: partial sums land at [image, tile, :]
        part = tl.sum(tl.where(mask, y, 0.0), axis=0)
        tl.store(sums_ptr + pid_m.to(tl.int64) * Cout + co, part, mask=co_ok)


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int, squeeze: bool):
    n, c_in, h, w = x.shape
    c_out, cin_g, k, _ = weight.shape
    ho = (h + 2 * (k // 2) - k) // stride + 1
    wo = (w + 2 * (k // 2) - k) // stride + 1
    rows = ho * wo if squeeze else n * ho * wo
    block_m, block_n, block_k = conv_tiles(rows, c_out // groups, k * k * cin_g)
    tiles_per_image = triton.cdiv(ho * wo, block_m)
    return ho, wo, (block_m, block_n, block_k), tiles_per_image


def _launch(x, weight, scale, shift, stride, groups, relu, squeeze):
    n, c_in, h, w = x.shape
    c_out, cin_g, k, _ = weight.shape
    ho, wo, (block_m, block_n, block_k), tiles_per_image = _geometry(x, weight, stride, groups, squeeze)
    y = new_activation(n, c_out, ho, wo, x)
    sums = torch.empty((n, tiles_per_image, c_out) if squeeze else (0,),
                       dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, sums.zero_()
    cout_g = c_out // groups
    tiles_n = triton.cdiv(cout_g, block_n)
    m_tiles = n * tiles_per_image if squeeze else triton.cdiv(n * ho * wo, block_m)
    grid = (m_tiles, groups * tiles_n)
    _conv_bn_act_kernel[grid](
        x, weight, scale, shift, y, sums,
        h, w, cin_g, ho, wo, c_out, cout_g, n * ho * wo, tiles_per_image, tiles_n, stride, k // 2,
        *nhwc_strides(x), *weight.stride(),
        KSIZE=k, RELU=relu, SQUEEZE=squeeze,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(x.dtype), **launch_config(block_m, block_n),
    )
    return y, sums


@torch.library.custom_op("regnet_triton::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor, stride: int, groups: int, relu: bool) -> torch.Tensor:
    return _launch(x, weight, scale, shift, stride, groups, relu, squeeze=False)[0]


@_conv_bn_act_op.register_fake
def _(x, weight, scale, shift, stride, groups, relu):
    ho, wo, _, _ = _geometry(x, weight, stride, groups, squeeze=False)
    return new_activation(x.shape[0], weight.shape[0], ho, wo, x)


@torch.library.custom_op("regnet_triton::conv_bn_act_squeeze", mutates_args=())
def _conv_bn_act_squeeze_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, stride: int, groups: int,
                            relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, scale, shift, stride, groups, relu, squeeze=True)


@_conv_bn_act_squeeze_op.register_fake
def _(x, weight, scale, shift, stride, groups, relu):
    ho, wo, _, tiles_per_image = _geometry(x, weight, stride, groups, squeeze=True)
    y = new_activation(x.shape[0], weight.shape[0], ho, wo, x)
    sums = x.new_empty((x.shape[0], tiles_per_image, weight.shape[0]), dtype=torch.float32)
    return y, sums


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, stride: int = 1, groups: int = 1, relu: bool = True, squeeze: bool = False):
    """Fused conv (k x k, padding k // 2) + folded BN + optional ReLU.

    Args:
        x: (N, C_in, H, W) activation, float32/float16/bfloat16 (channels_last is fastest).
        weight: (C_out, C_in / groups, k, k) conv weight, same dtype and device as x.
        scale, shift: (C_out,) float32 folded BatchNorm (see `fold_bn`).
        stride: 1 or 2 (any positive stride works).
        groups: conv groups; must divide C_in and C_out.
        relu: apply ReLU after the BN.
        squeeze: also return fp32 SE squeeze partial sums of the output, shape
            (N, T, C_out) for T row tiles per image; `sums.sum(1)` is the per-image
            channel sum and `se_excite` takes them as they are.

    Returns:
        y (channels_last, x's dtype), or (y, sums) when squeeze=True.
    """
    check_activation("x", x)
    c_out, _ = check_conv_weight("weight", weight, x, groups)
    check_channel_vector("scale", scale, c_out, x)
    check_channel_vector("shift", shift, c_out, x)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if squeeze:
        return _conv_bn_act_squeeze_op(x, weight, scale, shift, stride, groups, relu)
    return _conv_bn_act_op(x, weight, scale, shift, stride, groups, relu)
