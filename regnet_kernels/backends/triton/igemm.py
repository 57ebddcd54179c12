"""Pieces shared by the Triton backend's convolution ops: the implicit-GEMM main loop, the
output-row decomposition, tile selection and the Triton device check (the argument checks
themselves are shared with the C++ backend: `regnet_kernels.ops.checks`).

A convolution with `groups` groups is, per group, a GEMM
    out[m, co] = sum_k A[m, k] * B[k, co]
with m = (n, oh, ow) over output pixels, co over the group's output channels and
k = (kh, kw, ci) over taps x the group's input channels. A is gathered from the
NHWC input (unit channel stride: `unit_channel_stride`) as it is loaded (padding is a
mask); B from the weight packed (C_out, k, k, C_in/g), i.e. channels_last
(`packed_weight`: a no-op for 1x1 convs and for the fused models' weights), so both
operands' channel runs are contiguous (`conv_accumulate`).

Accumulation dtype: fp32 for fp32/fp16/bf16 activations, fp64 for fp64 ones
(`acc_dtype`), and every per-channel vector that goes with the activations (BN
scale/shift, statistics and partials, SE sums and gate, weight gradients) is in
that dtype too, so a float64 call computes in float64 end to end (what
torch.autograd.gradcheck needs). The kernels take it as the ACC_DTYPE constexpr.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.dispatch import BACKENDS, interpreting
from ...ops.types import acc_dtype

# ---------------------------------------------------------------------------
# Triton device functions
# ---------------------------------------------------------------------------


@triton.jit
def output_rows(pid_m, M, HWo, Wo, tiles_per_image,
                PER_IMAGE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Output pixels of row tile `pid_m`: (flat row m, image n, oh, ow, valid).

    PER_IMAGE tiles never straddle two images (tile t of image n is
    pid_m = n * tiles_per_image + t), so a per-image reduction over the tile
    (the SE squeeze) is a plain column sum.
    """
    if PER_IMAGE:
        n = pid_m // tiles_per_image
        p = (pid_m % tiles_per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = p < HWo
        m = n * HWo + p
        n_rows = tl.zeros_like(p) + n
    else:
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < M
        n_rows = m // HWo
        p = m % HWo
    oh = p // Wo
    ow = p % Wo
    return m, n_rows, oh, ow, row_ok


@triton.jit
def group_channels(group, tile, C_g, BLOCK: tl.constexpr):
    """Channel tile `tile` of group `group` (C_g channels per group): the channels'
    index within the group, which of them exist, and their absolute index."""
    c_g = tile * BLOCK + tl.arange(0, BLOCK)
    return c_g, c_g < C_g, group * C_g + c_g


@triton.jit
def affine_vectors(in_scale_ptr, in_shift_ptr, c, c_ok, IN_AFFINE: tl.constexpr):
    """The prologue's (scale, shift) at channels c (zeros when IN_AFFINE is off)."""
    if IN_AFFINE:
        s = tl.load(in_scale_ptr + c, mask=c_ok, other=0.0)
        t = tl.load(in_shift_ptr + c, mask=c_ok, other=0.0)
    else:
        s = tl.zeros(c.shape, dtype=in_scale_ptr.dtype.element_ty)
        t = s
    return s, t


@triton.jit
def prologue(a, a_mask, c, s, t, rows, gate_ptr, sgn,
             IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr, HAS_GATE: tl.constexpr,
             ACC_DTYPE: tl.constexpr):
    """u = relu?(a * s[c] + t[c]) * gate[n, c] for a tile `a` of an input (rows: image of
    each row; c: absolute channel of each column; s, t: `affine_vectors` at c), computed
    in ACC_DTYPE and zero wherever `a_mask` is false AFTER the transform (relu(0 * s + t)
    is not 0). Returns a in its own dtype when no prologue is on."""
    if IN_AFFINE or IN_RELU or HAS_GATE:
        u = a.to(ACC_DTYPE)
        if IN_AFFINE:
            u = u * s[None, :] + t[None, :]
        if IN_RELU:
            u = tl.maximum(u, 0.0)
        if HAS_GATE:
            g_off = rows.to(tl.int64)[:, None] * sgn + c[None, :]
            u = u * tl.load(gate_ptr + g_off, mask=a_mask, other=0.0)
        a = tl.where(a_mask, u, 0.0).to(a.dtype)
    return a


@triton.jit
def tap_rows(x_img, ih0, iw0, row_ok, tap, H, W, sxh, sxw,
             KSIZE: tl.constexpr, X_ALIGN: tl.constexpr):
    """Element offsets (from x's base; x_img = image offsets, int64) of the input pixels that
    tap `tap` (kh * KSIZE + kw) of each output row reads, and which of them lie inside the
    image. X_ALIGN divides the offsets (the launcher's `row_alignment`), so channel runs load
    as 16-byte vectors."""
    if KSIZE == 1:
        ih = ih0
        iw = iw0
        ok = row_ok
    else:
        kh = tap // KSIZE
        ih = ih0 + kh
        iw = iw0 + (tap - kh * KSIZE)
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.multiple_of(x_img + (ih * sxh + iw * sxw), X_ALIGN), ok


@triton.jit
def conv_accumulate(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, gate_ptr,
                    n_rows, oh, ow, row_ok, ci0, co, co_ok,
                    H, W, stride, pad, sxn, sxh, sxw, sgn,
                    CIN_G: tl.constexpr, KSIZE: tl.constexpr, IN_AFFINE: tl.constexpr,
                    IN_RELU: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_K: tl.constexpr,
                    X_ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """acc[m, co] += sum over (kh, kw, ci) of u[n, ih, iw, ci0 + ci] * w[co, kh, kw, ci].

    The reduction walks the taps outside and contiguous chunks of BLOCK_K of the group's
    CIN_G input channels inside, flattened into one loop of KSIZE^2 * ceil(CIN_G / BLOCK_K)
    steps whose trip count is a constant (so the pipeliner overlaps loads across taps).
    Per step, the tap and the chunk are scalars: a tile costs one row offset and one
    bounds mask per row, and its channels are contiguous (x has unit channel stride, w is
    packed (C_out, k, k, CIN_G), i.e. channels_last), so they load as 16-byte vectors
    whenever CIN_G and X_ALIGN allow. A chunk past CIN_G is masked (group width 56 runs
    as 64).

    u is x as stored, or x transformed as it is loaded (`prologue`): IN_AFFINE/IN_RELU
    apply the previous layer's training-mode BN and ReLU, so its normalized output is never
    written; HAS_GATE applies the SE excitation.
    """
    NCHUNK: tl.constexpr = (CIN_G + BLOCK_K - 1) // BLOCK_K
    ih0 = oh * stride - pad
    iw0 = ow * stride - pad
    x_img = n_rows.to(tl.int64) * sxn
    w_col = co.to(tl.int64) * (KSIZE * KSIZE * CIN_G)
    for step in range(KSIZE * KSIZE * NCHUNK):
        tap = step // NCHUNK
        c = (step - tap * NCHUNK) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = c < CIN_G
        rows, ok = tap_rows(x_img, ih0, iw0, row_ok, tap, H, W, sxh, sxw, KSIZE, X_ALIGN)
        a_mask = ok[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + rows[:, None] + (ci0 + c)[None, :], mask=a_mask, other=0.0)
        s, t = affine_vectors(in_scale_ptr, in_shift_ptr, ci0 + c, c_ok, IN_AFFINE)
        a = prologue(a, a_mask, ci0 + c, s, t, n_rows, gate_ptr, sgn,
                     IN_AFFINE, IN_RELU, HAS_GATE, ACC_DTYPE)
        b = tl.load(w_ptr + w_col[None, :] + (tap * CIN_G + c)[:, None],
                    mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


# ---------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def conv_tiles(rows: int, cout_g: int, cin_g: int,
               dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for `rows` output pixels per tiling unit,
    `cout_g` output channels per group and `cin_g` input channels per group (the
    reduction depth of one tap), in `dtype`.

    BLOCK_N follows the group width (one group per program: packing groups
    would make a block-diagonal GEMM). BLOCK_K is a channel chunk (`channel_chunk`).
    float64 tiles are capped (`fp64_tiles`). Depends on shapes and dtype only: fake
    implementations call it too.
    """
    block_n = _pow2_clamp(cout_g, 8, 128)
    block_k = channel_chunk(cin_g)
    block_m = _pow2_clamp(rows, 16, 64 if block_n >= 128 else 128)
    if dtype == torch.float64:
        return fp64_tiles(block_m, block_n, block_k)
    return block_m, block_n, block_k


def channel_chunk(channels: int) -> int:
    """The K step (16, 32 or 64: a 16-bit tensor-core step is 16 deep) over `channels`
    contiguous channels: the deepest whose padding stays within 1.25x the least padded
    depth. Deep steps cost fewer loop trips; 56 runs as 64, 168 as 3 x 64, 40 as 3 x 16
    (not 64)."""
    padded = {bk: triton.cdiv(channels, bk) * bk for bk in (16, 32, 64)}
    least = min(padded.values())
    return max(bk for bk, depth in padded.items() if 4 * depth <= 5 * least)


def fp64_tiles(block_m: int, block_n: int, block_k: int) -> tuple[int, int, int]:
    """A GEMM tile capped at 64 x 64 x 32 for float64: 8-byte elements double the
    pipeline's shared memory and the accumulator's registers (float64 runs are for
    checking numerics; their tiles are not tuned)."""
    return min(block_m, 64), min(block_n, 64), min(block_k, 32)


def launch_config(block_m: int, block_n: int, prologue: bool = False) -> dict:
    """num_warps / num_stages for a tile (ignored by the interpreter). A prologue
    (transform on load) takes its tiles through registers: 8 warps from 64 x 64 up share
    that work, which keeps those kernels from spilling on sm_90."""
    big = block_m * block_n >= (64 * 64 if prologue else 128 * 128)
    return {"num_warps": 8 if big else 4, "num_stages": 3}


def conv_tf32_allowed() -> bool:
    """Whether cuDNN's fp32 convs may use TF32: the conv's own precision flag, else the
    first of its parents (cuDNN's, then torch's) that is set. Read through the
    per-operator flags, because `torch.backends.cudnn.allow_tf32` raises once a user
    has set the conv and RNN flags apart."""
    for flags in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        if flags.fp32_precision != "none":
            return flags.fp32_precision == "tf32"
    return False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 convs use TF32 tensor cores exactly when cuDNN convs would; fp64 dots are
    exact (16-bit dots ignore the setting)."""
    if dtype == torch.float64 or (dtype == torch.float32 and not conv_tf32_allowed()):
        return "ieee"
    return "tf32"


def acc_constexpr(dtype: torch.dtype) -> tl.dtype:
    """`acc_dtype(dtype)` as the kernels' ACC_DTYPE constexpr."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" or t.device.type == "meta":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"{name} is on {t.device}: the Triton backend runs CUDA tensors, or CPU tensors "
        "under the Triton interpreter (set TRITON_INTERPRET=1 before importing regnet_kernels)"
    )


# What every Triton op passes to the shared argument checks (`ops.checks`): its device check
# and the dtypes the backend table declares.
TRITON_CHECKS = dict(device_check=check_device, dtypes=BACKENDS["triton"].dtypes)


def nhwc_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """x's strides in the kernels' (n, h, w, c) argument order."""
    return x.stride(0), x.stride(2), x.stride(3), x.stride(1)


def unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along channels (the implicit-GEMM kernels load contiguous
    channel chunks): x itself when it is channels_last (or otherwise NHWC-strided), else
    a channels_last copy."""
    return x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """A conv weight (C_out, C_in / groups, k, k) with (kh, kw, ci) contiguous per output
    channel: channels_last, which the fused models keep (a no-op then, and for 1x1)."""
    return w.contiguous(memory_format=torch.channels_last)


def row_alignment(x: torch.Tensor) -> int:
    """The largest power of two (at most 16 bytes' worth of elements) that divides x's
    image, row and pixel strides: the X_ALIGN constexpr of `conv_accumulate`, which lets
    a channel chunk load as one 16-byte vector."""
    align = 16 // x.element_size()
    while align > 1 and any(s % align for s in (x.stride(0), x.stride(2), x.stride(3))):
        align //= 2
    return max(align, 1)
