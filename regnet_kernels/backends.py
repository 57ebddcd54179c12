"""Which fused-op backends can run here, and why the others cannot.

    triton  the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow)
    cpu     the C++ extension's CPU kernels (built with ninja on first use)
    cuda    the C++ extension's CUDA kernels

`available_backends()` answers for this process; `environment_report()` is what
`python -m regnet_kernels env` prints.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from typing import NamedTuple

import torch

from .ops import _triton
from .ops._implicit_gemm import interpreting


class BackendStatus(NamedTuple):
    usable: bool
    reason: str  # why not, or a note on how it runs here


def _triton_status() -> BackendStatus:
    if _triton.IMPORT_ERROR is not None:
        return BackendStatus(False, _triton.unavailable_reason())
    triton = _triton.triton
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if interpreting():
        return BackendStatus(True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): "
                                   "CPU tensors, slow; for tests")
    return BackendStatus(False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU "
                                "through Triton's interpreter, slowly)")


def _cpu_status() -> BackendStatus:
    from .ops import cpp
    usable, reason = cpp.available()  # builds the extension on first use
    return BackendStatus(usable, reason or "C++ extension built and loaded")


def _cuda_status() -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device")
    from .ops import _extension
    usable, reason = _extension.available(cuda=True)  # builds the CUDA kernels on first use
    return BackendStatus(usable, reason or "CUDA kernels built and loaded")


def available_backends() -> dict[str, BackendStatus]:
    """{backend: BackendStatus(usable, reason)} for "triton", "cpu" and "cuda".

    The "cpu" and "cuda" checks build the C++ extension (and its CUDA kernels) if
    they were not built yet (about a minute, once per cache directory)."""
    return {"triton": _triton_status(), "cpu": _cpu_status(), "cuda": _cuda_status()}


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
    triton_version = "not installed" if _triton.IMPORT_ERROR else _triton.triton.__version__
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [
        f"python      {platform.python_version()} ({platform.platform()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}, "
        f"{torch.get_num_threads()} CPU threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"triton      {triton_version}" + (" (TRITON_INTERPRET=1)" if interpreting() else ""),
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
