"""conv_bn_act (Triton) against a float64 F.conv2d + BN + ReLU reference."""
import pytest
import torch

from numerics import (DEVICE, DTYPES, GROUP_WIDTHS, SEER_GROUP_WIDTHS, activation, bn_fold,
                      conv_weight, check_conv_bn_act_op, grouped_conv_cases, poisoned_outputs,
                      ref_conv_bn, rel_err, tol, vector_dtype)
from bad_inputs import CONV_BN_ACT_CASES, conv_bn_act_args
from regnet_kernels import list_models, model_params, ops
from regnet_kernels.backends.triton import igemm



def test_group_widths_are_the_standard_models():
    widths = {s.group_width for name in list_models() for s in model_params(name).stages()}
    assert sorted(widths) == GROUP_WIDTHS + SEER_GROUP_WIDTHS


def check_conv_bn_act(*args, **kwargs):
    return check_conv_bn_act_op(ops.conv_bn_act, *args, **kwargs)


@pytest.mark.parametrize("cpg,groups,stride,size,batch,squeeze,dtype", grouped_conv_cases(DTYPES))
def test_grouped_3x3(cpg, groups, stride, size, batch, squeeze, dtype):
    c = cpg * groups
    check_conv_bn_act(batch, c, c, size, 3, stride, groups, dtype, squeeze=squeeze)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,size,batch", [(24, 56, 13, 3), (232, 152, 7, 1), (48, 8, 16, 2)])
