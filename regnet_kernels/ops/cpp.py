"""The fused eval ops on the C++ extension's CPU kernels (`torch.ops.regnet_kernels.*`).

Same Python signatures, argument checks and results as the Triton functions in
`regnet_kernels.ops`, for CPU tensors (float32, bfloat16, float16; any input
layout, channels_last output). The extension is built on the first call (see
`_extension.py`); importing this module builds nothing. One difference: the SE
squeeze sums of `conv_bn_act(..., squeeze=True)` have one row tile per image,
shape (N, 1, C_out).

The fake implementations below let torch.compile trace the ops; the C++ library
names this module (`set_python_module`), so torch imports it when it needs them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._implicit_gemm import new_activation
from .conv1x1_gate_residual import check_gate_residual_args
from .conv_bn_act import check_conv_bn_act_args
from .se_excite import check_se_excite_args


def _ops():
    """torch.ops.regnet_kernels, building and loading the extension on first use."""
    if not _fakes_registered:
        _extension.load()
        _register_fakes()
    return torch.ops.regnet_kernels


def available() -> tuple[bool, str]:
    """(True, "") when the C++ CPU backend can run (builds it if needed), else (False, reason)."""
    return _extension.available()


# ---------------------------------------------------------------------------
# Fake implementations (shapes only), for torch.compile and opcheck
# ---------------------------------------------------------------------------


def _conv_out(x, weight, stride):
    k = weight.shape[-1]
    ho = (x.shape[2] + 2 * (k // 2) - k) // stride + 1
    wo = (x.shape[3] + 2 * (k // 2) - k) // stride + 1
    return new_activation(x.shape[0], weight.shape[0], ho, wo, x)


_fakes_registered = False


def _register_fakes() -> None:
    """Registers the fake implementations; the ops must exist (the library loaded)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("regnet_kernels::conv_bn_act")
    def _(x, weight, scale, shift, stride, groups, relu):
        return _conv_out(x, weight, stride)

    @torch.library.register_fake("regnet_kernels::conv_bn_act_squeeze")
    def _(x, weight, scale, shift, stride, groups, relu):
        return (_conv_out(x, weight, stride),
                x.new_empty((x.shape[0], 1, weight.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("regnet_kernels::se_excite")
    def _(sums, hw, w1, b1, w2, b2):
        return sums.new_empty((sums.shape[0], sums.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::conv1x1_gate_residual")
    def _(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift,
          proj_stride):
        return new_activation(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], x)

    _fakes_registered = True


# The library loaded by other means (torch imports this module for the fakes, see
# set_python_module in csrc/ops.cpp): register them now.
if hasattr(torch.ops.regnet_kernels, "conv_bn_act"):
    _register_fakes()


# ---------------------------------------------------------------------------
# The functions: the Triton functions' checks, with a CPU device check
# ---------------------------------------------------------------------------


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "meta"):
        raise RuntimeError(
            f"{name} is on {t.device}: the C++ CPU backend (regnet_kernels.ops.cpp) runs CPU "
            "tensors; use the Triton ops (regnet_kernels.ops) for CUDA tensors"
        )


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                *, stride: int = 1, groups: int = 1, relu: bool = True, squeeze: bool = False):
    """Fused conv (k x k, padding k // 2) + folded BN + optional ReLU, on the CPU.

    As `regnet_kernels.ops.conv_bn_act`; with squeeze=True the sums are (N, 1, C_out).
    """
    check_conv_bn_act_args(x, weight, scale, shift, stride, groups, device_check=_check_device)
    ops = _ops()
    if squeeze:
        return ops.conv_bn_act_squeeze(x, weight, scale, shift, stride, groups, relu)
    return ops.conv_bn_act(x, weight, scale, shift, stride, groups, relu)


def se_excite(sums: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """gate = sigmoid(W2 relu(W1 mean + b1) + b2) from SE squeeze sums, on the CPU.

    As `regnet_kernels.ops.se_excite`: sums (N, C) or (N, T, C) float32; returns (N, C) float32.
    """
    sums = check_se_excite_args(sums, hw, w1, b1, w2, b2, device_check=_check_device)
    return _ops().se_excite(sums.contiguous(), int(hw), w1, b1, w2, b2)


def conv1x1_gate_residual(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    shortcut: torch.Tensor, *, gate: Optional[torch.Tensor] = None,
    proj_weight: Optional[torch.Tensor] = None, proj_scale: Optional[torch.Tensor] = None,
    proj_shift: Optional[torch.Tensor] = None, proj_stride: int = 1,
) -> torch.Tensor:
    """relu(conv1x1(x * gate) * scale + shift + shortcut branch), on the CPU.

    As `regnet_kernels.ops.conv1x1_gate_residual` (identity or projection shortcut).
    """
    check_gate_residual_args(x, weight, scale, shift, shortcut, gate, proj_weight, proj_scale,
                             proj_shift, proj_stride, device_check=_check_device)
    return _ops().conv1x1_gate_residual(x, weight, scale, shift, gate, shortcut, proj_weight,
                                        proj_scale, proj_shift,
                                        proj_stride if proj_weight is not None else 1)


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "available"]
