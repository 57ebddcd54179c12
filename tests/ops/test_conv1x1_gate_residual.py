"""conv1x1_gate_residual (relu(BN(conv1x1(x * gate)) + shortcut), the shortcut identity or
BN(conv1x1 stride s) of the block input) on every backend (tests/op_backends.py) against a
float64 reference, bad inputs, opcheck; then its CUDA launcher under the CPU emulation."""
import math

import pytest
import torch

from bad_inputs import GATE_RESIDUAL_CASES, PROJ, expect_rejected, gate_residual_args
from cuda_emu.harness import (DT, HALF_TYPES, TOL, S, Out, assert_close, isolated, launch,
                              nhwc_strides, ptr, ref, to_layout)
from numerics import (DTYPES, activation, bn_fold, check_close, conv_weight, nan_filled_empty,
                      ref_conv_bn, vector_dtype)
from op_backends import backends, per_backend


def check_gate_residual(backend, n, c_b, c_out, c_in, h_in, w_in, stride, gated, dtype,
                        channels_last=True, seed=0):
    """x (N, c_b, Ho, Wo) -> c_out channels, plus the shortcut: identity (c_in = 0, the
    shortcut is Ho x Wo = h_in x w_in, stride 1) or a projection of a (N, c_in, h_in, w_in)
    block input with `stride` (Ho, Wo = ceil(h_in / stride), ceil(w_in / stride))."""
    gen = torch.Generator().manual_seed(seed)
    dev, vec = backend.device, vector_dtype(dtype)
    ho, wo = (h_in - 1) // stride + 1, (w_in - 1) // stride + 1
    x = activation(n, c_b, ho, wo, dtype, gen, channels_last, dev)
    w = conv_weight(c_out, c_b, 1, dtype, gen, dev)
    scale, shift = (v.to(vec) for v in bn_fold(c_out, gen, dev))
    kwargs = {}
    u = x.double()
    if gated:
        kwargs["gate"] = torch.rand(n, c_b, generator=gen).to(dev, vec)
        u = u * kwargs["gate"].double()[:, :, None, None]
    ref64 = ref_conv_bn(u, w, scale, shift)
    if c_in:
        shortcut = activation(n, c_in, h_in, w_in, dtype, gen, channels_last, dev)
        pw = conv_weight(c_out, c_in, 1, dtype, gen, dev)
        ps, pt = (v.to(vec) for v in bn_fold(c_out, gen, dev))
        kwargs.update(proj_weight=pw, proj_scale=ps, proj_shift=pt, proj_stride=stride)
        ref64 = ref64 + ref_conv_bn(shortcut, pw, ps, pt, stride)
    else:
        shortcut = activation(n, c_out, ho, wo, dtype, gen, channels_last, dev)
        ref64 = ref64 + shortcut.double()
    with nan_filled_empty():
        y = backend.ops.conv1x1_gate_residual(x, w, scale, shift, shortcut, **kwargs)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref64.relu(), dtype)


def _wide(ho):  # Ho x (Ho + 1) outputs (Ho x Ho at Ho = 1)
    return ho + 1 if ho > 1 else ho


# n, c_b, c_out, c_in (0: identity shortcut), h_in, w_in, stride, gated
TRITON_CASES = [
    (3, 56, 56, 0, 7, 8, 1, True), (1, 232, 232, 0, 13, 14, 1, False),
    (3, 24, 24, 0, 1, 1, 1, True), (1, 152, 152, 0, 16, 17, 1, True),
] + [(n, c_out, c_out, c_in, (ho - 1) * s + 1, _wide(ho) * s, s, gated)
     for n, c_in, c_out, ho, s, gated in [
         (3, 24, 56, 7, 2, True),     # 13x16 -> 7x8
         (1, 32, 48, 13, 2, False),
         (3, 48, 120, 1, 2, True),    # 1x1 output
         (1, 56, 40, 16, 1, True),    # stride-1 projection (width change only)
     ]]
