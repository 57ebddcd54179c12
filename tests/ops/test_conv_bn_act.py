"""conv_bn_act on every backend (tests/op_backends.py) against a float64 F.conv2d + BN
(+ ReLU) reference (numerics.check_conv_bn_act_op), its bad inputs and opcheck; then its
CUDA launcher under the CPU emulation (the cuda_emu tests)."""
import math

import pytest
import torch
import torch.nn.functional as F

from bad_inputs import CONV_BN_ACT_CASES, conv_bn_act_args, expect_rejected
from cuda_emu.harness import (HALF_TYPES, TOL, S, Out, assert_close, call, conv_args, isolated,
                              launch, out_hw, ref, row_tiles, seed_of, to_layout)
from numerics import (DTYPES, GROUP_WIDTHS, SEER_GROUP_WIDTHS, activation, bn_fold,
                      check_conv_bn_act_op, conv_weight, grouped_conv_cases, ref_conv_bn, rel_err)
from op_backends import backends, per_backend
from regnet_kernels import list_models, model_params
from regnet_kernels.backends.cpp.cuda_tiles import squeeze_row_tiles

# Activation dtypes per backend: the C++ CPU kernels are tested in fp32 and bf16 (fp16 once,
# test_float16_grouped); the CUDA ones in all three, on a GPU and (cuda_emu) under the CPU
# emulation; Triton in numerics.DTYPES (no bf16 under the interpreter, which computes bf16
# dots wrongly). float64: Triton only (the C++ kernels have no float64).
CPU_DTYPES = [torch.float32, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_conv_bn_act(backend, n, c_in, c_out, h, k, stride, groups, dtype, **kwargs):
    """The shared check on `backend`, plus the SE sums' rows per image: one on the C++ CPU
    kernels, one per row tile on the CUDA ones, as many as the C++ fake says
    (cuda_tiles.squeeze_row_tiles; cuda_emu runs the launcher's own plan)."""
    y, sums = check_conv_bn_act_op(backend.ops.conv_bn_act, n, c_in, c_out, h, k, stride, groups,
                                   dtype, device=backend.device, **kwargs)
    if sums is not None and backend.name == "cpu":
        assert sums.shape[1] == 1
    if sums is not None and backend.name in ("cuda", "cuda_emu"):
        ho, wo = y.shape[2:]
        assert sums.shape[1] == squeeze_row_tiles(dtype, c_out // groups, ho * wo)


def test_group_widths_are_the_standard_models():
    widths = {s.group_width for name in list_models() for s in model_params(name).stages()}
    assert sorted(widths) == GROUP_WIDTHS + SEER_GROUP_WIDTHS


@per_backend("cpg,groups,stride,size,batch,squeeze,dtype",
             triton=grouped_conv_cases(DTYPES), cpu=grouped_conv_cases(CPU_DTYPES),
             cuda=grouped_conv_cases(CUDA_DTYPES),
             # fp32 only: the emulated 16-bit GEMMs take minutes at these widths (their
             # tiles are test_cuda_emu_16bit's, below)
             cuda_emu=grouped_conv_cases([torch.float32]))
def test_grouped_3x3(backend, cpg, groups, stride, size, batch, squeeze, dtype):
    c = cpg * groups
    check_conv_bn_act(backend, batch, c, c, size, 3, stride, groups, dtype, squeeze=squeeze)


DENSE_1X1 = [(24, 56, 13, 3), (232, 152, 7, 1), (48, 8, 16, 2)]
CUDA_DENSE_1X1 = [(c_in, c_out, size, 2, d) for c_in, c_out, size, _ in DENSE_1X1[:2]
                  for d in CUDA_DTYPES]


@per_backend("c_in,c_out,size,batch,dtype",
             triton=[(*case, d) for d in DTYPES for case in DENSE_1X1],
             cpu=[(*case, d) for d in CPU_DTYPES for case in DENSE_1X1],
             # the CUDA cases: batch 2
             cuda=CUDA_DENSE_1X1, cuda_emu=CUDA_DENSE_1X1)
def test_dense_1x1(backend, c_in, c_out, size, batch, dtype):
    check_conv_bn_act(backend, batch, c_in, c_out, size, 1, 1, 1, dtype)


@per_backend("stride,dtype", triton=[(s, d) for d in DTYPES for s in (1, 2)],
             cpu=[(1, torch.float32), (2, torch.float32)],
             cuda=[(2, d) for d in CUDA_DTYPES], cuda_emu=[(2, d) for d in CUDA_DTYPES])
def test_dense_3x3(backend, stride, dtype):
    # groups = 1: the dense 3x3 of X-8.0GF stage 1 and Y-32GF stage 1 (narrower here)
    check_conv_bn_act(backend, 2, 40, 48, 13, 3, stride, 1, dtype, squeeze=True)


@per_backend("squeeze,dtype", triton=[(False, d) for d in DTYPES], cpu=[(False, torch.float32)],
             cuda=[(True, d) for d in CUDA_DTYPES], cuda_emu=[(True, d) for d in CUDA_DTYPES])
def test_stem(backend, squeeze, dtype):
    check_conv_bn_act(backend, 2, 3, 32, 13, 3, 2, 1, dtype, squeeze=squeeze)


@backends("cpu")  # fp16 on the C++ CPU kernels, outside CPU_DTYPES (the others run it above)
def test_float16_grouped(backend):
    gen = torch.Generator().manual_seed(3)
    x = activation(2, 16, 7, 7, torch.float16, gen, device=backend.device)
    w = conv_weight(16, 8, 3, torch.float16, gen, device=backend.device)
    scale, shift = bn_fold(16, gen, device=backend.device)
    y = backend.ops.conv_bn_act(x, w, scale, shift, groups=2)
    assert y.dtype == torch.float16
    assert rel_err(y, ref_conv_bn(x, w, scale, shift, 1, 2).relu()) < 2e-3


@backends("triton")  # the C++ kernels have no float64
@pytest.mark.parametrize("k,stride,groups,squeeze", [(3, 2, 3, True), (1, 1, 1, False)])
def test_float64(backend, k, stride, groups, squeeze):
    """float64 runs in float64 throughout (accumulator, scale/shift, squeeze sums)."""
    check_conv_bn_act(backend, 2, 24, 24, 7, k, stride, groups, torch.float64, squeeze=squeeze)


@backends("triton", "cpu", "cuda", "cuda_emu")
def test_no_relu_nchw_input_and_squeeze_tiles_straddling_images(backend):
    # 3 images of 13x14 = 182 pixels: two row tiles per image (Triton), several squeeze
    # chunks per image (C++), and an NCHW input.
    check_conv_bn_act(backend, 3, 16, 24, 13, 3, 1, 2, torch.float32, relu=False, squeeze=True,
                      channels_last=False)


# Dense convs at the odd channel counts of the standard models (the stem's 3, 24, 168,
# 232): chunks that end mid-way (168 = 2 x 64 + 40), chunks of one to a few channels, in
# every tap loop (1x1 and 3x3), both strides, heights 1, 7 and 13, batch 1 and 3.
ODD_CHANNELS = [3, 24, 168, 232]


@backends("triton", "cpu", "cuda", "cuda_emu")
@pytest.mark.parametrize("c", ODD_CHANNELS)
@pytest.mark.parametrize("k,stride,size,batch", [(1, 1, 7, 3), (3, 2, 13, 1), (3, 1, 1, 3)])
def test_dense_odd_channels(backend, c, k, stride, size, batch):
    check_conv_bn_act(backend, batch, c, c if c > 3 else 32, size, k, stride, 1, torch.float32,
                      squeeze=k == 3)


@backends("triton", "cpu", "cuda", "cuda_emu")
def test_channels_last_weight(backend):
    gen = torch.Generator().manual_seed(1)
    x = activation(2, 32, 7, 7, torch.float32, gen, device=backend.device)
    w = conv_weight(32, 16, 3, torch.float32, gen, device=backend.device)
    scale, shift = bn_fold(32, gen, device=backend.device)
    y = backend.ops.conv_bn_act(x, w.to(memory_format=torch.channels_last), scale, shift,
                                groups=2)
    assert rel_err(y, ref_conv_bn(x, w, scale, shift, 1, 2).relu()) < 1e-5


@backends("cpu", "cuda")  # the C++ squeeze: one deterministic sum per image and channel
def test_squeeze_is_deterministic(backend):
    gen = torch.Generator().manual_seed(4)
    x = activation(2, 32, 16, 16, torch.float32, gen, device=backend.device)
    w = conv_weight(32, 16, 3, torch.float32, gen, device=backend.device)
    scale, shift = bn_fold(32, gen, device=backend.device)
    a = backend.ops.conv_bn_act(x, w, scale, shift, groups=2, squeeze=True)
    b = backend.ops.conv_bn_act(x, w, scale, shift, groups=2, squeeze=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch(backend):
    dev = backend.device
    x = torch.empty(0, 8, 5, 5, device=dev)
    y, sums = backend.ops.conv_bn_act(x, torch.randn(8, 8, 1, 1, device=dev),
                                      torch.ones(8, device=dev), torch.zeros(8, device=dev),
                                      squeeze=True)
    assert y.shape == (0, 8, 5, 5) and sums.shape[0] == 0
    if backend.is_cpp:  # one squeeze tile per image
        assert sums.shape == (0, 1, 8)


@pytest.mark.parametrize("over,err,match", CONV_BN_ACT_CASES)
def test_bad_input(backend, over, err, match):
    expect_rejected("conv_bn_act", backend.name,
                    lambda: backend.ops.conv_bn_act(**conv_bn_act_args(backend.device, **over)),
                    err, match)


CPP_OPCHECK = [("conv_bn_act", 2, True), ("conv_bn_act_squeeze", 1, False)]


@per_backend("op,stride,relu",
             triton=[("conv_bn_act", 2, True), ("conv_bn_act_squeeze", 2, True)],
             cpu=CPP_OPCHECK, cuda=CPP_OPCHECK)
def test_opcheck(backend, op, stride, relu):
    gen = torch.Generator().manual_seed(2)
    x = activation(2, 16, 7, 7, torch.float32, gen, device=backend.device)
    w = conv_weight(24, 8, 3, torch.float32, gen, device=backend.device)
    scale, shift = bn_fold(24, gen, device=backend.device)
    torch.library.opcheck(getattr(backend.library, op).default,
                          (x, w, scale, shift, stride, 2, relu))


@pytest.mark.slow
@backends("cpu")
def test_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(7)
    x = activation(2, 16, 7, 7, torch.float32, gen, device=backend.device)
    w = conv_weight(16, 8, 3, torch.float32, gen, device=backend.device)
    s, t = bn_fold(16, gen, device=backend.device)

    def f(x):
        y, sums = backend.ops.conv_bn_act(x, w, s, t, groups=2, squeeze=True)
        return y, sums

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# ---------------------------------------------------------------------------
# The CUDA launcher under the CPU emulation (tests/cuda_emu): layouts and every tensor-core
# tile, with guarded outputs and the squeeze sums of every row tile
# ---------------------------------------------------------------------------

CONV_CASES = [
    # n, c_in, h, c_out, k, stride, groups, relu, x layout, weight layout, squeeze
    (2, 16, 7, 24, 1, 1, 1, True, "nhwc", "cl", False),
    (2, 16, 7, 32, 3, 1, 1, False, "nhwc", "cl", True),
    (2, 48, 13, 48, 3, 2, 6, True, "nhwc", "cl", True),       # group width 8
    (2, 48, 7, 48, 3, 1, 2, True, "nhwc", "contig", False),   # group width 24, element B
    (2, 32, 5, 32, 3, 1, 2, True, "nchw", "cl", True),        # group width 16, element A
    (2, 48, 5, 48, 1, 2, 3, False, "nchw", "contig", False),  # k = 1, stride 2, both element
    (2, 3, 13, 16, 3, 2, 1, True, "nhwc", "contig", False),   # the stem
    (2, 3, 13, 16, 3, 2, 1, True, "nchw", "cl", True),        # the stem, squeeze
    (2, 24, 13, 40, 1, 2, 1, False, "nhwc", "cl", False),     # block_n 64, partial channel tile
    (2, 6, 7, 10, 3, 1, 1, True, "nhwc", "cl", True),         # odd widths: element paths
    (1, 16, 13, 16, 3, 1, 1, True, "nhwc", "cl", True),       # 169 pixels: partial row tile
    (2, 8, 5, 72, 3, 1, 1, True, "nhwc", "cl", False),        # block_n 128
]


def conv_ids(c):
    return "n{}c{}h{}o{}k{}s{}g{}{}{}-{}-{}".format(
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], "r" if c[7] else "", c[8], c[9],
        "sq" if c[10] else "")


def run_conv_bn_act(emu, case, dtype):
    """x and w rounded to dtype; the reference is float64 from those rounded values (the
    kernel accumulates in fp32 and rounds y once to dtype; the sums are fp32)."""
    n, c_in, h, c_out, k, stride, groups, relu, xl, wl, squeeze = case
    torch.manual_seed(seed_of(case))
    x64 = torch.randn(n, c_in, h, h, dtype=torch.float64)
    w64 = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64) / math.sqrt(c_in // groups * k * k)
    scale = torch.rand(c_out) + 0.5
    shift = torch.randn(c_out) * 0.3
    x = to_layout(x64.to(dtype), xl)
    w = w64.to(dtype)
    w = w.contiguous(memory_format=torch.channels_last) if wl == "cl" else w.contiguous()
    expect = F.conv2d(x.double(), w.double(), stride=stride, padding=k // 2, groups=groups)
    expect = expect * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if relu:
        expect = expect.clamp_min(0)
    ho = out_hw(h, k, stride)

    args = conv_args(x, w, scale, shift, stride, groups, relu, None, None, dtype=dtype)
    plan = S.rk_conv_plan()
    launch(emu, "rk_conv_bn_act_plan", ref(args), int(squeeze), ref(plan))
    assert (plan.out_h, plan.out_w) == (ho, ho)
    y = Out((n, ho, ho, c_out), dtype)
    args.y = y.ptr
    sums = None
    if squeeze:
        assert plan.tiles_per_image == -(-ho * ho // plan.block_m)
        sums = Out((n, plan.tiles_per_image, c_out))
        args.sums = sums.ptr
    launch(emu, "rk_conv_bn_act", ref(args), None)
    y.check_guards("y")
    expect_nhwc = expect.permute(0, 2, 3, 1)
    assert_close("y", y.t, expect_nhwc, TOL[dtype])
    if squeeze:  # fp32 sums of the fp32 epilogue values (before y is rounded)
        sums.check_guards("sums")
        assert_close("sums summed over tiles", sums.t.double().sum(1), expect_nhwc.sum((1, 2)))
        per_tile = torch.stack([row_tiles(expect_nhwc[i].reshape(-1, c_out), plan.block_m).sum(1)
                                for i in range(n)])
        assert_close("sums per row tile", sums.t, per_tile)
    return plan


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_ids)
@isolated
def test_cuda_emu_fp32(emu, case):
    run_conv_bn_act(emu, case, torch.float32)


# 16-bit only: the tensor-core tiles the fp32 path never uses (BM = 128 when a tile has
# more than 64 rows and BN > 16; pick_tiles in igemm.cuh).
CONV_CASES_16 = [
    (2, 128, 9, 128, 3, 1, 2, True, "nhwc", "cl", False),     # group width 64: 128 x 64 tiles
    (1, 264, 9, 264, 1, 1, 1, True, "nhwc", "cl", True),      # width 264 > 128: 128 x 128, 3 column tiles
    (2, 16, 13, 136, 3, 2, 1, False, "nhwc", "cl", False),    # 128 x 128, stride 2, partial column tile
    (2, 64, 5, 64, 3, 2, 1, True, "nhwc", "cl", True),        # group width 64, 9 rows per image: 64 x 64
    (2, 16, 13, 40, 3, 1, 1, True, "nchw", "contig", True),   # 169 rows per image, 128 x 64, element paths
]

# The tile shapes of igemm.cuh's 16-bit table (with_tile).
TILES_16 = {"64x8", "64x16", "64x32", "64x64", "64x128", "128x32", "128x64", "128x128"}


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CONV_CASES + CONV_CASES_16, ids=conv_ids)
@isolated
def test_cuda_emu_16bit(emu, case, dtype):
    run_conv_bn_act(emu, case, dtype)


def test_cuda_emu_16bit_cases_cover_every_tile(emu):
    """The 16-bit cases above run every tile shape of igemm.cuh's 16-bit table."""
    seen = set()
    for case in CONV_CASES + CONV_CASES_16:
        n, c_in, h, c_out, k, stride, groups, relu, xl, wl, squeeze = case
        args = S.rk_conv_bn_act_args(dtype=S.RK_FLOAT16, n=n, h=h, w=h, c_in=c_in, c_out=c_out,
                                     k=k, stride=stride, groups=groups)
        plan = S.rk_conv_plan()
        launch(emu, "rk_conv_bn_act_plan", ref(args), int(squeeze), ref(plan))
        seen.add(f"{plan.block_m}x{plan.block_n}")
    assert seen == TILES_16, f"16-bit tiles not covered: {sorted(TILES_16 - seen)}"


@isolated
def test_cuda_emu_rejects_bad_args(emu):
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 2, 2)  # even k
    s = torch.ones(8)
    y = Out((1, 5, 5, 8))
    args = conv_args(x, w, s, s, 1, 1, True, y.ptr, None)
    assert call(emu, "rk_conv_bn_act", ref(args), None) != 0
    y.check_guards()
    assert torch.isnan(y.t).all()
