"""Argument checks of the fused ops, shared by both backends.

Every check that looks at a tensor's device or dtype takes the backend's `device_check`
(a function (name, tensor) that raises when the backend cannot run that tensor) and its
`dtypes` (the activation dtypes it has kernels for) as required keywords: the backend
table in `dispatch` declares them, so no check guesses which backend it serves.
Every error a backend's op raises names the op and the backend the same way,
`regnet_kernels.<op> (<backend>): ...` (`op_errors`), whichever layer found the problem;
the C++ checks behind these write the same prefix (csrc/op_error.h).
Imports only torch.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch

from .types import BatchNormArgs, acc_dtype, check_count, conv_output_size

DeviceCheck = Callable[[str, torch.Tensor], None]

# The largest SE width the kernels hold in registers (Triton) or on the stack (C++).
MAX_SE_WIDTH = 4096


# The exception types the checks raise; anything else (KeyboardInterrupt, an OSError from a
# build...) passes through untouched.
_PREFIXED_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)


def error_prefix(op: str, backend: str) -> str:
    return f"regnet_kernels.{op} ({backend}): "


def op_errors(op: str, backend: str | None = None):
    """Decorator for a backend's public op function: the TypeError / ValueError / RuntimeError
    it raises start with `error_prefix(op, backend)`. backend=None names the device type of
    the first argument (the C++ backend runs CPU and CUDA tensors). A message that already
    starts with a prefix (a C++ check's) is left as it is; the type stays."""
    def decorate(function):
        first = next(iter(inspect.signature(function).parameters))

        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except _PREFIXED_ERRORS as e:
                message = str(e)
                if type(e) not in _PREFIXED_ERRORS or message.startswith("regnet_kernels."):
                    raise
                where = backend or _device_type(args[0] if args else kwargs.get(first))
                # Same type, the check's own traceback, no "during handling" chain.
                raise type(e)(error_prefix(op, where) + message).with_traceback(
                    e.__traceback__) from None
        return run
    return decorate


def _device_type(t) -> str:
    """The C++ backend's name for its first argument: "cpu" or "cuda" by the tensor's
    device, "cpp" (the extension) for anything else."""
    if isinstance(t, torch.Tensor) and t.device.type in ("cpu", "cuda"):
        return t.device.type
    return "cpp"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_activation(name: str, x: torch.Tensor, channels: int | None = None, *,
                     device_check: DeviceCheck, dtypes: Sequence[torch.dtype]) -> None:
    """A 4-D float activation in one of `dtypes`, on a device `device_check` accepts."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: "
                        + ", ".join(dtype_name(d) for d in dtypes))
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected {channels}")
    device_check(name, x)


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str,
               dtype: bool = True) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_channel_vector(name: str, t: torch.Tensor, channels: int, ref: torch.Tensor) -> None:
    """A per-channel vector (folded BN scale or shift) of length `channels`, in the
    accumulation dtype of the activation `ref` (`acc_dtype`)."""
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    check_vector_dtype(name, t, ref)
    check_same(name, t, ref, "x", dtype=False)


def check_vector_dtype(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """t (a per-channel vector, gate, sums...) is in the accumulation dtype of ref."""
    want = acc_dtype(ref.dtype)
    if t.dtype != want:
        raise TypeError(f"{name} must be {dtype_name(want)} with {dtype_name(ref.dtype)} "
                        f"activations, got {t.dtype}")


def check_optional_affine(names: tuple[str, str], scale, shift, channels: int,
                          ref: torch.Tensor) -> None:
    """An optional per-channel (scale, shift) pair (see check_channel_vector): both or neither."""
    if (scale is None) != (shift is None):
        raise ValueError(f"pass both {names[0]} and {names[1]}, or neither")
    if scale is not None:
        check_channel_vector(names[0], scale, channels, ref)
        check_channel_vector(names[1], shift, channels, ref)


def check_gate(gate: torch.Tensor, n: int, channels: int, x: torch.Tensor) -> None:
    """An (N, C) SE gate in x's accumulation dtype, unit stride along channels."""
    if tuple(gate.shape) != (n, channels):
        raise ValueError(f"gate must have shape ({n}, {channels}), got {tuple(gate.shape)}")
    check_vector_dtype("gate", gate, x)
    check_same("gate", gate, x, "x", dtype=False)
    if gate.stride(1) != 1:
        raise ValueError("gate must have unit stride along channels")


def check_weight(name: str, w: torch.Tensor, groups: int) -> tuple[int, int, int]:
    """A 4-D square odd-sized conv weight whose output channels `groups` divides.

    Returns (out_channels, in_channels_per_group, kernel_size).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 4:
        raise ValueError(f"{name} must be 4-D (C_out, C_in / groups, k, k), got {tuple(w.shape)}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    c_out, cin_g, kh, kw = w.shape
    if c_out % groups:
        raise ValueError(f"groups={groups} does not divide the {c_out} output channels of {name}")
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"{name} must have a square, odd kernel size, got {kh}x{kw}")
    return c_out, cin_g, kh


def check_conv_weight(name: str, w: torch.Tensor, x: torch.Tensor, groups: int) -> tuple[int, int]:
    """A square odd-sized conv weight for `groups` groups over x's channels.

    Returns (out_channels, kernel_size).
    """
    c_out, cin_g, k = check_weight(name, w, groups)
    check_same(name, w, x, "x")
    c_in = x.shape[1]
    if c_in % groups:
        raise ValueError(f"groups={groups} does not divide the {c_in} input channels")
    if cin_g * groups != c_in:
        raise ValueError(
            f"{name} expects {cin_g * groups} input channels ({cin_g} per group x {groups} groups), "
            f"x has {c_in}"
        )
    return c_out, k


def check_prologue_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int,
                        in_scale, in_shift, gate, *, device_check: DeviceCheck,
                        dtypes: Sequence[torch.dtype]) -> int:
    """The arguments of a conv whose input goes through the prologue
    relu?(x * in_scale + in_shift) * gate. Returns the output channels."""
    check_activation("x", x, device_check=device_check, dtypes=dtypes)
    c_out, _ = check_conv_weight("weight", weight, x, groups)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    check_optional_affine(("in_scale", "in_shift"), in_scale, in_shift, x.shape[1], x)
    if gate is not None:
        check_gate(gate, x.shape[0], x.shape[1], x)
    return c_out


def check_batch_norm(args: BatchNormArgs, channels: int, ref: torch.Tensor) -> None:
    """A training BN's tensors: `channels` long, on the activations' device; pairs complete."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(args, name)
        if v is not None:
            if v.shape != (channels,):
                raise ValueError(f"BN {name} must have shape ({channels},), got {tuple(v.shape)}")
            check_same(f"BN {name}", v, ref, "the activations", dtype=False)
    if (args.weight is None) != (args.bias is None):
        raise ValueError("pass both BN weight and bias, or neither")
    if (args.running_mean is None) != (args.running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if args.running_mean is not None and args.momentum is None and args.num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")


# ---------------------------------------------------------------------------
# Each op's checks
# ---------------------------------------------------------------------------


def check_conv_bn_act_args(x, weight, scale, shift, stride, groups, *,
                           device_check: DeviceCheck, dtypes: Sequence[torch.dtype]) -> None:
    check_activation("x", x, device_check=device_check, dtypes=dtypes)
    c_out, _ = check_conv_weight("weight", weight, x, groups)
    check_channel_vector("scale", scale, c_out, x)
    check_channel_vector("shift", shift, c_out, x)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def check_se_excite_args(sums, hw, w1, b1, w2, b2, *, device_check: DeviceCheck,
                         dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """The sums are in the SE weights' accumulation dtype (`acc_dtype`), the weights in one
    of `dtypes`. Returns sums as (N, T, C)."""
    if sums.dim() == 2:
        sums = sums.unsqueeze(1)
    if sums.dim() != 3:
        raise ValueError(f"sums must be (N, C) or (N, T, C), got shape {tuple(sums.shape)}")
    sum_dtypes = list(dict.fromkeys(acc_dtype(d) for d in dtypes))
    if sums.dtype not in sum_dtypes:
        raise TypeError(f"sums must be {' or '.join(dtype_name(d) for d in sum_dtypes)}, "
                        f"got {sums.dtype}")
    device_check("sums", sums)
    if int(hw) < 1:
        raise ValueError(f"hw must be >= 1, got {hw}")
    c = sums.shape[2]
    s = w1.shape[0]
    # 1x1 conv weights (S, C, 1, 1) are read through their first two strides.
    for name, t, shape in (("w1", w1, (s, c)), ("b1", b1, (s,)), ("w2", w2, (c, s)), ("b2", b2, (c,))):
        allowed = (shape, shape + (1, 1)) if len(shape) == 2 else (shape,)
        if tuple(t.shape) not in allowed:
            raise ValueError(f"{name} must have shape {shape} for {c} channels and SE width {s}, "
                             f"got {tuple(t.shape)}")
        check_same(name, t, sums, "sums", dtype=False)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: "
                            + ", ".join(dtype_name(d) for d in dtypes))
        if acc_dtype(t.dtype) != sums.dtype:
            raise TypeError(f"sums must be {dtype_name(acc_dtype(t.dtype))} with "
                            f"{dtype_name(t.dtype)} SE weights ({name}), got {sums.dtype}")
    if s > MAX_SE_WIDTH:
        raise ValueError(f"SE width {s} exceeds the supported maximum {MAX_SE_WIDTH}")
    return sums


def check_gate_residual_args(x, weight, scale, shift, shortcut, gate, proj_weight, proj_scale,
                             proj_shift, proj_stride, *, device_check: DeviceCheck,
                             dtypes: Sequence[torch.dtype]) -> None:
    check_activation("x", x, device_check=device_check, dtypes=dtypes)
    c_out, k = check_conv_weight("weight", weight, x, 1)
    if k != 1:
        raise ValueError(f"weight must be a 1x1 conv weight, got {k}x{k}")
    check_channel_vector("scale", scale, c_out, x)
    check_channel_vector("shift", shift, c_out, x)
    n, c_b, ho, wo = x.shape
    check_activation("shortcut", shortcut, device_check=device_check, dtypes=dtypes)
    check_same("shortcut", shortcut, x, "x")
    if gate is not None:
        check_gate(gate, n, c_b, x)
    if proj_weight is None:
        if proj_scale is not None or proj_shift is not None:
            raise ValueError("proj_scale/proj_shift given without proj_weight")
        if tuple(shortcut.shape) != (n, c_out, ho, wo):
            raise ValueError(
                f"identity shortcut must have the output's shape {(n, c_out, ho, wo)}, "
                f"got {tuple(shortcut.shape)} (pass proj_weight for a projection shortcut)"
            )
        return
    if proj_scale is None or proj_shift is None:
        raise ValueError("a projection shortcut needs proj_scale and proj_shift")
    if proj_stride < 1:
        raise ValueError(f"proj_stride must be >= 1, got {proj_stride}")
    p_out, pk = check_conv_weight("proj_weight", proj_weight, shortcut, 1)
    if pk != 1 or p_out != c_out:
        raise ValueError(
            f"proj_weight must have shape ({c_out}, {shortcut.shape[1]}, 1, 1), "
            f"got {tuple(proj_weight.shape)}"
        )
    check_channel_vector("proj_scale", proj_scale, c_out, x)
    check_channel_vector("proj_shift", proj_shift, c_out, x)
    if shortcut.shape[0] != n:
        raise ValueError(f"shortcut has batch {shortcut.shape[0]}, x has {n}")
    h, w = shortcut.shape[2:]
    if ((h - 1) // proj_stride + 1, (w - 1) // proj_stride + 1) != (ho, wo):
        raise ValueError(
            f"a stride-{proj_stride} projection of a {h}x{w} shortcut is not {ho}x{wo} like x"
        )


def check_conv_bn_train_args(x, weight, bn, stride, groups, in_scale, in_shift, gate, frozen, *,
                             device_check: DeviceCheck, dtypes: Sequence[torch.dtype]
                             ) -> tuple[BatchNormArgs, int, int]:
    """bn: a BatchNorm2d or its BatchNormArgs. Returns (the BatchNormArgs, the output
    channels, the rows the batch statistics run over)."""
    args = bn if isinstance(bn, BatchNormArgs) else BatchNormArgs.of(bn)
    c_out = check_prologue_conv(x, weight, stride, groups, in_scale, in_shift, gate,
                                device_check=device_check, dtypes=dtypes)
    n, _, h, w = x.shape
    k = weight.shape[-1]
    count = n * conv_output_size(h, k, stride) * conv_output_size(w, k, stride)
    if not frozen:
        check_count(count)
    check_batch_norm(args, c_out, x)
    return args, c_out, count


def check_se_squeeze_args(y, scale, shift, *, device_check: DeviceCheck,
                          dtypes: Sequence[torch.dtype]) -> None:
    check_activation("y", y, device_check=device_check, dtypes=dtypes)
    check_channel_vector("scale", scale, y.shape[1], y)
    check_channel_vector("shift", shift, y.shape[1], y)


def check_bn_add_relu_args(y, scale, shift, shortcut, sc_scale, sc_shift, *,
                           device_check: DeviceCheck, dtypes: Sequence[torch.dtype]) -> None:
    check_activation("y", y, device_check=device_check, dtypes=dtypes)
    c = y.shape[1]
    check_channel_vector("scale", scale, c, y)
    check_channel_vector("shift", shift, c, y)
    if shortcut is not None:
        check_activation("shortcut", shortcut, device_check=device_check, dtypes=dtypes)
        check_same("shortcut", shortcut, y, "y")
        if shortcut.shape != y.shape:
            raise ValueError(f"shortcut {tuple(shortcut.shape)} and y {tuple(y.shape)} differ "
                             "in shape")
    elif sc_scale is not None:
        raise ValueError("sc_scale/sc_shift given without a shortcut")
    check_optional_affine(("sc_scale", "sc_shift"), sc_scale, sc_shift, c, y)