CPU_CASES = [(n, c_b, c_out, c_in, h, h, s, gated) for n, c_b, c_out, c_in, h, s, gated in [
    (3, 56, 56, 0, 7, 1, True),      # Y identity, gate folded into x (C_out > H*W)
    (1, 24, 24, 0, 13, 1, True),     # Y identity, gate folded into the weights
    (3, 48, 48, 0, 16, 1, False),    # X identity
    (3, 56, 56, 24, 13, 2, True),    # Y projection stride 2
    (1, 232, 232, 112, 7, 2, True),  # wide projection, odd size
    (3, 64, 64, 32, 13, 2, False),   # X projection stride 2
    (1, 48, 48, 32, 7, 1, False),    # projection stride 1
    (3, 8, 16, 8, 1, 2, True),       # 1x1 maps
]]
CUDA_CASES = [(2, 48, 64, 32, (7 - 1) * s + 1, (7 - 1) * s + 1, s, gated) if project else
              (2, 48, 48, 0, 7, 7, 1, gated)
              for project, s, gated in [(False, 1, True), (True, 2, True), (True, 1, False),
                                        (False, 1, False)]]


# Triton: numerics.DTYPES and float64; the C++ CPU kernels: fp32 and bf16; CUDA (on a GPU
# and under the emulation): all three.
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
@per_backend("n,c_b,c_out,c_in,h_in,w_in,stride,gated,dtype",
             triton=[(*c, d) for d in DTYPES for c in TRITON_CASES]
             + [(2, 16, 16, 0, 7, 8, 1, True, torch.float64),
                (2, 16, 16, 24, 13, 16, 2, True, torch.float64)],
             cpu=[(*c, d) for d in (torch.float32, torch.bfloat16) for c in CPU_CASES],
             cuda=[(*c, d) for d in CUDA_DTYPES for c in CUDA_CASES],
             cuda_emu=[(*c, d) for d in CUDA_DTYPES for c in CUDA_CASES])
def test_conv1x1_gate_residual(backend, n, c_b, c_out, c_in, h_in, w_in, stride, gated, dtype):
    check_gate_residual(backend, n, c_b, c_out, c_in, h_in, w_in, stride, gated, dtype)


@backends("triton", "cpu", "cuda", "cuda_emu")
def test_nchw_inputs(backend):
    check_gate_residual(backend, 2, 24, 40, 16, 13, 13, 2, True, torch.float32,
                        channels_last=False)
    check_gate_residual(backend, 2, 40, 40, 0, 7, 7, 1, True, torch.float32, channels_last=False)


