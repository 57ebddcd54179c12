"""conv_dgrad / conv_wgrad, the Triton backend's conv gradients (the C++ backend computes them
inside conv_bn_train's backward), against float64 autograd of F.conv2d; then the CUDA
launchers rk_conv_dgrad / rk_conv_wgrad under the CPU emulation (cuda_emu).

The reference differentiates a float64 conv of the same input and weight with
the same effective output gradient (the dy prologue computed in float64), and
builds the u prologue's input in float64 before F.conv2d pads it with zeros.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bad_inputs import expect_rejected
from cuda_emu.harness import (CONV_TRAIN_CASES, DT, TOL as EMU_TOL, TRAIN_16, S, Out,
                              apply_prologue, assert_close, call, conv_train_ids, gemm_input,
                              isolated, launch, nhwc_strides, out_hw, prologue_parts, ptr, ref,
                              row_tiles, seed_of, to_layout, train16_ids)
from numerics import (DEVICE, DTYPES, GROUP_WIDTHS, SIZES, activation, conv_weight,
                      poisoned_outputs, rel_err, tol, vector_dtype)
from regnet_kernels.backends.triton.conv_grad import (DyPrologue, UPrologue, conv_dgrad,
                                                      conv_wgrad, wgrad_geometry)


def col(v):
    """A per-channel vector as float64 (C, 1, 1), to broadcast over (N, C, H, W)."""
    return v.double()[:, None, None]


def make_dy_prologue(dy, gen, mask):
    """A random DyPrologue for dy (the upstream gradient g), and dy_eff in float64."""
    n, c, ho, wo = dy.shape
    vec = vector_dtype(dy.dtype)
    y = activation(n, c, ho, wo, dy.dtype, gen)
    a, b, cc = (torch.randn(c, generator=gen).to(DEVICE, vec) for _ in range(3))
    dy_eff = col(a) * dy.double()
    kwargs = {}
    if mask == "y":  # BN + ReLU layer: mask from y through the BN's scale/shift
        kwargs = dict(mask_src=y, mask_scale=torch.rand(c, generator=gen).to(DEVICE, vec) + 0.5,
                      mask_shift=torch.randn(c, generator=gen).to(DEVICE, vec) * 0.5)
    elif mask == "other":  # e.g. the block output after the final ReLU
        kwargs = dict(mask_src=activation(n, c, ho, wo, dy.dtype, gen),
                      mask_scale=torch.ones(c, device=DEVICE, dtype=vec),
                      mask_shift=torch.zeros(c, device=DEVICE, dtype=vec))
    if kwargs:
        src, scale, shift = kwargs["mask_src"], kwargs["mask_scale"], kwargs["mask_shift"]
        dy_eff = torch.where(src.double() * col(scale) + col(shift) > 0, dy_eff, 0.0)
    dy_eff = dy_eff + col(b) * y.double() + col(cc)
    return DyPrologue(y, a, b, cc, **kwargs), dy_eff


def make_u_prologue(r, gen, relu=True, gated=True):
    """A random UPrologue for the raw tensor r, and u in float64. shift > 0 everywhere,
    so relu(0 * s + t) != 0: the padding must be zeroed after the transform."""
    n, c = r.shape[:2]
    vec = vector_dtype(r.dtype)
    s = torch.randn(c, generator=gen).to(DEVICE, vec)
    t = (torch.rand(c, generator=gen) + 0.1).to(DEVICE, vec)
    u = r.double() * col(s) + col(t)
    if relu:
        u = u.relu()
    gate = torch.rand(n, c, generator=gen).to(DEVICE, vec) if gated else None
    if gated:
        u = u * gate.double()[:, :, None, None]
    return UPrologue(s, t, relu, gate), u


def reference(u, w, dy, stride, groups):
    """(dx, dw) of a float64 conv by autograd."""
    u = u.double().requires_grad_()
    w = w.double().requires_grad_()
    y = F.conv2d(u, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
    return torch.autograd.grad(y, (u, w), dy.double())


def check_grads(n, c_in, c_out, h, w, k, stride, groups, dtype, *, dy_prologue=None,
                u_prologue=None, channels_last=True, ops=("dgrad", "wgrad"), seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = activation(n, c_in, h, w, dtype, gen, channels_last)
    wt = conv_weight(c_out, c_in // groups, k, dtype, gen)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = activation(n, c_out, ho, wo, dtype, gen, channels_last)
    dy_eff, u_ref, kw_dy, kw_u = dy, u, {}, {}
    if dy_prologue is not None:
        kw_dy["dy_prologue"], dy_eff = make_dy_prologue(dy, gen, dy_prologue)
    if u_prologue is not None:
        kw_u["u_prologue"], u_ref = make_u_prologue(u, gen, **u_prologue)
    ref_dx, ref_dw = reference(u_ref, wt, dy_eff, stride, groups)
    # A 16-bit prologue rounds its fp32 result to the dot's dtype: one more rounding.
    limit = tol(dtype) * (2 if (dy_prologue or u_prologue) and dtype != torch.float32 else 1)
    if "dgrad" in ops:
        with poisoned_outputs():
            dx = conv_dgrad(dy, wt, (h, w), stride, groups, **kw_dy)
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(dx, ref_dx) < limit, "dgrad"
    if "wgrad" in ops:
        with poisoned_outputs():
            dw = conv_wgrad(u, dy, k, stride, groups, **kw_dy, **kw_u)
        assert dw.dtype == vector_dtype(dtype) and dw.is_contiguous() and dw.shape == wt.shape
        assert rel_err(dw, ref_dw) < limit, "wgrad"


def grouped_cases():
    """Every group width with 1 to 3 groups; stride, size and batch varied so that each
    value of each is met with several widths."""
    for i, cpg in enumerate(GROUP_WIDTHS):
        for j, dtype in enumerate(DTYPES):
            groups = (i + j) % 3 + 1
            stride = 1 + (i + j) % 2
            size = SIZES[(i + 2 * j) % len(SIZES)]
            if cpg * groups * size > 5000:  # interpreter time: the widest groups at 7x7
                size = 7
            batch = 3 if (i // 2 + j) % 2 and cpg * groups * size < 2000 else 1  # interpreter time
            yield pytest.param(cpg, groups, stride, size, batch, dtype,
                               id=f"g{cpg}x{groups}-s{stride}-h{size}-n{batch}-{str(dtype)[6:]}")


@pytest.mark.parametrize("cpg,groups,stride,size,batch,dtype", grouped_cases())
def test_grouped_3x3(cpg, groups, stride, size, batch, dtype):
    c = cpg * groups
    check_grads(batch, c, c, size, size + 1 if size > 1 else size, 3, stride, groups, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_dense_3x3(stride, dtype):
    check_grads(2, 40, 48, 13, 14, 3, stride, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,size,stride,batch", [
    (37, 13, 13, 1, 3),   # odd channel counts
    (232, 152, 7, 1, 1),
    (24, 56, 13, 2, 3),   # projection shortcut: dgrad is zero on odd pixels
    (8, 21, 16, 1, 1),
])
def test_dense_1x1(c_in, c_out, size, stride, batch, dtype):
    check_grads(batch, c_in, c_out, size, size + 1, 1, stride, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stem(dtype):
    check_grads(2, 3, 32, 13, 14, 3, 2, 1, dtype)


def test_nchw_inputs():
    check_grads(3, 16, 24, 13, 14, 3, 1, 2, torch.float32, channels_last=False,
                dy_prologue="y", u_prologue=dict(relu=True, gated=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", [None, "y", "other"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dy_prologue(mask, stride, dtype):
    check_grads(2, 24, 24, 13, 14, 3, stride, 3, dtype, dy_prologue=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,relu,gated", [(3, 1, True, True), (3, 2, True, False),
                                                 (3, 1, False, True), (1, 2, True, True)])
def test_u_prologue(k, stride, relu, gated, dtype):
    check_grads(2, 16, 32, 13, 14, k, stride, 2 if k == 3 else 1, dtype,
                u_prologue=dict(relu=relu, gated=gated), dy_prologue="y", ops=("wgrad",))


@pytest.mark.parametrize("c_in,c_out,k,stride,groups", [(24, 24, 3, 2, 3), (16, 40, 1, 1, 1)])
def test_float64(c_in, c_out, k, stride, groups):
    """float64 end to end, both prologues on: float64 accumulators, vectors and dw."""
    check_grads(2, c_in, c_out, 7, 8, k, stride, groups, torch.float64, dy_prologue="y",
                u_prologue=dict(relu=True, gated=True))


def test_channels_last_weight():
    gen = torch.Generator().manual_seed(1)
    dy = activation(2, 32, 7, 7, torch.float32, gen)
    w = conv_weight(32, 16, 3, torch.float32, gen)
    dx = conv_dgrad(dy, w.to(memory_format=torch.channels_last), (13, 13), 2, 2)
    ref_dx, _ = reference(torch.zeros(2, 32, 13, 13, device=DEVICE), w, dy, 2, 2)
    assert rel_err(dx, ref_dx) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgrad_deterministic(dtype):
    gen = torch.Generator().manual_seed(3)
    n, c, h, groups = 2, 16, 16, 2
    assert wgrad_geometry(n, h, h, c, c // groups, 3, groups)[1] > 1  # several chunks
    u = activation(n, c, h, h, dtype, gen)
    dy = activation(n, c, h, h, dtype, gen)
    prologue, dy_eff = make_dy_prologue(dy, gen, "y")
    runs = [conv_wgrad(u, dy, 3, 1, groups, dy_prologue=prologue) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    _, ref_dw = reference(u, torch.zeros(c, c // groups, 3, 3, device=DEVICE), dy_eff, 1, groups)
    assert rel_err(runs[0], ref_dw) < 2 * tol(dtype)


def test_empty_batch():
    dy = torch.empty(0, 8, 3, 3, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    assert conv_dgrad(dy, w, (5, 5), 2, 2).shape == (0, 8, 5, 5)
    dw = conv_wgrad(torch.empty(0, 8, 5, 5, device=DEVICE), dy, 3, 2, 2)
    assert dw.shape == (8, 4, 3, 3) and (dw == 0).all()


# ---------------------------------------------------------------------------
# Custom ops and bad input
# ---------------------------------------------------------------------------


def _opcheck_inputs(prologue, dtype):
    gen = torch.Generator().manual_seed(2)
    u = activation(2, 16, 7, 8, dtype, gen)
    w = conv_weight(24, 8, 3, dtype, gen)
    dy = activation(2, 24, 4, 4, dtype, gen)
    dy_args = tuple(make_dy_prologue(dy, gen, "y")[0]) if prologue else (None,) * 7
    u_args = tuple(make_u_prologue(u, gen)[0]) if prologue else (None, None, False, None)
    return u, w, dy, dy_args, u_args


@pytest.mark.parametrize("prologue,dtype", [(False, torch.float32), (True, torch.float32),
                                            (True, torch.float64)])
def test_opcheck(prologue, dtype):
    """Among others: the fakes return the real ops' dtypes (a float64 dw for float64)."""
    u, w, dy, dy_args, u_args = _opcheck_inputs(prologue, dtype)
    torch.library.opcheck(torch.ops.regnet_triton.conv_dgrad.default,
                          (dy, w, 7, 8, 2, 2, *dy_args))
    torch.library.opcheck(torch.ops.regnet_triton.conv_wgrad.default,
                          (u, dy, 3, 2, 2, *u_args, *dy_args))


