"""The fused-op backends in one table, and the choice among them.

    triton  the Triton kernels (regnet_kernels.backends.triton): CUDA tensors, or CPU
            tensors under TRITON_INTERPRET=1 (slow; for tests)
    cpu     the C++ extension's CPU kernels (regnet_kernels.backends.cpp, built with ninja
            on first use)
    cuda    the C++ extension's CUDA kernels (the same functions: the extension's dispatcher
            picks the kernels by the tensors' device)

Each `Backend` declares the devices, dtypes and modes it runs. `resolve` picks the backend of a
fused module or a benchmark for a device (backend="auto": the first backend in `BACKENDS` that
"auto" picks for that device and that can run here) and, when none can, says for every backend
why it was rejected. `ops_for` imports a backend's op functions, so Triton is imported only
when its backend runs. `available_backends()` and `python -m regnet_kernels env`
(`environment_report`) read the same table. Imports only torch.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, NamedTuple, Optional

import torch


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here, or no backend can; the message says why."""


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                   # the module of its op functions
    devices: Callable[[], tuple[str, ...]]  # the device types it runs in this process
    runs: str                     # the devices in words, for messages
    auto_devices: tuple[str, ...]  # the device types backend="auto" picks it for
    dtypes: tuple[torch.dtype, ...]  # activation dtypes
    modes: tuple[str, ...]        # "eval" (BN folded), "train" (batch statistics, autograd)
    status_function: str          # its module's (usable, reason) check, which may build
    prepare: Optional[str] = None  # its module's function that builds / loads compiled code
    requires: Optional[str] = None  # a package beyond torch it imports, and how to install it
    install: str = ""

    def why_not(self, device: torch.device | str, auto: bool = False) -> Optional[str]:
        """Why this backend cannot run tensors on `device` here (or is not the one
        backend="auto" picks for it), or None. Builds nothing. Asked for by name, a missing
        package is the first reason; "auto" looks at the device first, so that it imports
        nothing for a device it would not pick the backend for."""
        device_type = torch.device(device).type
        missing = self.missing_requirement() if not auto else None
        if missing:
            return f"cannot run: {missing}"
        if device_type not in self.devices():
            return f"runs {self.runs}, got a tensor on {device}"
        if auto and device_type not in self.auto_devices:
            return (f"runs {device_type} tensors only when asked for (backend={self.name!r}): "
                    f"backend='auto' picks it for {' and '.join(self.auto_devices)} tensors")
        missing = self.missing_requirement()
        return f"cannot run: {missing}" if missing else None

    def missing_requirement(self) -> Optional[str]:
        """Why the package this backend needs cannot be imported, or None (tried once: every
        forward of a fused module asks)."""
        if self.requires is None:
            return None
        if self.requires not in _import_errors:
            try:
                importlib.import_module(self.requires)
                _import_errors[self.requires] = None
            except ImportError as e:
                _import_errors[self.requires] = str(e)
        error = _import_errors[self.requires]
        if error is None:
            return None
        others = " and ".join(repr(name) for name in BACKENDS if name != self.name)
        return (f"{self.requires} is not importable ({error}); the {self.name!r} backend needs "
                f"it ({self.install}); {others} do not")

    def load(self) -> ModuleType:
        """The module of this backend's op functions (imported now if it was not), its
        compiled code built and loaded (`prepare`): ops_for calls this outside torch.compile's
        tracing, where a build cannot run."""
        missing = self.missing_requirement()
        if missing:
            raise BackendUnavailable(f"backend={self.name!r} cannot run: {missing}")
        module = importlib.import_module(self.module)
        if self.prepare:
            getattr(module, self.prepare)()
        return module

    def status(self) -> tuple[bool, str]:
        """(usable, reason): whether it runs in this process, and why not or how. The C++
        backends' check builds the extension (and its CUDA kernels) on first use."""
        missing = self.missing_requirement()
        if missing:
            return False, missing
        return getattr(importlib.import_module(self.module), self.status_function)()


_import_errors: dict[str, Optional[str]] = {}  # package -> why it cannot be imported (None: it can)


def _triton_devices() -> tuple[str, ...]:
    # meta: the fake implementations (torch.compile, the static report) run anywhere
    return ("cuda", "meta", "cpu") if interpreting() else ("cuda", "meta")


HALF_AND_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("eval", "train")

