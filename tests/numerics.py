"""Test helpers: float64 references, relative error, NaN-poisoned outputs."""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from regnet_kernels.backends.triton.igemm import conv_tf32_allowed

# ||out - ref|| / ||ref|| bounds per dtype, against a float64 reference.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2,
       torch.float64: 1e-12}  # the Triton ops compute float64 inputs in float64 throughout
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 and fp16 everywhere; bf16 on GPUs only (the interpreter computes bf16 dots wrongly)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def gpu_only(*values):
    """A parametrization that exists only on a GPU machine (the C++ extension's CUDA kernels,
    autocast on the GPU backends), marked `gpu`: the GPU suite (benchmarks/gpu_suite.sh)
    selects the tests the CPU machines never run with -m gpu."""
    return pytest.param(*values, marks=pytest.mark.gpu)


def vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the ops' per-channel vectors (BN scale/shift and statistics, SE gate
    and sums, weight gradients) for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was never written"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and DEVICE == "cuda" and conv_tf32_allowed():
        return 1e-3  # TF32 tensor cores, as cuDNN
    return TOL[dtype]


@contextlib.contextmanager
def poisoned_outputs():
    """Every float tensor the ops allocate with torch.empty starts as NaN, so an
    output element the kernel does not write fails the comparison."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    with mock.patch.object(torch, "empty", nan_empty):
        yield


def activation(n, c, h, w, dtype, generator=None, channels_last=True, device=None):
    x = torch.randn(n, c, h, w, generator=generator).to(device or DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def conv_weight(c_out, cin_g, k, dtype, generator=None, device=None):
    w = torch.randn(c_out, cin_g, k, k, generator=generator) / math.sqrt(cin_g * k * k)
    return w.to(device or DEVICE, dtype)


def bn_fold(c, generator=None, device=None):
    """A random folded BN: scale in [0.5, 1.5], shift ~ N(0, 0.5)."""
    scale = torch.rand(c, generator=generator) + 0.5
    shift = torch.randn(c, generator=generator) * 0.5
    return scale.to(device or DEVICE), shift.to(device or DEVICE)


def ref_conv_bn(x, w, scale, shift, stride=1, groups=1):
    y = F.conv2d(x.double(), w.double(), stride=stride, padding=w.shape[-1] // 2, groups=groups)
    return y * scale.double()[:, None, None] + shift.double()[:, None, None]


def randomize_bn(module: torch.nn.Module, generator=None) -> None:
    """Random affine parameters and running statistics for every BatchNorm."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


# Channels per group over every standard RegNetX/Y model (tests/ops/test_conv_bn_act.py checks the list),
# but those only timm's regnety_64gf and regnety_256gf have: their conv cases are `slow`
# (over a minute under the Triton interpreter).
GROUP_WIDTHS = [8, 16, 24, 40, 48, 56, 64, 72, 80, 112, 120, 128, 168, 232, 264]
SEER_GROUP_WIDTHS = [328, 373]
SIZES = [7, 13, 16, 1]


def grouped_conv_cases(dtypes) -> list:
    """Every group width, with 1 to 3 groups, and stride, size, batch, squeeze varied
    so that each value of each is met with several widths, in each dtype."""
    cases = []
    for i, cpg in enumerate(GROUP_WIDTHS + SEER_GROUP_WIDTHS):
        for j, dtype in enumerate(dtypes):
            groups = (i + j) % 3 + 1
            stride = 1 + (i + j) % 2
            size = SIZES[(i + 2 * j) % len(SIZES)]
            batch = 3 if (i + j) % 2 else 1
            squeeze = (i + j) % 3 != 1
            cases.append(pytest.param(
                cpg, groups, stride, size, batch, squeeze, dtype,
                marks=[pytest.mark.slow] if cpg in SEER_GROUP_WIDTHS else [],
                id=f"g{cpg}x{groups}-s{stride}-h{size}-n{batch}-sq{int(squeeze)}-"
                   f"{str(dtype)[6:]}"))
    return cases


@contextlib.contextmanager
def nan_filled_empty():
    """Every tensor the ops allocate starts as NaN: Python torch.empty (poisoned_outputs)
    and C++ at::empty (torch's fill_uninitialized_memory, active in deterministic mode;
    warn_only, so ops without a deterministic CUDA kernel, e.g. cuBLAS without a
    workspace config, still run)."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with poisoned_outputs():
            yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def close(out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    """Within `bound` in norm (rel_err also asserts every element is finite, i.e. written),
    and no single element off by more than 20 x bound x max |ref|."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err < bound, err
    worst = (out.detach().double() - ref.detach().double()).abs().max()
    assert worst <= 20 * bound * ref.detach().abs().max().double().clamp_min(1e-30), worst


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """close() within the dtype's bound, tol(dtype)."""
    close(out, ref, tol(dtype))


def check_conv_bn_act_op(conv_bn_act, n, c_in, c_out, h, k, stride, groups, dtype, relu=True,
                         squeeze=False, channels_last=True, seed=0, device=None):
    """One backend's conv_bn_act (the Triton or the C++ function) against float64
    F.conv2d + BN (+ ReLU), on NaN-filled allocations; H x (H + 1) inputs on `device`
    (default DEVICE). Returns (y, squeeze sums or None) for backend-specific checks."""
    gen = torch.Generator().manual_seed(seed)
    x = activation(n, c_in, h, h + 1 if h > 1 else h, dtype, gen, channels_last, device)
    w = conv_weight(c_out, c_in // groups, k, dtype, gen, device)
    scale, shift = (v.to(vector_dtype(dtype)) for v in bn_fold(c_out, gen, device))
    with nan_filled_empty():
        out = conv_bn_act(x, w, scale, shift, stride=stride, groups=groups, relu=relu,
                          squeeze=squeeze)
    y, sums = out if squeeze else (out, None)
    ref = ref_conv_bn(x, w, scale, shift, stride, groups)
    if relu:
        ref = ref.relu()
    assert y.dtype == dtype and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref, dtype)
    if squeeze:
        assert sums.dtype == vector_dtype(dtype) and sums.shape[0] == n and sums.shape[2] == c_out
        check_close(sums.sum(1), ref.sum((2, 3)), dtype)
    return y, sums
