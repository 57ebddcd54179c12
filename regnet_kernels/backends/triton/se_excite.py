"""SE excitation: from the squeeze sums to the per-(image, channel) gate, one kernel.

    mean = sums.sum(tiles) / hw
    gate = sigmoid(W2 @ relu(W1 @ mean + b1) + b2)        shape (N, C), in the sums' dtype

One program per image. The hidden vector (w_se <= 4096 values) stays in
registers between the two layers, so nothing but the gate is written. The sums,
the gate and the arithmetic are float32, or float64 in a float64 model
(`acc_dtype`).

In eval the squeeze sums come from conv b's epilogue. In training conv b's BN
statistics are known only after conv b, so `se_squeeze` makes one read-only
pass over its raw output y: per-(image, row tile) sums of relu(y * scale + shift).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.checks import check_se_excite_args, check_se_squeeze_args, op_errors
from ...ops.types import acc_dtype
from .bn_act_backward import bn_act_backward
from .igemm import TRITON_CHECKS, acc_constexpr, nhwc_strides, output_rows


@triton.jit
def _se_excite_kernel(sums_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gate_ptr,
                      T, C, S, HW, s1o, s1i, s2o, s2i,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    inv_hw = 1.0 / HW.to(ACC_DTYPE)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S

    hidden = tl.zeros((BLOCK_S,), dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        total = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
        for t in range(0, T):
            total += tl.load(sums_ptr + (n * T + t) * C + c, mask=c_ok, other=0.0)
        w1 = tl.load(w1_ptr + s[:, None] * s1o + c[None, :] * s1i,
                     mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        hidden += tl.sum(w1.to(ACC_DTYPE) * (total * inv_hw)[None, :], axis=1)
    b1 = tl.load(b1_ptr + s, mask=s_ok, other=0.0).to(ACC_DTYPE)
    hidden = tl.maximum(hidden + b1, 0.0)

    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w2 = tl.load(w2_ptr + c[:, None] * s2o + s[None, :] * s2i,
                     mask=c_ok[:, None] & s_ok[None, :], other=0.0)
        z = tl.sum(w2.to(ACC_DTYPE) * hidden[None, :], axis=1)
        z += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        tl.store(gate_ptr + n * C + c, tl.sigmoid(z), mask=c_ok)


def _tiles(s: int) -> tuple[int, int]:
    block_s = triton.next_power_of_2(max(s, 1))
    return block_s, max(4, min(128, 4096 // block_s))


def _num_warps(block_s: int, block_c: int) -> int:
    """Up to 64 weight elements a thread: more and the widest SE layers spill on sm_90."""
    return max(4, min(8, block_s * block_c // 512))


@torch.library.custom_op("regnet_triton::se_excite", mutates_args=())
def _se_excite_op(sums: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor,
                  w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    n, t, c = sums.shape
    s = w1.shape[0]
    gate = torch.empty((n, c), dtype=sums.dtype, device=sums.device)
    if gate.numel() == 0:
        return gate
    block_s, block_c = _tiles(s)
    _se_excite_kernel[(n,)](
        sums, w1, b1, w2, b2, gate, t, c, s, hw,
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        BLOCK_S=block_s, BLOCK_C=block_c, ACC_DTYPE=acc_constexpr(sums.dtype),
        num_warps=_num_warps(block_s, block_c),
    )
    return gate


@_se_excite_op.register_fake
def _(sums, hw, w1, b1, w2, b2):
    return sums.new_empty((sums.shape[0], sums.shape[2]))


def _se_excite_setup_context(ctx, inputs, output) -> None:
    sums, hw, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(sums, w1, b1, w2, b2, output)
    ctx.hw = hw


def _se_excite_backward(ctx, grad_gate: torch.Tensor):
    """Gradients of gate = sigmoid(W2 relu(W1 mean + b1) + b2), mean = sums.sum(1) / hw,
    with respect to (sums, hw, w1, b1, w2, b2). The MLP runs on (N, C) vectors, so a few
    small torch matmuls are as fast as a kernel (the C++ op: the same formula in
    csrc/autograd.cpp)."""
    sums, w1, b1, w2, b2, gate = ctx.saved_tensors
    mean = sums.sum(1) / ctx.hw
    w1m, w2m = w1.to(gate.dtype).flatten(1), w2.to(gate.dtype).flatten(1)
    hidden_pre = mean @ w1m.T + b1.to(gate.dtype)
    hidden = hidden_pre.clamp_min(0.0)
    dz = grad_gate * gate * (1.0 - gate)
    dhidden = (dz @ w2m) * (hidden_pre > 0)
    dmean = dhidden @ w1m
    dsums = (dmean / ctx.hw).unsqueeze(1).expand_as(sums).contiguous()
    return (dsums, None, (dhidden.T @ mean).reshape(w1.shape).to(w1.dtype),
            dhidden.sum(0).to(b1.dtype), (dz.T @ hidden).reshape(w2.shape).to(w2.dtype),
            dz.sum(0).to(b2.dtype))


_se_excite_op.register_autograd(_se_excite_backward, setup_context=_se_excite_setup_context)


@op_errors("se_excite", "triton")
def se_excite(sums: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """gate = sigmoid(W2 relu(W1 mean + b1) + b2) from SE squeeze sums.

    Args:
        sums: per-image channel sums, (N, C) or (N, T, C) partial sums over T row
            tiles (as returned by `conv_bn_act(..., squeeze=True)`); float32, or
            float64 with float64 weights (computed in float64 throughout).
        hw: number of pixels summed per image (Ho * Wo of the squeezed map).
        w1: (S, C) or (S, C, 1, 1) first SE conv weight; b1: (S,).
        w2: (C, S) or (C, S, 1, 1) second SE conv weight; b2: (C,).

    Returns:
        (N, C) gate in the sums' dtype.
    """
    sums = check_se_excite_args(sums, hw, w1, b1, w2, b2, **TRITON_CHECKS)
    return _se_excite_op(sums.contiguous(), int(hw), w1, b1, w2, b2)


@triton.jit
def _se_squeeze_kernel(y_ptr, scale_ptr, shift_ptr, sums_ptr, C, HW, W, tiles_per_image,
                       syn, syh, syw, syc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    _, n_rows, h, w, row_ok = output_rows(pid_m, 0, HW, W, tiles_per_image, True, BLOCK_M)
    mask = row_ok[:, None] & c_ok[None, :]
    off = (n_rows.to(tl.int64) * syn + h * syh + w * syw)[:, None] + (c * syc)[None, :]
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    act = tl.where(mask, tl.maximum(y * scale[None, :] + shift[None, :], 0.0), 0.0)
    tl.store(sums_ptr + pid_m.to(tl.int64) * C + c, tl.sum(act, axis=0), mask=c_ok)


def _squeeze_tiles(hw: int, c: int) -> tuple[int, int]:
    return min(128, triton.next_power_of_2(hw)), min(64, triton.next_power_of_2(c))


@torch.library.custom_op("regnet_triton::se_squeeze", mutates_args=())
def _se_squeeze_op(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    n, c, h, w = y.shape
    block_m, block_c = _squeeze_tiles(h * w, c)
    tiles = triton.cdiv(h * w, block_m)
    sums = torch.empty((n, tiles, c), dtype=acc_dtype(y.dtype), device=y.device)
    if sums.numel():
        _se_squeeze_kernel[(n * tiles, triton.cdiv(c, block_c))](
            y, scale, shift, sums, c, h * w, w, tiles, *nhwc_strides(y),
            BLOCK_M=block_m, BLOCK_C=block_c, ACC_DTYPE=acc_constexpr(y.dtype))
    return sums


@_se_squeeze_op.register_fake
def _(y, scale, shift):
    n, c, h, w = y.shape
    return y.new_empty((n, triton.cdiv(h * w, _squeeze_tiles(h * w, c)[0]), c),
                       dtype=acc_dtype(y.dtype))


def _se_squeeze_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _se_squeeze_backward(ctx, grad_sums):
    """y is a lazy BN output (see conv_bn_train): its gradient is dL/dv."""
    y, scale, shift = ctx.saved_tensors
    rows = _squeeze_tiles(y.shape[2] * y.shape[3], y.shape[1])[0]
    g = bn_act_backward(grad_sums.contiguous(), y, scale, shift, relu=True, grad_rows_per_tile=rows)
    return g.dv, None, None


_se_squeeze_op.register_autograd(_se_squeeze_backward, setup_context=_se_squeeze_setup)


@op_errors("se_squeeze", "triton")
def se_squeeze(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-(image, row tile, channel) sums of relu(y * scale + shift): the SE
    squeeze of a training-mode BN + ReLU output, from the raw conv output y.
    y is a lazy BN output (`conv_bn_train`): its gradient is dL/dv, v = y * scale + shift.
    scale, shift and the sums are float32, float64 for a float64 y (`acc_dtype`).
    Returns (N, T, C) partial sums for `se_excite`."""
    check_se_squeeze_args(y, scale, shift, **TRITON_CHECKS)
    return _se_squeeze_op(y, scale, shift)
