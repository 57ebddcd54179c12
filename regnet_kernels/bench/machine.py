"""What a result was measured on: device, clocks, library versions, threads, time.

Every CSV row carries these, since cuDNN's grouped-conv speed alone has moved 3x between
versions (docs/performance.md, "Why fuse").
"""
from __future__ import annotations

import datetime
import platform
import subprocess

import torch

from ..ops.dispatch import triton_version


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_clock() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [line.split(":", 1)[1].strip() for line in f if line.startswith("cpu MHz")]
        return f"{float(mhz[0]):.0f} MHz" if mhz else ""
    except (OSError, ValueError):
        return ""


def _gpu_clocks() -> str:
    """SM / memory clocks now and at most, from nvidia-smi when it is there."""
    query = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader",
                              f"--id={torch.cuda.current_device()}"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    sm, sm_max, mem, mem_max = (v.strip() for v in out.strip().split(","))
    return f"sm {sm} (max {sm_max}), mem {mem} (max {mem_max})"


def machine_info(device: str) -> dict[str, str]:
    """Device name, clocks, versions, thread count and a UTC timestamp."""
    cuda = device == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_model(),
        "clocks": _gpu_clocks() if cuda else _cpu_clock(),
        "torch": torch.__version__,
        "triton": triton_version() or "",
        "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn or ""),
        "threads": str(torch.get_num_threads()),
    }