BACKENDS = {
    "triton": Backend(
        "triton", "regnet_kernels.backends.triton", _triton_devices,
        "CUDA tensors (CPU tensors under TRITON_INTERPRET=1, set before importing regnet_kernels)",
        auto_devices=("cuda", "meta"),
        # float64: computed in float64 throughout, for torch.autograd.gradcheck
        dtypes=HALF_AND_FLOAT32 + (torch.float64,), modes=MODES, status_function="status",
        requires="triton", install="Linux: pip install 'triton>=3.6'"),
    "cpu": Backend(
        "cpu", "regnet_kernels.backends.cpp.ops", lambda: ("cpu",), "CPU tensors",
        auto_devices=("cpu",), dtypes=HALF_AND_FLOAT32, modes=MODES,
        status_function="cpu_status", prepare="load_library"),
    "cuda": Backend(
        "cuda", "regnet_kernels.backends.cpp.ops", lambda: ("cuda",), "CUDA tensors",
        auto_devices=("cuda",), dtypes=HALF_AND_FLOAT32, modes=MODES,
        status_function="cuda_status", prepare="load_library"),
}


def check_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))


def _constant_under_torch_compile(fn):
    """torch.compile traces the fused modules' forwards, which call `resolve` and `ops_for`:
    their choices become constants of the graph (a backend's import is not something to trace).
    This is what `torch.compiler.assume_constant_result` marks, without importing
    torch._dynamo at `import regnet_kernels` (two seconds) as calling it would."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_torch_compile
def resolve(backend: str, device: torch.device | str, owner: str = "model") -> str:
    """The backend that runs `owner`'s ops for tensors on `device`: `backend` itself when it
    can, the first that can for "auto". Raises BackendUnavailable saying why (for "auto",
    why each backend was rejected). Builds nothing: a C++ backend whose build fails says
    so on its first op."""
    check_name(backend)
    if backend != "auto":
        reason = BACKENDS[backend].why_not(device)
        if reason:
            raise BackendUnavailable(f"{owner}: backend={backend!r} {reason}")
        return backend
    rejected = {}
    for name, candidate in BACKENDS.items():
        reason = candidate.why_not(device, auto=True)
        if reason is None:
            return name
        rejected[name] = reason
    raise BackendUnavailable(f"{owner}: no backend runs tensors on {device} here:\n"
                             + "\n".join(f"  {name}: {why}" for name, why in rejected.items()))


def ops_for(backend: str) -> ModuleType:
    """The module of a backend's op functions (conv_bn_act, se_excite, conv1x1_gate_residual,
    conv_bn_train, se_squeeze, bn_add_relu): `regnet_kernels.backends.triton`, or
    `regnet_kernels.backends.cpp.ops` for "cpu" and "cuda"."""
    check_name(backend)
    _load_once(backend)
    return _loaded[backend]


_loaded: dict[str, ModuleType] = {}  # backend name -> the module of its op functions


@_constant_under_torch_compile
def _load_once(backend: str) -> bool:
    """Imports the backend's op functions into `_loaded` (torch.compile runs this while it
    traces, as a constant: the lookup in `_loaded` that follows is what the graph guards on)."""
    if backend not in _loaded:
        _loaded[backend] = BACKENDS[backend].load()
    return True


class BackendStatus(NamedTuple):
    usable: bool
    reason: str  # why not, or a note on how it runs here


def available_backends() -> dict[str, BackendStatus]:
    """{backend: BackendStatus(usable, reason)} for "triton", "cpu" and "cuda".

    The "cpu" and "cuda" checks build the C++ extension (and its CUDA kernels) if
    they were not built yet (about a minute, once per cache directory)."""
    return {name: BackendStatus(*backend.status()) for name, backend in BACKENDS.items()}


def triton_version() -> Optional[str]:
    """The installed Triton's version (read without importing it), or None."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _tool_version(cmd: str, *args: str, keyword: str = "") -> str:
    """The first line of `cmd args` output containing keyword, with the tool's path."""
    path = shutil.which(cmd)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path} ({e})"
    lines = [line.strip() for line in out.splitlines() if keyword in line and line.strip()]
    return f"{lines[0] if lines else '?'} ({path})"


def environment_report() -> str:
    """Versions, devices and backends: what a bug report or benchmark needs."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [
        f"python      {platform.python_version()} ({platform.platform()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}, "
        f"{torch.get_num_threads()} CPU threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"triton      {triton_version() or 'not installed'}"
        + (" (TRITON_INTERPRET=1)" if interpreting() else ""),
        f"nvcc        {_tool_version('nvcc', '--version', keyword='release')}",
        f"ninja       {_tool_version('ninja', '--version')}",
        f"c++         {_tool_version('c++', '--version')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda        no device")
    lines.append("")
    lines.append("backends")
    for name, status in available_backends().items():
        first_line = status.reason.splitlines()[0] if status.reason else ""
        lines.append(f"  {name:<7} {'yes' if status.usable else 'no ':<4} {first_line}")
    return "\n".join(lines)
