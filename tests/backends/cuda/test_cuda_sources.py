"""Every CUDA source (csrc/**/*.cu) compiles with this machine's nvcc for sm_90 and
sm_80, without warnings, without register spills, the fp16/bf16 GEMM kernels use the
tensor cores (mma.sync in their PTX), the implicit GEMMs copy with cp.async and read
fragments with ldmatrix, and their registers leave room for two CTAs per SM.

This is the CPU machine's compile guard for the CUDA backend: the .cu files include only
CUDA headers and expose plain C launchers (csrc/cuda/launchers.h), so
they compile without torch's CUDA build headers; the torch bindings (csrc/cuda/*.cpp)
are type-checked against torch's headers. It skips when nvcc is missing, and when a GPU
is present, where the parity tests of the CUDA ops (run through the torch bindings)
take over. The cuda_emu tests of tests/ops/test_<op>.py run the kernels themselves on the
CPU (fp32, and fp16/bf16 through an emulated mma.sync).

What only a GPU can verify: the bindings' allocation / stream / guard paths, the
tensor cores' own rounding and summation order, the int64 offsets of tensors with
N*H*W*C > 2^31, the memory model beyond the emulation's barrier and cp.async semantics,
and speed (the kernels use a 3-stage cp.async pipeline, ldmatrix and mma.sync, no wgmma
/ TMA yet; `bench --static` predicts their time).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from regnet_kernels.bench.sass import parse_ptxas_log

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("sm_90", "sm_80")
# Kernels whose 16-bit variants must run on tensor cores.
GEMM_SOURCES = {"conv_bn_act.cu", "conv1x1_gate_residual.cu", "conv_bn_train.cu"}


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


NVCC = _nvcc()
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA compiler) is not installed"),
    pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the CUDA ops' parity tests run "
                                              "instead of this compile-only check"),
]


def _compile(src: Path, arch: str, out_dir: Path) -> dict:
    """nvcc -c for one arch, keeping the PTX; returns the log, PTX and per-kernel stats."""
    keep = out_dir / f"{src.stem}_{arch}"
    keep.mkdir(parents=True, exist_ok=True)
    cmd = [NVCC, "-std=c++17", "-O3", "-c", "-o", str(keep / f"{src.stem}.o"),
           f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Xptxas", "-v",
           "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
           "-keep", "-keep-dir", str(keep), "-I", str(src.parent), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=keep)
    log = proc.stdout + proc.stderr
    kernels = parse_ptxas_log(log)
    ptx = "\n".join(p.read_text() for p in sorted(keep.glob("*.ptx")))
    return {"cmd": cmd, "returncode": proc.returncode, "log": log, "kernels": kernels, "ptx": ptx}


class _Builds:
    """(source name, arch) -> _compile's result; an arch's sources are compiled together
    (the slowest first, on all cores) the first time one of them is asked for, so the
    slow-marked sm_80 builds cost nothing in the default run."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.done = out_dir, {}

    def __getitem__(self, key: tuple[str, str]) -> dict:
        if key not in self.done:
            arch = key[1]
            jobs = sorted(SOURCES, key=lambda s: -s.stat().st_size)
            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                results = pool.map(lambda src: _compile(src, arch, self.out_dir), jobs)
                for src, result in zip(jobs, results):
                    self.done[(src.name, arch)] = result
        return self.done[key]


@pytest.fixture(scope="module")
def builds():
    with tempfile.TemporaryDirectory(prefix="rk_cuda_") as tmp:
        yield _Builds(Path(tmp))


def _arch_params(names):
    """(name, arch) for every name and arch; sm_80 marked slow (the same sources, the
    second target: nvcc time CI does not need on every run)."""
    return [pytest.param(n, a, id=f"{n}-{a}", marks=[pytest.mark.slow] if a == "sm_80" else [])
            for n in names for a in ARCHS]


def test_sources_exist():
    names = {s.name for s in SOURCES}
    assert {"conv_bn_act.cu", "se_excite.cu", "conv1x1_gate_residual.cu", "conv_bn_train.cu",
            "bn_stats.cu", "se_squeeze.cu", "bn_add_relu.cu"} <= names, names


def test_every_cuda_op_has_its_kernels_and_binding():
    """csrc/cuda mirrors the ops: each op registered for CUDA (TORCH_LIBRARY_IMPL in
    cuda/<op>_binding.cpp) has its kernels in cuda/<op>.cu, and each binding registers
    only its own op (and that op's backward / variants)."""
    cuda = CSRC / "cuda"
    bindings = sorted(cuda.glob("*_binding.cpp"))
    assert bindings and not (set(cuda.glob("*.cpp")) - set(bindings)), "a .cpp that is not a binding"
    for b in bindings:
        op = b.name[: -len("_binding.cpp")]
        assert (cuda / f"{op}.cu").is_file(), f"{b.name} without {op}.cu"
        impls = re.findall(r'm\.impl\("(\w+)"', b.read_text())
        assert impls and all(name.startswith(op) or name == "bn_update_running" for name in impls), (
            b.name, impls)