def _dgrad_args(**over):
    args = dict(dy=torch.randn(2, 16, 4, 4), weight=torch.randn(16, 8, 3, 3), input_hw=(7, 8),
                stride=2, groups=2)
    return _on_device({**args, **over})


def _wgrad_args(**over):
    args = dict(u=torch.randn(2, 16, 7, 8), dy=torch.randn(2, 24, 4, 4), kernel_size=3,
                stride=2, groups=2)
    return _on_device({**args, **over})


def _on_device(fields):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


def _dyp(c=16, **over):
    fields = dict(y=torch.randn(2, c, 4, 4), A=torch.ones(c), B=torch.zeros(c), C=torch.zeros(c))
    return DyPrologue(**_on_device({**fields, **over}))


def _up(**over):
    return UPrologue(**_on_device({"scale": torch.ones(16), "shift": torch.zeros(16), **over}))


@pytest.mark.parametrize("over,err,match", [
    (dict(dy=torch.randn(16, 4, 4)), ValueError, "dy must be 4-D"),
    (dict(dy=torch.randn(2, 24, 4, 4)), ValueError, "24 channels but weight has 16"),
    (dict(groups=3), ValueError, "does not divide"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float16)), TypeError, "dtype"),
    (dict(dy=torch.randn(2, 16, 4, 4).long()), TypeError, "dtype"),
    (dict(weight=torch.randn(16, 8, 2, 2)), ValueError, "odd"),
    (dict(input_hw=(9, 8)), ValueError, "gives 5x4"),
    (dict(input_hw=(7,)), ValueError, r"\(H, W\)"),
    (dict(stride=0), ValueError, "stride"),
    (dict(dy_prologue=(1, 2, 3)), TypeError, "DyPrologue"),
    (dict(dy_prologue=_dyp(y=torch.randn(2, 16, 4, 5))), ValueError, "dy's shape"),
    (dict(dy_prologue=_dyp(y=torch.randn(2, 16, 4, 4).half())), TypeError, "dtype"),
    (dict(dy_prologue=_dyp(A=torch.ones(15))), ValueError, r"A must have shape \(16,\)"),
    (dict(dy_prologue=_dyp(C=torch.ones(16).double())), TypeError, "float32"),
    (dict(dy_prologue=_dyp(mask_src=torch.randn(2, 16, 4, 4))), ValueError, "needs mask_scale"),
    (dict(dy_prologue=_dyp(mask_scale=torch.ones(16))), ValueError, "without mask_src"),
])
def test_dgrad_bad_input(over, err, match):
    expect_rejected("conv_dgrad", "triton", lambda: conv_dgrad(**_dgrad_args(**over)), err, match)


