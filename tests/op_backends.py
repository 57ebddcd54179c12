"""The op backends the per-op tests (tests/ops/test_<op>.py) run through the `backend`
fixture of tests/conftest.py, so that one test body checks every backend against the same
float64 reference:

    triton    the Triton kernels (regnet_kernels.ops.<op>): on CPU tensors under the Triton
              interpreter here, on CUDA tensors on a GPU machine (numerics.DEVICE)
    cpu       the C++ extension's CPU kernels (regnet_kernels.backends.cpp.ops, CPU tensors)
    cuda      the same functions on CUDA tensors: the C++ extension's CUDA kernels
              (marked `gpu`; skipped with a reason without a CUDA device)
    cuda_emu  the CUDA kernels' launchers compiled as host C++ by the CUDA emulation
              (tests/cuda_emu), on CPU tensors, through harness.EmulatedOps: the eval ops
              (conv_bn_act, se_excite, conv1x1_gate_residual) forward only, no argument
              checks; so only the parity tests of those ops take it (marked `cuda_emu`)

Beside those, each op file's `test_cuda_emu_*` tests call its launchers with their own
arguments (raw pointers, strides, launch plans) through the `emu` fixture, for what only a
launch shows (guard elements around every output, per-row-tile partials, every tensor-core
tile shape), and for the training launchers, which have no op-level form.

A test over every backend takes `backend`; a test whose cases differ per backend (a dtype
one backend lacks, cases only one backend ran) parametrizes it with `per_backend`, and one
that only some backends run with `backends(...)`, each saying why in a comment."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the C++ CUDA kernels need a CUDA device")]
MARKS = {"triton": [], "cpu": [], "cuda": CUDA_MARKS, "cuda_emu": [pytest.mark.cuda_emu]}
ALL = ("triton", "cpu", "cuda")  # the `backend` fixture's default; cuda_emu is asked for


@dataclass(frozen=True)
class OpBackend:
    """One backend's op functions (`ops.conv_bn_act`, ...), the device of its tensors and
    its registered torch.library ops (`library.conv_bn_act.default`, for opcheck)."""
    name: str
    device: str
    emulated: object = None  # cuda_emu: the harness.EmulatedOps

    @property
    def ops(self):
        if self.emulated is not None:
            return self.emulated
        if self.name == "triton":
            from regnet_kernels import ops
            return ops
        from regnet_kernels.backends.cpp import ops
        return ops

    @property
    def library(self):
        if self.name == "triton":
            return torch.ops.regnet_triton
        return self.ops._ops()

    @property
    def is_cpp(self) -> bool:
        return self.name in ("cpu", "cuda")


def get(name: str) -> OpBackend:
    """The backend `name`; the C++ ones must build here (a failure, not a skip)."""
    if name == "triton":
        from numerics import DEVICE
        return OpBackend("triton", DEVICE)
    from regnet_kernels.backends.cpp import build, ops as cpp
    ok, reason = build.available(cuda=True) if name == "cuda" else cpp.available()
    assert ok, reason
    return OpBackend(name, name)


def emulated(emu) -> OpBackend:
    """The cuda_emu backend over the emulated CUDA library `emu` (the `emu` fixture)."""
    from cuda_emu.harness import EmulatedOps
    return OpBackend("cuda_emu", "cpu", EmulatedOps(emu))


def _id(name, values):
    """backend-value-value...: dtypes as float32, other objects by their type (pytest
    numbers repeated ids)."""
    parts = [name]
    for v in values:
        if isinstance(v, torch.dtype):
            parts.append(str(v)[6:])
        elif v is None or isinstance(v, (bool, int, float, str)):
            parts.append(str(v))
        elif isinstance(v, type):
            parts.append(v.__name__)
        else:
            parts.append(type(v).__name__)
    return "-".join(parts)


def param(name: str, *values, marks=(), id=None):
    return pytest.param(name, *values, marks=[*MARKS[name], *marks],
                        id=_id(name, values) if id is None else id)


def backends(*names: str):
    """Parametrizes the `backend` fixture with some backends only (say why at the use)."""
    return pytest.mark.parametrize("backend", [param(n) for n in names], indirect=True)


def per_backend(argnames: str, **cases):
    """Parametrizes `backend` plus `argnames` with each backend's own cases
    (per_backend("dtype", triton=[...], cpu=[...])): a list of tuples, single values or
    pytest.param, whose ids and marks are kept, prefixed by the backend."""
    params = []
    for name, values in cases.items():
        for v in values:
            if isinstance(v, type(pytest.param(None))):
                marks, vid, v = v.marks, v.id, v.values
            else:
                marks, vid = (), None
                v = v if isinstance(v, tuple) and "," in argnames else (v,)
            params.append(param(name, *v, marks=marks,
                                id=None if vid is None else f"{name}-{vid}"))
    return pytest.mark.parametrize(f"backend,{argnames}", params, indirect=["backend"])