def test_dense_1x1(c_in, c_out, size, batch, dtype):
    check_conv_bn_act(batch, c_in, c_out, size, 1, 1, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_dense_3x3(stride, dtype):
    # groups = 1: the dense 3x3 of X-8.0GF stage 1 and Y-32GF stage 1 (narrower here)
    check_conv_bn_act(2, 40, 48, 13, 3, stride, 1, dtype, squeeze=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stem(dtype):
    check_conv_bn_act(2, 3, 32, 13, 3, 2, 1, dtype)


@pytest.mark.parametrize("k,stride,groups,squeeze", [(3, 2, 3, True), (1, 1, 1, False)])
def test_float64(k, stride, groups, squeeze):
    """float64 runs in float64 throughout (accumulator, scale/shift, squeeze sums)."""
    check_conv_bn_act(2, 24, 24, 7, k, stride, groups, torch.float64, squeeze=squeeze)


def test_no_relu_nchw_input_and_squeeze_tiles_straddling_images():
    # 3 images of 13x14 = 182 pixels: two row tiles per image, and an NCHW input.
    check_conv_bn_act(3, 16, 24, 13, 3, 1, 2, torch.float32, relu=False, squeeze=True,
                      channels_last=False)


@pytest.fixture
def restore_precision_flags():
    flags = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cudnn,
             torch.backends)
    saved = [f.fp32_precision for f in flags]
    yield
    for f, value in zip(flags, saved):
        f.fp32_precision = value


@pytest.mark.parametrize("conv_flag,rnn_flag,expected", [
    ("tf32", "ieee", "tf32"),  # conv and RNN set apart: cudnn.allow_tf32 itself would raise
    ("ieee", "tf32", "ieee"),
    ("none", "none", "ieee"),  # what `cudnn.allow_tf32 = False` sets
])
def test_dot_precision_follows_the_cudnn_conv_flag(restore_precision_flags, conv_flag, rnn_flag,
                                                   expected):
    torch.backends.cudnn.conv.fp32_precision = conv_flag
    torch.backends.cudnn.rnn.fp32_precision = rnn_flag
    assert igemm.dot_precision(torch.float32) == expected
    assert igemm.dot_precision(torch.float64) == "ieee"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 tensor cores need a CUDA device")
def test_tf32_when_cudnn_convs_may_use_it(restore_precision_flags):
    torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(2)
    x = activation(2, 256, 13, 13, torch.float32, gen)
    w = conv_weight(64, 256, 3, torch.float32, gen)
    scale, shift = bn_fold(64, gen)
    err = rel_err(ops.conv_bn_act(x, w, scale, shift), ref_conv_bn(x, w, scale, shift).relu())
    assert 1e-6 < err < 1e-3  # TF32's 10-bit mantissa shows: the flag reached the kernel


def test_channels_last_weight():
    gen = torch.Generator().manual_seed(1)
    x = activation(2, 32, 7, 7, torch.float32, gen)
    w = conv_weight(32, 16, 3, torch.float32, gen)
    scale, shift = bn_fold(32, gen)
    y = ops.conv_bn_act(x, w.to(memory_format=torch.channels_last), scale, shift, groups=2)
    assert rel_err(y, ref_conv_bn(x, w, scale, shift, 1, 2).relu()) < 1e-5


def test_empty_batch():
    x = torch.empty(0, 8, 5, 5, device=DEVICE)
    y, sums = ops.conv_bn_act(x, torch.randn(8, 8, 1, 1, device=DEVICE), torch.ones(8, device=DEVICE),
                              torch.zeros(8, device=DEVICE), squeeze=True)
    assert y.shape == (0, 8, 5, 5) and sums.shape[0] == 0


@pytest.mark.parametrize("over,err,match", CONV_BN_ACT_CASES)
def test_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        ops.conv_bn_act(**conv_bn_act_args(DEVICE, **over))


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.setattr(igemm, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.conv_bn_act(**conv_bn_act_args("cpu"))


@pytest.mark.parametrize("op,squeeze", [("conv_bn_act", False), ("conv_bn_act_squeeze", True)])
def test_opcheck(op, squeeze):
    gen = torch.Generator().manual_seed(2)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 8, 3, torch.float32, gen)
    scale, shift = bn_fold(24, gen)
    torch.library.opcheck(getattr(torch.ops.regnet_triton, op).default,
                          (x, w, scale, shift, 2, 2, True))


# ---------------------------------------------------------------------------
# Training forward: conv_bn_stats (raw output + per-tile BN partials, with the
# previous layer's BN + ReLU and the SE gate applied as the input is loaded)
# ---------------------------------------------------------------------------


def check_conv_bn_stats(n, c_in, c_out, h, k, stride, groups, dtype, prologue=True, gated=False,
                        seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = activation(n, c_in, h, h + 1 if h > 1 else h, dtype, gen)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen)
    u = x.double()
    kwargs = {}
    vec = vector_dtype(dtype)
    if prologue:
        # shift > 0 so relu(0 * s + t) != 0: padding must be zeroed after the transform
        s, t = torch.rand(c_in, generator=gen) + 0.5, torch.rand(c_in, generator=gen) + 0.1
        kwargs.update(in_scale=s.to(DEVICE, vec), in_shift=t.to(DEVICE, vec), in_relu=True)
        u = (u * s.double()[:, None, None].to(DEVICE) + t.double()[:, None, None].to(DEVICE)).relu()
    if gated:
        gate = torch.rand(n, c_in, generator=gen).to(DEVICE, vec)
        kwargs["gate"] = gate
        u = u * gate.double()[:, :, None, None]
    with poisoned_outputs():
        out = ops.conv_bn_stats(x, w, stride=stride, groups=groups, **kwargs)
    ref = torch.nn.functional.conv2d(u, w.double(), stride=stride, padding=k // 2, groups=groups)
    assert out.y.dtype == dtype and out.y.is_contiguous(memory_format=torch.channels_last)
    assert out.tile_sum.dtype == out.tile_m2.dtype == vec
    # a 16-bit input prologue rounds u to x's dtype before the dot
    assert rel_err(out.y, ref) < tol(dtype) * (2 if prologue and dtype != torch.float32 else 1)
    rows = ref.permute(0, 2, 3, 1).reshape(-1, c_out).split(out.rows_per_tile)
    assert out.tile_sum.shape == (len(rows), c_out) == out.tile_m2.shape
    assert rel_err(out.tile_sum, torch.stack([r.sum(0) for r in rows])) < tol(dtype)
    ref_m2 = torch.stack([((r - r.mean(0)) ** 2).sum(0) for r in rows])
    assert rel_err(out.tile_m2, ref_m2) < 2 * tol(dtype)
    assert out.count == ref.shape[0] * ref.shape[2] * ref.shape[3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cpg,groups,stride,size,batch", [
    (8, 3, 2, 13, 3), (24, 2, 1, 7, 1), (56, 1, 2, 16, 3), (120, 2, 1, 7, 1), (264, 1, 2, 13, 1),
])
def test_stats_grouped_3x3(cpg, groups, stride, size, batch, dtype):
    check_conv_bn_stats(batch, cpg * groups, cpg * groups, size, 3, stride, groups, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,stride,gated,prologue", [
    (56, 152, 1, True, True),    # conv c: previous BN + ReLU, then the SE gate
    (24, 56, 2, False, False),   # projection shortcut: strided 1x1 of the block input
    (48, 8, 1, False, True),     # conv a of a narrow block
])
def test_stats_1x1(c_in, c_out, stride, gated, prologue, dtype):
    check_conv_bn_stats(3, c_in, c_out, 13, 1, stride, 1, dtype, prologue=prologue, gated=gated)