@pytest.mark.parametrize("over,err,match", [
    (dict(u=torch.randn(2, 16, 7)), ValueError, "u must be 4-D"),
    (dict(dy=torch.randn(2, 24, 4, 4).half()), TypeError, "dtype"),
    (dict(kernel_size=2), ValueError, "odd"),
    (dict(groups=5), ValueError, "does not divide the 16 input"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(dy=torch.randn(2, 24, 7, 8)), ValueError, "4x4 outputs"),
    (dict(dy=torch.randn(3, 24, 4, 4)), ValueError, "batch 2"),
    (dict(u_prologue=_up(scale=torch.ones(8))), ValueError, r"scale must have shape \(16,\)"),
    (dict(u_prologue=_up(gate=torch.ones(2, 8))), ValueError, r"gate must have shape \(2, 16\)"),
    (dict(u_prologue=_up(gate=torch.ones(2, 16).half())), TypeError, "gate must be float32"),
    (dict(dy_prologue=_dyp(c=24, B=torch.ones(16))), ValueError, r"B must have shape \(24,\)"),
])
def test_wgrad_bad_input(over, err, match):
    expect_rejected("conv_wgrad", "triton", lambda: conv_wgrad(**_wgrad_args(**over)), err, match)


def _odd_channel_cases():
    """(c, k, stride, size, batch); under the interpreter the 3x3 at 13 x 14 with 168 channels
    is `slow` (~15 s; 232 channels runs the same chunk-tail paths at that shape)."""
    for k, stride, size, batch in [(1, 2, 7, 3), (3, 1, 13, 1), (3, 2, 1, 3)]:
        for c in (3, 24, 168, 232):
            slow = DEVICE == "cpu" and (c, k, size) == (168, 3, 13)
            yield pytest.param(c, k, stride, size, batch, id=f"{k}-{stride}-{size}-{batch}-{c}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("c,k,stride,size,batch", list(_odd_channel_cases()))
def test_dense_odd_channels(c, k, stride, size, batch):
    """Dense convs at the odd channel counts of the standard models: channel chunks that
    end mid-way in both gradients' loops (dgrad reduces over C_out, wgrad tiles C_in)."""
    check_grads(batch, c, c if c > 3 else 32, size, size + 1, k, stride, 1, torch.float32,
                dy_prologue="y" if k == 3 else None,
                u_prologue=dict(relu=True, gated=False) if k == 1 else None)


def test_unaligned_channel_slices():
    """u and dy as channel slices of channels_last tensors: unit channel stride, pixel
    strides and base addresses off 16 bytes."""
    gen = torch.Generator().manual_seed(5)
    u = activation(3, 27, 13, 14, torch.float32, gen)[:, 1:25]
    dy = activation(3, 29, 7, 7, torch.float32, gen)[:, 3:27]
    wt = conv_weight(24, 8, 3, torch.float32, gen)
    ref_dx, ref_dw = reference(u, wt, dy, 2, 3)
    with poisoned_outputs():
        assert rel_err(conv_dgrad(dy, wt, (13, 14), 2, 3), ref_dx) < tol(torch.float32)
        assert rel_err(conv_wgrad(u, dy, 3, 2, 3), ref_dw) < tol(torch.float32)


# ---------------------------------------------------------------------------
# The CUDA launchers rk_conv_dgrad / rk_conv_wgrad under the CPU emulation: prologues,
# the dgate partials, the wgrad pixel splits, guarded outputs, every 16-bit tile
# ---------------------------------------------------------------------------

def dgrad_reference(x, w, dy_nhwc, stride, groups, parts):
    x64 = x.double()
    k = w.shape[2]
    dy = dy_nhwc.double().permute(0, 3, 1, 2)
    du = torch.nn.grad.conv2d_input(x.shape, w.double(), dy, stride=stride, padding=k // 2,
                                    groups=groups)
    _, v, a = apply_prologue(x64, parts)
    in_scale, in_shift, relu, gate = parts
    dx = du
    if gate is not None:
        dx = dx * gate.double()[:, :, None, None]
    if relu:
        dx = dx * (v > 0)
    dgate = (du * a) if gate is not None else None  # per pixel, NCHW
    return dx.permute(0, 2, 3, 1), (dgate.permute(0, 2, 3, 1) if dgate is not None else None)


def phase_tiles_of(dgate_image, stride, block_m, tiles):
    """The dgrad's dgate partials of one image (H, W, C): its pixels phase by phase
    (ih % stride, iw % stride), each phase's pixels in row tiles of block_m, tiles per
    phase padded with zero rows."""
    out = []
    for ph in range(stride):
        for pw in range(stride):
            pixels = dgate_image[ph::stride, pw::stride].reshape(-1, dgate_image.shape[-1])
            t = row_tiles(pixels, block_m).sum(1) if pixels.shape[0] else pixels.new_zeros(0, pixels.shape[-1])
            pad = pixels.new_zeros(tiles - t.shape[0], pixels.shape[-1])
            out.append(torch.cat([t, pad]))
    return torch.cat(out)


def run_conv_dgrad(emu, case, dtype):
    """dy, the weight and x in dtype; du accumulates in fp32, dx = du * gate * relu'(v)
    is rounded once to dtype, the dgate partials stay fp32."""
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case) + 1
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, k) / math.sqrt(c_in // groups * k * k)).to(dtype)
    cin_g, cout_g = c_in // groups, c_out // groups
    # weight_t[g * cin_g + ci, kh, kw, co] = weight[g * cout_g + co, ci, kh, kw]
    w_t = (w.view(groups, cout_g, cin_g, k, k).permute(0, 2, 3, 4, 1)
           .reshape(c_in, k, k, cout_g).contiguous())
    ho = out_hw(h, k, stride)
    dy = torch.randn(n, ho, ho, c_out).to(dtype)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    exp_dx, exp_dgate = dgrad_reference(x, w, dy, stride, groups, parts)
    sx = nhwc_strides(x)
    args = S.rk_conv_dgrad_args(
        dtype=DT[dtype], dy=ptr(dy), n=n, out_h=ho, out_w=ho, c_out=c_out, weight_t=ptr(w_t),
        c_in=c_in, k=k, stride=stride, groups=groups,
        x=None if parts_name == "none" else ptr(x),  # read only with a prologue
        h=h, w=h, sx_n=sx[0], sx_h=sx[1],
        sx_w=sx[2], sx_c=sx[3], prologue=pro)
    plan = S.rk_conv_dgrad_plan_t()
    launch(emu, "rk_conv_dgrad_plan", ref(args), ref(plan))
    dx = Out((n, h, h, c_in), dtype)
    args.dx = dx.ptr
    dgp = None
    if exp_dgate is not None:
        phase_tiles = -(-(-(-h // stride)) ** 2 // plan.block_m)  # of the largest phase
        assert plan.tiles_per_image == stride * stride * phase_tiles, (plan.tiles_per_image,
                                                                        plan.block_m)
        dgp = Out((n, plan.tiles_per_image, c_in))
        args.dgate_partials = dgp.ptr
    launch(emu, "rk_conv_dgrad", ref(args), None)
    dx.check_guards("dx")
    assert_close("dx", dx.t, exp_dx, EMU_TOL[dtype])
    if dgp is not None:  # fp32 sums of the fp32 du
        dgp.check_guards("dgate_partials")
        assert_close("dgate (partials summed over t)", dgp.t.double().sum(1), exp_dgate.sum((1, 2)))
        per_tile = torch.stack([phase_tiles_of(exp_dgate[i], stride, plan.block_m, phase_tiles)
                                for i in range(n)])
        assert_close("dgate partials per tile", dgp.t, per_tile)


@pytest.mark.parametrize("case", CONV_TRAIN_CASES, ids=conv_train_ids)
@isolated
def test_cuda_emu_dgrad_fp32(emu, case):
    run_conv_dgrad(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16, ids=train16_ids)
@isolated
def test_cuda_emu_dgrad_16bit(emu, case_dtype):
    run_conv_dgrad(emu, *case_dtype)


# Many narrow groups: about 1024 CTAs in all, so each pixel split spans several K
# steps of the wgrad main loop (the small cases above get one step per split).
WGRAD_EXTRA_CASES = [(2, 4096, 7, 4096, 1, 1, 512, "all", "nhwc")]


def run_conv_wgrad(emu, case, dtype):
    """dy in dtype, u = the prologue of x rounded to dtype (as the kernel loads it);
    fp32 split partials summed in order, dw rounded once to dtype."""
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case) + 2
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    ho = out_hw(h, k, stride)
    dy = torch.randn(n, ho, ho, c_out).to(dtype)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    u = gemm_input(x, parts)
    wshape = (c_out, c_in // groups, k, k)
    expect = torch.nn.grad.conv2d_weight(u, wshape, dy.double().permute(0, 3, 1, 2),
                                         stride=stride, padding=k // 2, groups=groups)
    expect = expect.permute(0, 2, 3, 1)  # (C_out, k, k, C_in / groups)
    sx = nhwc_strides(x)
    args = S.rk_conv_wgrad_args(
        dtype=DT[dtype], dy=ptr(dy), n=n, out_h=ho, out_w=ho, c_out=c_out, x=ptr(x), h=h, w=h,
        c_in=c_in, sx_n=sx[0], sx_h=sx[1], sx_w=sx[2], sx_c=sx[3], k=k, stride=stride,
        groups=groups, prologue=pro)
    ws_n = call(emu, "rk_conv_wgrad_workspace", ref(args))
    assert ws_n >= 0
    ws = Out((max(ws_n, 1),))  # NaN-filled: the kernel must not assume a zeroed workspace
    dw = Out(tuple(expect.shape), dtype)
    args.workspace = ws.ptr
    args.dw = dw.ptr
    launch(emu, "rk_conv_wgrad", ref(args), None)
    dw.check_guards("dw")
    ws.check_guards("workspace")
    assert_close("dw", dw.t, expect, EMU_TOL[dtype])


@pytest.mark.parametrize("case", CONV_TRAIN_CASES + WGRAD_EXTRA_CASES, ids=conv_train_ids)
@isolated
def test_cuda_emu_wgrad_fp32(emu, case):
    run_conv_wgrad(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16 + [(c, torch.bfloat16) for c in WGRAD_EXTRA_CASES],
                         ids=train16_ids)
@isolated
def test_cuda_emu_wgrad_16bit(emu, case_dtype):
    run_conv_wgrad(emu, *case_dtype)
