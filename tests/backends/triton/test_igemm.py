"""The Triton backend's implicit GEMM (regnet_kernels/backends/triton/igemm.py): the dot
precision follows the cuDNN conv flag (TF32 on a GPU), CPU tensors need the interpreter,
the channel chunks and the row alignment hint (and a channel slice that drops it)."""
import pytest
import torch

from bad_inputs import conv_bn_act_args, expect_rejected
from numerics import (DEVICE, DTYPES, activation, bn_fold, conv_weight, poisoned_outputs,
                      ref_conv_bn, rel_err, tol, vector_dtype)
from regnet_kernels import ops
from regnet_kernels.backends.triton import igemm
from regnet_kernels.backends.triton.conv_grad import conv_dgrad, conv_wgrad


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


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.setattr(igemm, "interpreting", lambda: False)
    expect_rejected("conv_bn_act", "triton", lambda: ops.conv_bn_act(**conv_bn_act_args("cpu")),
                    RuntimeError, "TRITON_INTERPRET")


def test_cpu_tensors_without_interpreter_conv_grads(monkeypatch):
    monkeypatch.setattr(igemm, "interpreting", lambda: False)
    expect_rejected("conv_dgrad", "triton",
                    lambda: conv_dgrad(torch.randn(2, 16, 4, 4), torch.randn(16, 8, 3, 3), (7, 8),
                                       2, 2),
                    RuntimeError, "TRITON_INTERPRET")
    expect_rejected("conv_wgrad", "triton",
                    lambda: conv_wgrad(torch.randn(2, 16, 7, 8), torch.randn(2, 24, 4, 4), 3, 2, 2),
                    RuntimeError, "TRITON_INTERPRET")


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