@pytest.mark.parametrize("k,stride,groups,gated", [(3, 2, 2, True), (1, 1, 1, False)])
def test_stats_float64(k, stride, groups, gated):
    check_conv_bn_stats(2, 16, 16, 7, k, stride, groups, torch.float64, gated=gated)


def test_stats_stem_and_gate_on_3x3():
    check_conv_bn_stats(2, 3, 32, 13, 3, 2, 1, torch.float32, prologue=False)
    check_conv_bn_stats(1, 16, 16, 7, 3, 1, 2, torch.float32, gated=True)


def test_stats_bad_input():
    x, w = torch.randn(2, 16, 7, 7, device=DEVICE), torch.randn(16, 8, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="both in_scale and in_shift"):
        ops.conv_bn_stats(x, w, groups=2, in_scale=torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match=r"in_scale must have shape \(16,\)"):
        ops.conv_bn_stats(x, w, groups=2, in_scale=torch.ones(8, device=DEVICE),
                          in_shift=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="gate must have shape"):
        ops.conv_bn_stats(x, w, groups=2, gate=torch.ones(2, 8, device=DEVICE))


def test_stats_opcheck():
    gen = torch.Generator().manual_seed(3)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 8, 3, torch.float32, gen)
    s, t = bn_fold(16, gen)
    gate = torch.rand(2, 16, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.regnet_triton.conv_bn_stats.default,
                          (x, w, 2, 2, s, t, True, gate))


# Dense convs at the odd channel counts of the standard models (the stem's 3, 24, 168,
# 232): chunks that end mid-way (168 = 2 x 64 + 40), chunks of one to a few channels, in
# every tap loop (1x1 and 3x3), both strides, heights 1, 7 and 13, batch 1 and 3.
ODD_CHANNELS = [3, 24, 168, 232]


@pytest.mark.parametrize("c", ODD_CHANNELS)
@pytest.mark.parametrize("k,stride,size,batch", [(1, 1, 7, 3), (3, 2, 13, 1), (3, 1, 1, 3)])
def test_dense_odd_channels(c, k, stride, size, batch):
    check_conv_bn_act(batch, c, c if c > 3 else 32, size, k, stride, 1, torch.float32,
                      squeeze=k == 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_channel_slice(dtype):
    """A channel slice of a channels_last tensor: unit channel stride, but pixel strides
    and the base address not multiples of 16 bytes (the row alignment hint drops to what
    the strides allow)."""
    gen = torch.Generator().manual_seed(3)
    full = activation(3, 27, 13, 14, dtype, gen)
    x = full[:, 1:25]
    assert x.stride(1) == 1 and igemm.row_alignment(x) == 1
    w = conv_weight(24, 8, 3, dtype, gen)
    scale, shift = (v.to(vector_dtype(dtype)) for v in bn_fold(24, gen))
    with poisoned_outputs():
        y = ops.conv_bn_act(x, w, scale, shift, stride=1, groups=3)
    assert rel_err(y, ref_conv_bn(x, w, scale, shift, 1, 3).relu()) < tol(dtype)


def test_channel_chunk_and_row_alignment():
    assert [igemm.channel_chunk(c) for c in (3, 8, 24, 40, 56, 168, 264, 2016)] == \
        [16, 16, 32, 16, 64, 64, 64, 64]
    x = torch.empty(2, 168, 7, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert igemm.row_alignment(x) == 8       # 168 bf16 channels: 16-byte rows
    assert igemm.row_alignment(x.float()) == 4
    assert igemm.row_alignment(x[:, :, :, 1:]) == 8
    assert igemm.row_alignment(x[:, 2:6]) == 8  # strides unchanged by the slice
    y = torch.empty(2, 3, 7, 7).to(memory_format=torch.channels_last)
    assert igemm.row_alignment(y) == 1