@pytest.mark.parametrize("over,err,match", GATE_RESIDUAL_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("conv1x1_gate_residual", backend.name,
                    lambda: backend.ops.conv1x1_gate_residual(
                        **gate_residual_args(backend.device, **over)),
                    err, match)


@per_backend("project,gated", triton=[(False, True), (True, True)],
             cpu=[(False, True), (True, False)], cuda=[(False, True), (True, False)])
def test_opcheck(backend, project, gated):
    a = gate_residual_args(backend.device, gate=torch.rand(2, 16) if gated else None,
                           **(PROJ if project else {}))
    torch.library.opcheck(
        backend.library.conv1x1_gate_residual.default,
        (a["x"], a["weight"], a["scale"], a["shift"], a["gate"], a["shortcut"],
         a.get("proj_weight"), a.get("proj_scale"), a.get("proj_shift"), a.get("proj_stride", 1)))


# ---------------------------------------------------------------------------
# The CUDA launcher under the CPU emulation: layouts, strided gate rows, element paths
# ---------------------------------------------------------------------------

GATE_CASES = [
    # n, h, c_in, c_out, gate, proj (None | (c_r, stride, h_r)), x layout
    (2, 7, 24, 24, True, None, "nhwc"),
    (2, 7, 24, 24, False, None, "nchw"),
    (2, 5, 32, 48, False, (16, 1, 5), "nhwc"),
    (2, 7, 40, 80, True, (24, 2, 13), "nhwc"),
    (2, 7, 16, 24, True, (20, 2, 14), "nchw"),
    (2, 5, 12, 40, True, (20, 1, 5), "nhwc"),   # widths 12 / 20: element paths in NHWC
    (1, 13, 16, 20, True, None, "nhwc"),        # C_out 20: element-wise output chunks
    (3, 5, 8, 36, False, (8, 2, 9), "nhwc"),    # C_out 36: a partial chunk per row
]


def gate_ids(c):
    return "h{}c{}o{}{}-{}-{}".format(c[1], c[2], c[3], "-gate" if c[4] else "",
                                      "id" if c[5] is None else f"proj{c[5][1]}", c[6])


def run_conv1x1_gate_residual(emu, case, dtype):
    """x, w, res, proj_weight in dtype, scale / shift / gate fp32. The kernel gates x in
    fp32 and rounds u = x * gate to dtype before the GEMM: so does the reference."""
    n, h, c_in, c_out, use_gate, proj, xl = case
    torch.manual_seed(c_in * 7 + c_out)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in) / math.sqrt(c_in)).to(dtype)
    scale, shift = torch.rand(c_out) + 0.5, torch.randn(c_out) * 0.3
    gate_full = torch.rand(n, c_in + 5) if use_gate else None  # row stride c_in + 5
    gate = gate_full[:, :c_in] if use_gate else None
    u = (x.float() * gate.view(n, c_in, 1, 1)).to(dtype) if use_gate else x
    main = torch.einsum("nchw,oc->nhwo", u.double(), w.double()) * scale.double() + shift.double()
    if proj is None:
        res = to_layout(torch.randn(n, c_out, h, h), xl).to(dtype)
        short = res.double().permute(0, 2, 3, 1)
        hr, cr = h, c_out
        pw = ps = psh = None
        ps_stride = 1
    else:
        cr, ps_stride, hr = proj
        res = to_layout(torch.randn(n, cr, hr, hr), xl).to(dtype)
        pw = (torch.randn(c_out, cr) / math.sqrt(cr)).to(dtype)
        ps, psh = torch.rand(c_out) + 0.5, torch.randn(c_out) * 0.3
        rs = res.double()[:, :, ::ps_stride, ::ps_stride]
        short = torch.einsum("nchw,oc->nhwo", rs, pw.double()) * ps.double() + psh.double()
    expect = (main + short).clamp_min(0)
    y = Out((n, h, h, c_out), dtype)
    sx, sr = nhwc_strides(x), nhwc_strides(res)
    args = S.rk_conv1x1_gate_residual_args(
        dtype=DT[dtype], x=ptr(x), n=n, h=h, w=h, c_in=c_in, sx_n=sx[0], sx_h=sx[1],
        sx_w=sx[2], sx_c=sx[3], weight=ptr(w), c_out=c_out, sw_o=w.stride(0), sw_i=w.stride(1),
        scale=ptr(scale), shift=ptr(shift), gate=ptr(gate), s_gate_n=c_in + 5, res=ptr(res),
        res_h=hr, res_w=hr, res_c=cr, sr_n=sr[0], sr_h=sr[1], sr_w=sr[2], sr_c=sr[3],
        proj_weight=ptr(pw), sp_o=pw.stride(0) if pw is not None else 0,
        sp_i=pw.stride(1) if pw is not None else 0, proj_scale=ptr(ps), proj_shift=ptr(psh),
        proj_stride=ps_stride, y=y.ptr)
    launch(emu, "rk_conv1x1_gate_residual", ref(args), None)
    y.check_guards("y")
    assert_close("y", y.t, expect, TOL[dtype])


@pytest.mark.parametrize("case", GATE_CASES, ids=gate_ids)
@isolated
def test_cuda_emu_fp32(emu, case):
    run_conv1x1_gate_residual(emu, case, torch.float32)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", GATE_CASES, ids=gate_ids)
@isolated
def test_cuda_emu_16bit(emu, case, dtype):
    run_conv1x1_gate_residual(emu, case, dtype)
