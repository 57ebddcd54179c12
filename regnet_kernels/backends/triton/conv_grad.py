"""Backward of a k x k conv (padding k // 2, any stride, any groups): the input
gradient (dgrad) and the weight gradient (wgrad), each one Triton implicit GEMM.

    y = conv(u, w, stride, padding=k // 2, groups)
    dx = conv_dgrad(dy, w, (H, W), stride, groups)        # dL/du, NHWC
    dw = conv_wgrad(u, dy, k, stride, groups)             # dL/dw, float32 (or float64)

Both read activations with unit channel stride (channels_last; others are copied
to it first) and accumulate on the tensor cores in fp32, or in fp64 for fp64 inputs (the
accumulation dtype, `acc_dtype`, which the prologues' vectors and dw are in too).

Prologues fold the layers around the conv in, so no normalized tensor is ever written:
- `DyPrologue` folds a training BatchNorm + ReLU backward into dy:
      dy_eff = A[c] * g * [mask_src * mask_scale[c] + mask_shift[c] > 0] + B[c] * y + C[c]
  with g the tensor passed as dy, y the raw (pre-BN) conv output. dy_eff is never formed:
  it is linear in (g, y, 1) with per-output-channel coefficients, which a conv's gradients
  can take outside the sum over output channels. dgrad reduces over them: it runs two
  GEMMs, g against A * w and y against B * w (weights scaled on the host), plus the
  constant sum over the valid taps of C * w; wgrad keeps them apart: three accumulators
  (u x g, u x y, column sums of u) combined with A, B, C in the epilogue. The main loops
  then only load and multiply (no per-element math), except for the ReLU mask on g.
- `UPrologue` (wgrad) recomputes the conv input from the previous layer's raw
  output r: u = relu?(r * scale[c] + shift[c]) * gate[n, c], zero in the padding.

dgrad is the transposed conv: for an input pixel ih the taps that read it are
those with (ih + pad - kh) divisible by the stride. Input pixels are split into
stride x stride parity classes (ih % stride, iw % stride); each program handles
one class, in which exactly the taps kh = (ih + pad) % stride + stride * j
contribute, so a stride-2 dgrad runs no masked-out taps.

wgrad reduces over M = N * Ho * Wo. M is cut into a number of chunks fixed by
the call (shapes, dtype, and whether a prologue is on), each chunk's programs
write partials and the chunks are summed in a fixed order: bit-identical
results run to run, no atomics.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ...ops.checks import (check_activation, check_channel_vector, check_gate, check_same,
                           check_weight, op_errors)
from ...ops.types import acc_dtype, conv_output_size, new_activation
from .igemm import (
    _pow2_clamp,
    acc_constexpr,
    affine_vectors,
    conv_tiles,
    dot_precision,
    fp64_tiles,
    group_channels,
    launch_config,
    nhwc_strides,
    output_rows,
    packed_weight,
    prologue,
    row_alignment,
    tap_rows,
    TRITON_CHECKS,
    unit_channel_stride,
)
from .tuning import launch_tuned


class DyPrologue(NamedTuple):
    """BN (training) + ReLU backward folded into an affine map of dy, applied as dy is loaded:
        dy_eff = A[c] * dy * mask + B[c] * y + C[c],
        mask = (mask_src * mask_scale[c] + mask_shift[c] > 0)   (1 without mask_src).
    y (and mask_src) have dy's shape and dtype; the vectors are (C_out,) in dy's
    accumulation dtype (float32, float64 for float64 dy). mask_src is y itself for a
    BN + ReLU layer (mask_scale/shift = the BN's scale/shift) or e.g. the block output
    (scale 1, shift 0)."""
    y: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    mask_src: Optional[torch.Tensor] = None
    mask_scale: Optional[torch.Tensor] = None
    mask_shift: Optional[torch.Tensor] = None


class UPrologue(NamedTuple):
    """The conv input recomputed from the raw tensor r passed as u:
    u = relu?(r * scale[c] + shift[c]) * gate[n, c]; scale/shift (C_in,), gate
    (N, C_in) or None, in r's accumulation dtype (float32, float64 for float64 r).
    Padding is zero after the transform."""
    scale: torch.Tensor
    shift: torch.Tensor
    relu: bool = True
    gate: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton.jit
def _masked_dy(dy_ptr, mask_ptr, mask_scale_ptr, mask_shift_ptr, off, co, co_ok, valid,
               HAS_MASK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """g = dy at element offsets `off` (co: the absolute output channel of each column), 0
    where `valid` is false and, with HAS_MASK, where mask_src * mask_scale + mask_shift <= 0.
    mask_src shares dy's layout (the launchers make both channels_last)."""
    g = tl.load(dy_ptr + off, mask=valid, other=0.0)
    if HAS_MASK:
        src = tl.load(mask_ptr + off, mask=valid, other=0.0).to(ACC_DTYPE)
        ms = tl.load(mask_scale_ptr + co, mask=co_ok, other=0.0)
        mt = tl.load(mask_shift_ptr + co, mask=co_ok, other=0.0)
        g = tl.where(src * ms[None, :] + mt[None, :] > 0.0, g, 0.0).to(dy_ptr.dtype.element_ty)
    return g


@triton.jit(do_not_specialize=["Mq", "tiles_m"])
def _conv_dgrad_kernel(
    dy_ptr, wa_ptr, dx_ptr, y_ptr, wb_ptr, wc_ptr, mask_ptr, mask_scale_ptr, mask_shift_ptr,
    H, W, Ho, Wo, groups, Hq, Wq, Mq, tiles_m, tiles_n, stride, pad, sdn, sdh, sdw,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KSIZE: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dx[n, ih, iw, ci] = sum over (kh, kw, co) of dy[n, oh, ow, co] * w[co, kh, kw, ci],
    oh = (ih + pad - kh) / stride (only exact quotients in range). The reduction walks the
    parity class's taps outside and chunks of BLOCK_K of the group's COUT_G output channels
    inside (as `conv_accumulate` does). With the dy prologue (module docstring), wa = A * w,
    wb = B * w and wc[tap, ci] = sum over co of C * w: dx = g (x) wa + y (x) wb + the wc of
    the valid taps."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = pid_n // tiles_n
    ci_g, ci_ok, ci = group_channels(group, pid_n % tiles_n, CIN_G, BLOCK_N)
    # Parity class (ph, pw) of this row tile: input pixels (ph + stride * i, pw + stride * j).
    phase = pid_m // tiles_m
    ph = phase // stride
    pw = phase - ph * stride
    _, n_rows, i, j, row_ok = output_rows(pid_m - phase * tiles_m, Mq, Hq * Wq, Wq, 0,
                                          False, BLOCK_M)
    ih = ph + i * stride
    iw = pw + j * stride
    row_ok = row_ok & (ih < H) & (iw < W)
    # The class's taps: kh = kh0 + stride * th for th < nth, reading oh = i + qh - th.
    kh0 = (ph + pad) % stride
    kw0 = (pw + pad) % stride
    qh = (ph + pad) // stride
    qw = (pw + pad) // stride
    nth = (KSIZE - kh0 + stride - 1) // stride
    ntw = (KSIZE - kw0 + stride - 1) // stride
    NCHUNK: tl.constexpr = (COUT_G + BLOCK_K - 1) // BLOCK_K
    co0 = group * COUT_G
    dy_img = n_rows.to(tl.int64) * sdn
    w_col = ci_g.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for step in range(nth * ntw * NCHUNK):
        t = step // NCHUNK
        c = (step - t * NCHUNK) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = c < COUT_G
        th = t // ntw
        tw = t - th * ntw
        oh = i + (qh - th)
        ow = j + (qw - tw)
        ok = row_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        rows = tl.multiple_of(dy_img + (oh * sdh + ow * sdw), D_ALIGN)
        off = rows[:, None] + (co0 + c)[None, :]
        valid = ok[:, None] & c_ok[None, :]
        g = _masked_dy(dy_ptr, mask_ptr, mask_scale_ptr, mask_shift_ptr, off, co0 + c, c_ok,
                       valid, HAS_MASK, ACC_DTYPE)
        tap = (kh0 + th * stride) * KSIZE + kw0 + tw * stride
        b_off = ((co0 + c).to(tl.int64) * (KSIZE * KSIZE * CIN_G) + tap * CIN_G)[:, None] \
            + w_col[None, :]
        b_mask = c_ok[:, None] & ci_ok[None, :]
        acc = tl.dot(g, tl.load(wa_ptr + b_off, mask=b_mask, other=0.0), acc,
                     input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if PROLOGUE:
            acc = tl.dot(tl.load(y_ptr + off, mask=valid, other=0.0),
                         tl.load(wb_ptr + b_off, mask=b_mask, other=0.0), acc,
                         input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if PROLOGUE:  # the constant C[co]: its weight sums over the taps that land in dy
        for t in range(nth * ntw):
            th = t // ntw
            tw = t - th * ntw
            oh = i + (qh - th)
            ow = j + (qw - tw)
            ok = (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
            tap = (kh0 + th * stride) * KSIZE + kw0 + tw * stride
            wc = tl.load(wc_ptr + tap * (groups * CIN_G) + ci, mask=ci_ok, other=0.0)
            acc += tl.where(ok[:, None], wc[None, :], 0.0)

    dx_off = (((n_rows.to(tl.int64) * H + ih) * W + iw) * (groups * CIN_G))[:, None] + ci[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & ci_ok[None, :])


@triton.jit(do_not_specialize=["M", "rows_per_split"])
def _conv_wgrad_kernel(
    u_ptr, dy_ptr, dw_ptr, in_scale_ptr, in_shift_ptr, gate_ptr,
    y_ptr, dy_a_ptr, dy_b_ptr, dy_c_ptr, mask_ptr, mask_scale_ptr, mask_shift_ptr,
    H, W, Ho, Wo, groups, M, rows_per_split, tiles_ci, tiles_co, stride, pad,
    sun, suh, suw, sgn, sdn, sdh, sdw,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KSIZE: tl.constexpr, IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    HAS_GATE: tl.constexpr, PROLOGUE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    U_ALIGN: tl.constexpr, D_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Partial dw[split, co, ci, kh, kw] = sum over the split's rows m = (n, oh, ow) of
    u[n, oh * stride - pad + kh, ow * stride - pad + kw, ci] * dy[n, oh, ow, co].

    One program per (tap, input-channel tile, output-channel tile, group): a GEMM with the
    tile's input channels as the dot's M (BLOCK_M), the output channels as its N (BLOCK_N)
    and the split's pixel rows as its K (BLOCK_K). Both operands are contiguous channel
    runs. The taps of one tile are adjacent in launch order, so their dy rows come from L2.
    With the dy prologue (module docstring) three accumulators, u x g, u x y and u x 1 (the
    column sums of u), meet A, B and C in the epilogue.
    """
    TAPS: tl.constexpr = KSIZE * KSIZE
    split = tl.program_id(0)
    pid = tl.program_id(1)
    tap = pid % TAPS
    rest = pid // TAPS
    t_ci = rest % tiles_ci
    rest = rest // tiles_ci
    t_co = rest % tiles_co
    group = rest // tiles_co
    co_g, co_ok, co = group_channels(group, t_co, COUT_G, BLOCK_N)
    ci_g, ci_ok, ci = group_channels(group, t_ci, CIN_G, BLOCK_M)
    Cout = groups * COUT_G
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if PROLOGUE:
        acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        acc_1 = tl.zeros((BLOCK_M, 16), dtype=ACC_DTYPE)
        ones = tl.full((BLOCK_K, 16), 1.0, dtype=u_ptr.dtype.element_ty)
    s, t = affine_vectors(in_scale_ptr, in_shift_ptr, ci, ci_ok, IN_AFFINE)  # loop-invariant
    # The rows (n, oh, ow) of the first step, then advanced by BLOCK_K rows a step with
    # carries in that mixed radix: no integer division in the loop.
    _, n_rows, oh, ow, _ = output_rows(split * (rows_per_split // BLOCK_K), M, Ho * Wo, Wo, 0,
                                       False, BLOCK_K)
    step_n = BLOCK_K // (Ho * Wo)
    step_h = (BLOCK_K - step_n * Ho * Wo) // Wo
    step_w = BLOCK_K - step_n * Ho * Wo - step_h * Wo
    for m0 in range(m_lo, m_hi, BLOCK_K):
        row_ok = m0 + tl.arange(0, BLOCK_K) < m_hi
        rows, ok = tap_rows(n_rows.to(tl.int64) * sun, oh * stride - pad, ow * stride - pad,
                            row_ok, tap, H, W, suh, suw, KSIZE, U_ALIGN)
        u_mask = ok[:, None] & ci_ok[None, :]
        u = tl.load(u_ptr + rows[:, None] + ci[None, :], mask=u_mask, other=0.0)
        u = prologue(u, u_mask, ci, s, t, n_rows, gate_ptr, sgn,
                     IN_AFFINE, IN_RELU, HAS_GATE, ACC_DTYPE)
        d_rows = tl.multiple_of(n_rows.to(tl.int64) * sdn + (oh * sdh + ow * sdw), D_ALIGN)
        off = d_rows[:, None] + co[None, :]
        valid = row_ok[:, None] & co_ok[None, :]
        g = _masked_dy(dy_ptr, mask_ptr, mask_scale_ptr, mask_shift_ptr, off, co, co_ok,
                       valid, HAS_MASK, ACC_DTYPE)
        ut = tl.trans(u)
        acc = tl.dot(ut, g, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if PROLOGUE:
            acc_y = tl.dot(ut, tl.load(y_ptr + off, mask=valid, other=0.0), acc_y,
                           input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc_1 = tl.dot(ut, ones, acc_1, input_precision=DOT_PRECISION,
                           out_dtype=ACC_DTYPE)
        ow += step_w
        carry = (ow >= Wo).to(tl.int32)
        ow -= carry * Wo
        oh += step_h + carry
        carry = (oh >= Ho).to(tl.int32)
        oh -= carry * Ho
        n_rows += step_n + carry
    if PROLOGUE:  # dw = A * (u x g) + B * (u x y) + C * (column sums of u)
        a = tl.load(dy_a_ptr + co, mask=co_ok, other=0.0)
        b = tl.load(dy_b_ptr + co, mask=co_ok, other=0.0)
        c = tl.load(dy_c_ptr + co, mask=co_ok, other=0.0)
        u_sum = tl.max(acc_1, axis=1)  # 16 equal columns
        acc = acc * a[None, :] + acc_y * b[None, :] + u_sum[:, None] * c[None, :]

    # dw is (C_out, C_in / groups, k, k) contiguous: (ci, tap) lands at ci * k * k + tap
    dw_off = (split.to(tl.int64) * Cout * (CIN_G * TAPS) + (co.to(tl.int64) * (CIN_G * TAPS))[None, :]
              + (ci_g * TAPS + tap)[:, None])
    tl.store(dw_ptr + dw_off, acc, mask=ci_ok[:, None] & co_ok[None, :])


# ---------------------------------------------------------------------------
# Geometry: from shapes, dtype and the prologue flag only
# ---------------------------------------------------------------------------

# wgrad split of M: enough programs for ~2 waves on a 132-SM GPU, at least this many
# row blocks per chunk, and at most this many partial values in all.
_WGRAD_PROGRAMS = 264
_MIN_BLOCKS_PER_SPLIT = 4
_MAX_PARTIALS = 1 << 24


def _halve_k_step(dtype: torch.dtype, prologue: bool) -> bool:
    """A prologue on fp32 or fp64 tiles: the pipeliner buffers the prologue's tiles too,
    which would overflow shared memory at the full K step."""
    return prologue and dtype.itemsize >= 4


def dgrad_geometry(n: int, h: int, w: int, cin_g: int, cout_g: int, k: int, stride: int,
                   dtype: torch.dtype = torch.float32, prologue: bool = False):
    """(Hq, Wq, (BLOCK_M, BLOCK_N, BLOCK_K)): rows of one parity class are N x Hq x Wq;
    a class has at most ceil(k / stride)^2 taps, each a reduction over `cout_g` channels in
    chunks of BLOCK_K. A dy prologue on fp32/fp64 halves the K step (shared memory); fp64
    tiles are capped (`fp64_tiles`)."""
    hq, wq = triton.cdiv(h, stride), triton.cdiv(w, stride)
    block_m, block_n, block_k = conv_tiles(n * hq * wq, cin_g, cout_g)
    if _halve_k_step(dtype, prologue):
        block_k = max(16, block_k // 2)
    tiles = (block_m, block_n, block_k)
    return hq, wq, fp64_tiles(*tiles) if dtype == torch.float64 else tiles


def wgrad_tiles(rows: int, cout_g: int, cin_g: int, dtype: torch.dtype = torch.float32,
                prologue: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the wgrad GEMM of one tap: M over the `cin_g` input
    channels per group, N over the `cout_g` output channels per group, K over `rows` =
    N x Ho x Wo.
    Wide M / N tiles read each u and dy element fewer times (the wgrad of a grouped
    conv is memory-bound); a prologue on fp32/fp64 halves the K step (shared memory);
    fp64 tiles are capped (`fp64_tiles`)."""
    tiles = (_pow2_clamp(cin_g, 16, 64 if prologue else 128), _pow2_clamp(cout_g, 8, 128),
             _pow2_clamp(rows, 16, 32 if _halve_k_step(dtype, prologue) else 64))
    return fp64_tiles(*tiles) if dtype == torch.float64 else tiles


def wgrad_geometry(n: int, ho: int, wo: int, c_out: int, cin_g: int, k: int, groups: int,
                   dtype: torch.dtype = torch.float32, prologue: bool = False):
    """((BLOCK_M, BLOCK_N, BLOCK_K), splits, rows_per_split) for the wgrad of a conv
    with output (n, c_out, ho, wo). Fixed by the call's shapes, dtype and prologue, so
    bit-reproducible."""
    m = n * ho * wo
    cout_g, kc = c_out // groups, k * k * cin_g
    block_m, block_n, block_k = wgrad_tiles(m, cout_g, cin_g, dtype, prologue)
    out_tiles = groups * k * k * triton.cdiv(cin_g, block_m) * triton.cdiv(cout_g, block_n)
    blocks = max(triton.cdiv(m, block_k), 1)
    splits = max(1, min(triton.cdiv(_WGRAD_PROGRAMS, max(out_tiles, 1)),
                        triton.cdiv(blocks, _MIN_BLOCKS_PER_SPLIT),
                        _MAX_PARTIALS // max(c_out * kc, 1)))
    rows_per_split = triton.cdiv(blocks, splits) * block_k
    # recount: rounding the chunk up to whole blocks can leave fewer chunks
    return (block_m, block_n, block_k), triton.cdiv(max(m, 1), rows_per_split), rows_per_split


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _dy_args(dy, y, mask_src, mask_scale, mask_shift):
    """(dy, y, the mask's pointer arguments, dy's (n, h, w) strides, flags), dy, y and
    mask_src made contiguous channels_last, so that one offset addresses all three (dy
    stands in for absent tensors)."""
    prologue, has_mask = y is not None, mask_src is not None
    dy, y, mask_src = (t if t is None else t.contiguous(memory_format=torch.channels_last)
                       for t in (dy, y, mask_src))
    mask = (mask_src, mask_scale, mask_shift) if has_mask else (dy, dy, dy)
    flags = dict(PROLOGUE=prologue, HAS_MASK=has_mask, D_ALIGN=row_alignment(dy))
    return dy, y if prologue else dy, mask, nhwc_strides(dy)[:3], flags


def _dgrad_weights(weight, groups, dy_a, dy_b, dy_c):
    """(A * w, B * w, the (k * k, C_in) table of sum over each group's output channels of
    C * w), weights packed channels_last in w's dtype, the table in A's dtype; or (w, w, w)
    without a prologue."""
    w = packed_weight(weight)
    if dy_a is None:
        return w, w, w
    c_out, cin_g, k, _ = weight.shape
    scaled = [packed_weight((weight.to(v.dtype) * v[:, None, None, None]).to(weight.dtype))
              for v in (dy_a, dy_b)]
    per_group = weight.to(dy_c.dtype).reshape(groups, c_out // groups, cin_g, k * k)
    wc = (per_group * dy_c.reshape(groups, -1, 1, 1)).sum(1)     # (groups, cin_g, k * k)
    return scaled[0], scaled[1], wc.permute(2, 0, 1).reshape(k * k, groups * cin_g).contiguous()


def _dgrad_launch(dy, weight, h, w, stride, groups, y, dy_a, dy_b, dy_c, *mask):
    n, c_out, ho, wo = dy.shape
    _, cin_g, k, _ = weight.shape
    c_in = cin_g * groups
    dx = new_activation(n, c_in, h, w, dy)
    if dx.numel() == 0:
        return dx
    cout_g = c_out // groups
    hq, wq, (block_m, block_n, block_k) = dgrad_geometry(n, h, w, cin_g, cout_g, k, stride,
                                                         dy.dtype, y is not None)
    tiles_m = triton.cdiv(n * hq * wq, block_m)
    tiles_n = triton.cdiv(cin_g, block_n)
    dy, y, mask, strides, flags = _dy_args(dy, y, *mask)
    wa, wb, wc = _dgrad_weights(weight, groups, dy_a, dy_b, dy_c)
    args = (dy, wa, dx, y, wb, wc, *mask,
            h, w, ho, wo, groups, hq, wq, n * hq * wq, tiles_m, tiles_n, stride, k // 2,
            *strides)
    constexprs = dict(CIN_G=cin_g, COUT_G=cout_g, KSIZE=k, **flags,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      DOT_PRECISION=dot_precision(dy.dtype), ACC_DTYPE=acc_constexpr(dy.dtype))
    launch_tuned(_conv_dgrad_kernel, (stride * stride * tiles_m, groups * tiles_n), args,
                 constexprs, n * hq * wq,
                 launch_config(block_m, block_n, prologue=flags["HAS_MASK"]), dy.device)
    return dx


def _wgrad_launch(u, dy, k, stride, groups, in_scale, in_shift, in_relu, gate, y, dy_a, dy_b,
                  dy_c, *mask):
    n, c_in, h, w = u.shape
    _, c_out, ho, wo = dy.shape
    cin_g, cout_g = c_in // groups, c_out // groups
    any_prologue = in_scale is not None or gate is not None or y is not None
    (block_m, block_n, block_k), splits, rows_per_split = wgrad_geometry(
        n, ho, wo, c_out, cin_g, k, groups, u.dtype, any_prologue)
    m = n * ho * wo
    shape = (c_out, cin_g, k, k)
    dw = torch.empty((splits, *shape) if splits > 1 else shape, dtype=acc_dtype(u.dtype),
                     device=u.device)
    if m == 0 or dw.numel() == 0:
        return dw.zero_() if splits == 1 else dw.zero_().sum(0)
    tiles_ci = triton.cdiv(cin_g, block_m)
    tiles_co = triton.cdiv(cout_g, block_n)
    dy, y, mask, strides, flags = _dy_args(dy, y, *mask)
    u = unit_channel_stride(u)
    affine = in_scale is not None
    abc = (dy_a, dy_b, dy_c) if dy_a is not None else (dw, dw, dw)
    args = (u, dy, dw, in_scale if affine else dw, in_shift if affine else dw,
            gate if gate is not None else dw, y, *abc, *mask,
            h, w, ho, wo, groups, m, rows_per_split, tiles_ci, tiles_co, stride, k // 2,
            *nhwc_strides(u)[:3], gate.stride(0) if gate is not None else 0, *strides)
    constexprs = dict(CIN_G=cin_g, COUT_G=cout_g, KSIZE=k, IN_AFFINE=affine, IN_RELU=in_relu,
                      HAS_GATE=gate is not None, **flags,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, U_ALIGN=row_alignment(u),
                      DOT_PRECISION=dot_precision(u.dtype), ACC_DTYPE=acc_constexpr(u.dtype))
    launch_tuned(_conv_wgrad_kernel, (splits, groups * tiles_co * tiles_ci * k * k), args,
                 constexprs, m, launch_config(block_m, block_n, prologue=any_prologue), u.device)
    # The chunks' partials, summed in a fixed order.
    return dw if splits == 1 else dw.sum(0)


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------


@torch.library.custom_op("regnet_triton::conv_dgrad", mutates_args=())
def _conv_dgrad_op(dy: torch.Tensor, weight: torch.Tensor, input_h: int, input_w: int,
                   stride: int, groups: int, y: Optional[torch.Tensor],
                   dy_a: Optional[torch.Tensor], dy_b: Optional[torch.Tensor],
                   dy_c: Optional[torch.Tensor], mask_src: Optional[torch.Tensor],
                   mask_scale: Optional[torch.Tensor],
                   mask_shift: Optional[torch.Tensor]) -> torch.Tensor:
    return _dgrad_launch(dy, weight, input_h, input_w, stride, groups,
                         y, dy_a, dy_b, dy_c, mask_src, mask_scale, mask_shift)


@_conv_dgrad_op.register_fake
def _(dy, weight, input_h, input_w, stride, groups, y, dy_a, dy_b, dy_c, mask_src, mask_scale,
      mask_shift):
    return new_activation(dy.shape[0], weight.shape[1] * groups, input_h, input_w, dy)


@torch.library.custom_op("regnet_triton::conv_wgrad", mutates_args=())
def _conv_wgrad_op(u: torch.Tensor, dy: torch.Tensor, kernel_size: int, stride: int,
                   groups: int, in_scale: Optional[torch.Tensor],
                   in_shift: Optional[torch.Tensor], in_relu: bool,
                   gate: Optional[torch.Tensor], y: Optional[torch.Tensor],
                   dy_a: Optional[torch.Tensor], dy_b: Optional[torch.Tensor],
                   dy_c: Optional[torch.Tensor], mask_src: Optional[torch.Tensor],
                   mask_scale: Optional[torch.Tensor],
                   mask_shift: Optional[torch.Tensor]) -> torch.Tensor:
    return _wgrad_launch(u, dy, kernel_size, stride, groups, in_scale, in_shift, in_relu, gate,
                         y, dy_a, dy_b, dy_c, mask_src, mask_scale, mask_shift)


@_conv_wgrad_op.register_fake
def _(u, dy, kernel_size, stride, groups, in_scale, in_shift, in_relu, gate, y, dy_a, dy_b,
      dy_c, mask_src, mask_scale, mask_shift):
    return u.new_empty((dy.shape[1], u.shape[1] // groups, kernel_size, kernel_size),
                       dtype=acc_dtype(u.dtype))


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def _check_stride(stride: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def _check_dy_prologue(p: Optional[DyPrologue], dy: torch.Tensor) -> tuple:
    """The prologue's seven tensors for the custom ops (all None without a prologue)."""
    if p is None:
        return (None,) * 7
    if not isinstance(p, DyPrologue):
        raise TypeError(f"dy_prologue must be a DyPrologue, got {type(p).__name__}")
    c_out = dy.shape[1]
    for name, t in (("dy_prologue.y", p.y), ("dy_prologue.mask_src", p.mask_src)):
        if t is None:
            continue
        check_activation(name, t, **TRITON_CHECKS)
        check_same(name, t, dy, "dy")
        if t.shape != dy.shape:
            raise ValueError(f"{name} must have dy's shape {tuple(dy.shape)}, "
                             f"got {tuple(t.shape)}")
    for name in ("A", "B", "C"):
        check_channel_vector(f"dy_prologue.{name}", getattr(p, name), c_out, dy)
    if p.mask_src is None:
        if p.mask_scale is not None or p.mask_shift is not None:
            raise ValueError("dy_prologue.mask_scale/mask_shift given without mask_src")
    else:
        if p.mask_scale is None or p.mask_shift is None:
            raise ValueError("dy_prologue.mask_src needs mask_scale and mask_shift")
        check_channel_vector("dy_prologue.mask_scale", p.mask_scale, c_out, dy)
        check_channel_vector("dy_prologue.mask_shift", p.mask_shift, c_out, dy)
    return tuple(p)


@op_errors("conv_dgrad", "triton")
def conv_dgrad(dy: torch.Tensor, weight: torch.Tensor, input_hw: Sequence[int], stride: int = 1,
               groups: int = 1, *, dy_prologue: Optional[DyPrologue] = None) -> torch.Tensor:
    """Gradient of a conv (k x k, padding k // 2) with respect to its input.

    Args:
        dy: (N, C_out, Ho, Wo) gradient of the conv output (float32/float16/bfloat16, or
            float64, computed in float64 throughout; channels_last is fastest). With
            `dy_prologue` it is the upstream gradient g of the BN + ReLU that follows
            the conv.
        weight: (C_out, C_in / groups, k, k) conv weight, dy's dtype and device.
        input_hw: (H, W) of the conv input (a stride-2 conv maps two sizes to one Ho).
        stride, groups: the conv's.
        dy_prologue: optional `DyPrologue` applied to dy as it is loaded.

    Returns:
        dx: (N, C_in, H, W) channels_last, in dy's dtype (fp32 accumulation, fp64 for fp64).
    """
    check_activation("dy", dy, **TRITON_CHECKS)
    _check_stride(stride)
    c_out, cin_g, k = check_weight("weight", weight, groups)
    check_same("weight", weight, dy, "dy")
    if dy.shape[1] != c_out:
        raise ValueError(f"dy has {dy.shape[1]} channels but weight has {c_out} output channels")
    if len(input_hw) != 2:
        raise ValueError(f"input_hw must be (H, W), got {tuple(input_hw)}")
    h, w = (int(s) for s in input_hw)
    expect = (conv_output_size(h, k, stride), conv_output_size(w, k, stride))
    if h < 1 or w < 1 or tuple(dy.shape[2:]) != expect:
        raise ValueError(f"a {k}x{k} stride-{stride} conv of a {h}x{w} input gives "
                         f"{expect[0]}x{expect[1]}, dy is {dy.shape[2]}x{dy.shape[3]}")
    return _conv_dgrad_op(dy, weight, h, w, stride, groups, *_check_dy_prologue(dy_prologue, dy))


@op_errors("conv_wgrad", "triton")
def conv_wgrad(u: torch.Tensor, dy: torch.Tensor, kernel_size: int, stride: int = 1,
               groups: int = 1, *, u_prologue: Optional[UPrologue] = None,
               dy_prologue: Optional[DyPrologue] = None) -> torch.Tensor:
    """Gradient of a conv (k x k, padding k // 2) with respect to its weight.

    Deterministic: the reduction over N x Ho x Wo is split into chunks fixed by the
    shapes and summed in a fixed order (no atomics), so runs are bit-identical.

    Args:
        u: (N, C_in, H, W) conv input (float32/float16/bfloat16, or float64). With
            `u_prologue` it is the previous layer's raw output r, and the input is recomputed.
        dy: (N, C_out, Ho, Wo) gradient of the conv output, u's dtype and device.
        kernel_size: k (odd); stride, groups: the conv's.
        u_prologue: optional `UPrologue` applied to u as it is loaded.
        dy_prologue: optional `DyPrologue` applied to dy as it is loaded.

    Returns:
        dw: (C_out, C_in / groups, k, k) contiguous, float32 (float64 for float64 u).
    """
    check_activation("u", u, **TRITON_CHECKS)
    check_activation("dy", dy, **TRITON_CHECKS)
    check_same("dy", dy, u, "u")
    _check_stride(stride)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c_in, h, w = u.shape
    for name, c in (("input", c_in), ("output", dy.shape[1])):
        if c % groups:
            raise ValueError(f"groups={groups} does not divide the {c} {name} channels")
    expect = (n, conv_output_size(h, kernel_size, stride), conv_output_size(w, kernel_size, stride))
    if (dy.shape[0], *dy.shape[2:]) != expect:
        raise ValueError(
            f"a {kernel_size}x{kernel_size} stride-{stride} conv of u {tuple(u.shape)} gives "
            f"batch {n} and {expect[1]}x{expect[2]} outputs, dy has shape {tuple(dy.shape)}")
    in_scale = in_shift = gate = None
    in_relu = False
    if u_prologue is not None:
        if not isinstance(u_prologue, UPrologue):
            raise TypeError(f"u_prologue must be a UPrologue, got {type(u_prologue).__name__}")
        in_scale, in_shift, in_relu, gate = u_prologue
        check_channel_vector("u_prologue.scale", in_scale, c_in, u)
        check_channel_vector("u_prologue.shift", in_shift, c_in, u)
        if gate is not None:
            check_gate(gate, n, c_in, u)
        in_relu = bool(in_relu)
    return _conv_wgrad_op(u, dy, kernel_size, stride, groups, in_scale, in_shift, in_relu, gate,
                          *_check_dy_prologue(dy_prologue, dy))
