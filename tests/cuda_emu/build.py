"""Builds csrc/cuda/*.cu as host C++ (g++, -DRK_CUDA_EMULATION, cuda_emulation.h) into
one shared library and loads it with ctypes. See cuda_emulation.h for the model.

    lib = build.load(cache_dir)      # an EmuLibrary
    lib.fn("rk_conv_bn_act")         # the ctypes function (argtypes / restype set),
                                     # or a clear failure when the symbol is missing

Every .cu file is compiled to its own object (in parallel), so that one file that does
not compile (e.g. a training source being written) leaves the others usable; its
compiler output is kept in EmuLibrary.errors and shown by the tests that need it.
Objects and the library are cached under cache_dir, keyed by a hash of the sources,
the headers and the flags.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# RK_EMU_CUDA_SRC: build another copy of csrc/cuda (e.g. a mutated one, to check that
# the tests catch a planted bug).
CUDA_SRC = Path(os.environ.get("RK_EMU_CUDA_SRC") or ROOT / "csrc" / "cuda").resolve()

CXXFLAGS = [
    "-std=c++20", "-O1", "-g0", "-fPIC", "-pthread", "-DRK_CUDA_EMULATION",
    "-Wno-unknown-pragmas", "-Wno-attributes", "-Wno-deprecated-declarations",
]


def gxx() -> str | None:
    return os.environ.get("RK_EMU_CXX") or shutil.which("g++")


def cuda_include() -> Path | None:
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parents[1] / "include")
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / "cuda_runtime.h").is_file() and (c / "cuda_fp16.h").is_file():
            return c
    return None


def sources() -> list[Path]:
    return sorted(CUDA_SRC.glob("*.cu"))


def _headers() -> list[Path]:
    return sorted([*CUDA_SRC.glob("*.h"), *CUDA_SRC.glob("*.cuh"), *HERE.glob("*.h")])


def _digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _flags(inc: Path) -> list[str]:
    backend = ["-DRK_EMU_OS_THREADS"] if os.environ.get("RK_EMU_OS_THREADS") else []
    return [*CXXFLAGS, *backend, "-I", str(HERE), "-I", str(CUDA_SRC), "-I", str(inc),
            "-include", "cuda_emulation.h"]


@dataclass
class EmuLibrary:
    path: Path | None
    lib: ctypes.CDLL | None
    errors: dict[str, str] = field(default_factory=dict)  # file name -> compiler output
    compiled: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return self.lib is not None and hasattr(self.lib, name)

    def missing_reason(self, name: str) -> str:
        msg = f"{name} not found in the emulated library (built from: {', '.join(self.compiled) or 'nothing'})"
        for f, err in self.errors.items():
            msg += f"\n--- {f} did not compile under emulation:\n{err}"
        return msg

    def fn(self, name: str, argtypes=None, restype=ctypes.c_int):
        if not self.has(name):
            raise LookupError(self.missing_reason(name))
        f = getattr(self.lib, name)
        if argtypes is not None:
            f.argtypes = argtypes
        f.restype = restype
        return f


def _compile(cxx: str, flags: list[str], src: Path, obj: Path) -> str | None:
    if obj.exists():
        return None
    tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
    r = subprocess.run([cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        return (r.stdout + r.stderr)[-20000:] or f"g++ exited with {r.returncode}"
    os.replace(tmp, obj)
    return None


def build(cache_dir: Path, jobs: int | None = None) -> EmuLibrary:
    """Compiles every csrc/cuda/*.cu (cached) and links those that compiled."""
    cxx, inc = gxx(), cuda_include()
    if cxx is None or inc is None:
        raise RuntimeError("g++ or the CUDA headers (cuda_runtime.h) are missing")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    flags = _flags(inc)
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    common = _digest(_headers(), " ".join(flags) + ver)
    srcs = sources()
    objs = {s: cache_dir / f"{s.stem}-{_digest([s], common)}.o" for s in srcs}
    with ThreadPoolExecutor(jobs or max(1, min(len(srcs), os.cpu_count() or 1))) as ex:
        results = dict(zip(srcs, ex.map(lambda s: _compile(cxx, flags, s, objs[s]), srcs)))
    errors = {s.name: e for s, e in results.items() if e is not None}
    good = [s for s in srcs if results[s] is None]
    if not good:
        return EmuLibrary(None, None, errors, [])
    key = hashlib.sha256("".join(objs[s].name for s in good).encode()).hexdigest()[:16]
    so = cache_dir / f"librk_emu-{key}.so"
    if not so.exists():
        tmp = so.with_suffix(f".tmp{os.getpid()}.so")
        r = subprocess.run([cxx, "-shared", "-pthread", "-o", str(tmp),
                            *[str(objs[s]) for s in good]], capture_output=True, text=True)
        if r.returncode != 0:
            errors["<link>"] = r.stdout + r.stderr
            return EmuLibrary(None, None, errors, [s.name for s in good])
        os.replace(tmp, so)
    _prune(cache_dir, keep={so.name, *(o.name for o in objs.values())})
    return EmuLibrary(so, ctypes.CDLL(str(so)), errors, [s.name for s in good])


def _prune(cache_dir: Path, keep: set[str], max_age_s: float = 3600.0) -> None:
    """Removes outputs of older source versions (unused for an hour) from the cache."""
    import time
    now = time.time()
    for p in cache_dir.iterdir():
        if p.name in keep or p.suffix not in (".o", ".so"):
            continue
        try:
            if now - p.stat().st_mtime > max_age_s:
                p.unlink()
        except OSError:
            pass


def load(cache_dir: Path) -> EmuLibrary:
    return build(cache_dir)


if __name__ == "__main__":  # python tests/cuda_emu/build.py [cache_dir]
    import sys
    lib = build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rk_emu_cache"))
    print("library:", lib.path)
    print("compiled:", ", ".join(lib.compiled))
    for f, e in lib.errors.items():
        print(f"--- {f}:\n{e}")