@pytest.mark.parametrize("name,arch", _arch_params([s.name for s in SOURCES]))
def test_compiles_without_warnings(builds, name, arch):
    b = builds[(name, arch)]
    assert b["returncode"] == 0, f"{' '.join(b['cmd'])}\n{b['log']}"
    assert "warning" not in b["log"].lower(), b["log"]
    assert b["kernels"], f"no kernels reported by ptxas for {name}:\n{b['log']}"


@pytest.mark.parametrize("name,arch", _arch_params([s.name for s in SOURCES]))
def test_no_register_spills(builds, name, arch):
    b = builds[(name, arch)]
    assert b["returncode"] == 0, b["log"]
    bad = {k: v for k, v in b["kernels"].items()
           if v["arch"] != arch or v["spill_stores"] != 0 or v["spill_loads"] != 0}
    assert not bad, f"kernels spilling registers (or unparsed) in {name} for {arch}: {bad}"


def _ptx_entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(", ptx)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.parametrize("name,arch", _arch_params(sorted(GEMM_SOURCES)))
def test_half_precision_gemms_use_tensor_cores(builds, name, arch):
    b = builds[(name, arch)]
    assert b["returncode"] == 0, b["log"]
    entries = _ptx_entries(b["ptx"])
    assert set(entries) == set(b["kernels"]), "PTX entries and ptxas report disagree"
    gemms = {k: body for k, body in entries.items() if "reduce" not in k}  # not the wgrad sum
    half = {k: body for k, body in gemms.items() if "6__half" in k or "13__nv_bfloat16" in k}
    fp32 = {k: body for k, body in gemms.items() if k not in half}
    assert half and fp32, sorted(entries)
    missing = [k for k, body in half.items() if "mma.sync.aligned.m16n8k16" not in body]
    assert not missing, f"fp16/bf16 kernels without mma.sync m16n8k16: {missing}"
    # The fp32 variants are the FMA path: no tensor-core instruction in them.
    assert not [k for k, body in fp32.items() if "mma.sync" in body]


# conv_bn_act_kernel<T, TL, false>: the element-wise main loop alone (VEC = false, the
# last template argument).
ELEMENT_ONLY = re.compile(r"conv_bn_act_kernel.*Lb0EEEv")


# The implicit-GEMM kernels (igemm.cuh) that run the cp.async pipeline: everything in the
# GEMM sources but the wgrad (its own transposed gather), the wgrad's reduction and the
# element-only instantiations.
def _pipelined(kernel: str) -> bool:
    return "wgrad" not in kernel and not ELEMENT_ONLY.search(kernel)


@pytest.mark.parametrize("name,arch", _arch_params(sorted(GEMM_SOURCES)))
def test_gemms_use_the_cp_async_pipeline_and_ldmatrix(builds, name, arch):
    """Every implicit-GEMM kernel copies its tiles with 16-byte cp.async (zero-filling
    ignore-src form) and waits on commit groups; the 16-bit ones read their MMA fragments
    with ldmatrix."""
    b = builds[(name, arch)]
    assert b["returncode"] == 0, b["log"]
    all_entries = _ptx_entries(b["ptx"])
    entries = {k: body for k, body in all_entries.items() if _pipelined(k)}
    assert entries
    element_only = [k for k in all_entries if ELEMENT_ONLY.search(k)]
    assert bool(element_only) == (name == "conv_bn_act.cu"), element_only
    for k in element_only:  # the point of the split: no pipeline code in them
        assert "cp.async" not in all_entries[k], k
    for k, body in entries.items():
        assert re.search(r"cp\.async\.cg\.shared\.global(\.\w+)* \[[^]]+\], \[[^]]+\], 16, ",
                         body), f"{k}: no 16-byte cp.async with a source size"
        assert "cp.async.wait_group" in body and "cp.async.commit_group" in body, k
        if "6__half" in k or "13__nv_bfloat16" in k:
            assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, f"{k}: no ldmatrix"


TILE = re.compile(r"TileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")


@pytest.mark.parametrize("name,arch", _arch_params(sorted(GEMM_SOURCES)))
def test_gemm_registers_leave_room_for_two_ctas_per_sm(builds, name, arch):
    """__launch_bounds__(threads, 2): the registers of every tiled kernel let two CTAs
    share an SM (65536 registers, allocated per warp in units of 256)."""
    b = builds[(name, arch)]
    tiled = {k: v for k, v in b["kernels"].items() if TILE.search(k)}
    assert tiled
    for k, v in tiled.items():
        bm, bn, wm, wn = map(int, TILE.search(k).groups())
        warps = wm * wn
        per_warp = -(-v["registers"] * 32 // 256) * 256
        assert 65536 // per_warp // warps >= 2, (
            f"{k}: {v['registers']} registers x {32 * warps} threads leave room for one CTA")


def _cuda_include() -> Path:
    """The CUDA runtime headers' directory (beside nvcc), or skip."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    candidates += [Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")]
    include = next((d for d in candidates if (d / "cuda_runtime.h").is_file()), None)
    if include is None:
        pytest.skip("cuda_runtime.h not found next to nvcc")
    return include


def _host_compiler(*names: str) -> str:
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if found is None:
        pytest.skip(f"no host compiler ({', '.join(names)})")
    return found


# Leaf main loops (SASS instructions per K step, per warp) allowed for the 16-bit
# pipelined instantiations of the kernels that run k x k convs (the 3x3 ones of issue
# 14); the element-wise fallbacks (conv_bn_act / wgrad with VEC false) are not bounded.
MAX_LOOP = 600


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv_bn_act.cu", "conv_bn_train.cu"])
def test_sm90_main_loops_stay_short(name):
    """nvcc -cubin for sm_90a, then the SASS (nvdisasm): every 16-bit conv GEMM kernel's
    MMA loop is under MAX_LOOP instructions per K step, and spill-free. Slow: a full
    sm_90 compile of the source per case (what `bench --static` reports)."""
    from regnet_kernels.bench import static
    try:
        static.sass.find_tool("nvdisasm")
    except FileNotFoundError:
        pytest.skip("nvdisasm not found (Triton's bundled one or the CUDA toolkit's)")
    r = static.compile_cuda_source(str(CSRC / "cuda" / name), 90)
    assert r["ok"], r.get("error")
    checked = 0
    for mangled, k in r["kernels"].items():
        if "reduce" in mangled or not ("6__half" in mangled or "13__nv_bfloat16" in mangled):
            continue
        if ELEMENT_ONLY.search(mangled) or re.search(r"conv_wgrad_kernel.*Lb0EEEv", mangled):
            continue
        assert k["loop"] and k["loop"]["mma"], f"{mangled}: no MMA loop found"
        assert k["loop"]["instructions"] < MAX_LOOP, (mangled, k["loop"]["instructions"])
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, mangled
        checked += 1
    assert checked, r["kernels"].keys()


@pytest.mark.parametrize("header", ["launchers.h"])
def test_launchers_header_is_plain_c(header):
    """The launcher headers are C headers over the CUDA runtime types only."""
    cc = _host_compiler("cc", "gcc")
    proc = subprocess.run([cc, "-x", "c", "-std=c99", "-fsyntax-only", "-Wall", "-Werror",
                           f"-I{_cuda_include()}", str(CSRC / "cuda" / header)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """csrc/cuda/*_binding.cpp (the CUDA TORCH_LIBRARY_IMPLs) type-check against this
    torch's headers, warning-free: all of them in one translation unit (torch's headers
    parsed once: ~15 s instead of ~15 s per binding; their helpers have distinct names
    and each file starts with #include "binding.h", checked here). A CPU build of torch
    lacks one generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h (a single #define
    for shared-library builds): a stand-in is written for it. Linking needs a CUDA torch
    and runs on GPU machines."""
    from torch.utils import cpp_extension

    cxx = _host_compiler("c++", "g++")
    torch_includes = cpp_extension.include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in torch_includes):
        standin = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        standin.parent.mkdir(parents=True)
        standin.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        torch_includes = [str(tmp_path)] + torch_includes
    system = [arg for p in torch_includes + [str(_cuda_include())] for arg in ("-isystem", p)]
    bindings = sorted((CSRC / "cuda").glob("*_binding.cpp"))
    for b in bindings:
        first = next(l for l in b.read_text().splitlines() if l.startswith("#include"))
        assert first == '#include "binding.h"', (b.name, first)
    unity = tmp_path / "bindings.cpp"
    unity.write_text("".join(f'#include "{b}"\n' for b in bindings))
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           *system, f"-I{CSRC / 'cuda'}", f"-I{CSRC}", str(unity)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_cuda_toolkit_found_when_torch_guesses_wrong(monkeypatch, tmp_path):
    """torch takes the folder above nvcc as CUDA_HOME when the variable is unset; where
    nvcc is a wrapper (/usr/local/bin/nvcc), the extension asks nvcc for its toolkit."""
    from torch.utils import cpp_extension

    from regnet_kernels.backends.cpp import build as _extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # no headers there
    includes, ldflags = _extension._cuda_toolkit_flags()
    assert len(includes) == 1 and (Path(includes[0]) / "cuda_runtime.h").is_file()
    assert ldflags == [f"-L{Path(includes[0]).parent / 'lib64'}"]


def test_cuda_toolkit_missing_is_a_clear_error(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from regnet_kernels.backends.cpp import build as _extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc either
    with pytest.raises(_extension.ExtensionBuildError, match="set CUDA_HOME"):
        _extension._cuda_toolkit_flags()
