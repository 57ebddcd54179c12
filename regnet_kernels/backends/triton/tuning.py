"""Launch options tuned on a GPU: a table per GPU model, the heuristic otherwise.

The conv kernels' tiles follow the shapes (`conv_tiles`, `dgrad_geometry`, ...); their
num_warps / num_stages come from `launch_config`, a heuristic set from static sm_90 reads.
A GPU can do better, so each conv launcher asks `launch_options`:

- a table for the device's model (``configs/<gpu>.json`` in the package, then
  ``$REGNET_KERNELS_CONFIG_DIR/<gpu>.json``, which wins), keyed by `shape_class`
  (kernel, its constexprs, rows rounded up to a power of two), answers first;
- with ``REGNET_KERNELS_TUNE=1`` on a CUDA device, a shape class the table lacks is tuned
  at its first launch: every option set in `CANDIDATES` is timed (the launch is a pure
  function of its inputs, so running it more often changes nothing) and the fastest is
  kept and written to the table (``$REGNET_KERNELS_CONFIG_DIR``, else the package's
  ``configs/``). Not while a CUDA graph is being captured;
- otherwise the heuristic.

Only options that change no output's shape are tuned (num_warps, num_stages), so the fake
implementations and torch.compile see the same shapes whatever the table says.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch

CANDIDATES = tuple({"num_warps": w, "num_stages": s} for w in (4, 8) for s in (2, 3, 4))
TUNE_ENV = "REGNET_KERNELS_TUNE"
CONFIG_DIR_ENV = "REGNET_KERNELS_CONFIG_DIR"
PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # regnet_kernels/configs

_tables: dict[str, dict] = {}


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV, "0") not in ("", "0")


def gpu_slug(name: str) -> str:
    """A file name for a GPU model: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shape_class(kernel: str, constexprs: dict, rows: int) -> str:
    """The table key of a launch: the kernel, its constexprs (tiles, channels per group,
    flags, dtypes) and its row count rounded up to a power of two."""
    bucket = 1 << max(int(rows) - 1, 0).bit_length()
    consts = ",".join(f"{k}={constexprs[k]}" for k in sorted(constexprs))
    return f"{kernel}|{consts}|rows<={bucket}"


def _table_paths(slug: str) -> list[Path]:
    paths = [PACKAGE_CONFIGS / f"{slug}.json"]
    if os.environ.get(CONFIG_DIR_ENV):
        paths.append(Path(os.environ[CONFIG_DIR_ENV]) / f"{slug}.json")
    return paths


def table(slug: str) -> dict:
    """The tuned options of a GPU model (later files win), loaded once."""
    if slug not in _tables:
        merged = {}
        for path in _table_paths(slug):
            if path.is_file():
                try:
                    merged.update(json.loads(path.read_text())["configs"])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    print(f"regnet_kernels: ignoring the tuning table {path}: {e}",
                          file=sys.stderr)
        _tables[slug] = merged
    return _tables[slug]


def save_table(slug: str, gpu_name: str) -> Path:
    """Write the GPU model's table where `_table_paths` reads last."""
    path = _table_paths(slug)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"gpu": gpu_name, "configs": table(slug)}, indent=1,
                              sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def fastest(run: Callable[..., None], candidates, timer: Callable[[Callable[[], None]], float]):
    """The candidate option set whose launch `timer` measures fastest (ties: the first)."""
    times = [timer(lambda opts=opts: run(**opts)) for opts in candidates]
    return dict(candidates[min(range(len(times)), key=times.__getitem__)])


def _cuda_timer(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25)


def launch_options(kernel: str, constexprs: dict, rows: int, default: dict,
                   run: Callable[..., None], device: torch.device) -> dict:
    """The num_warps / num_stages for one launch (see the module docstring). `run(**opts)`
    launches the kernel with those options; `default` is the heuristic's choice."""
    if device.type != "cuda":
        return default
    name = torch.cuda.get_device_name(device)
    slug = gpu_slug(name)
    key = shape_class(kernel, constexprs, rows)
    options = table(slug).get(key)
    if options is not None:
        return dict(default, **options)
    if tuning_enabled() and not torch.cuda.is_current_stream_capturing():
        candidates = [dict(default, **c) for c in CANDIDATES]
        best = fastest(run, candidates, _cuda_timer)
        table(slug)[key] = {k: best[k] for k in ("num_warps", "num_stages")}
        path = save_table(slug, name)
        print(f"regnet_kernels: tuned {key}: {table(slug)[key]} -> {path}", file=sys.stderr)
        return best
    return default


def launch_tuned(kernel, grid, args: tuple, constexprs: dict, rows: int, default: dict,
                 device: torch.device) -> None:
    """kernel[grid](*args, **constexprs, **options) with `launch_options`' options."""
    def run(**options):
        kernel[grid](*args, **constexprs, **options)

    run(**launch_options(kernel.fn.__name__, constexprs, rows, default, run, device))
