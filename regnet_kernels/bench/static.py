"""The static kernel report: what each kernel launch of a model compiles to on sm_90, and how
long it should take, without a GPU.

``python -m regnet_kernels bench --static MODEL [--batch N] [--dtype bf16] [--mode eval,train]
[--arch sm_90] [--markdown F] [--csv F] [--jobs 2] [--no-cuda-sources]``

1. Capture (`capture`): the fused model's eval forward and one training step run on meta
   tensors; every Triton launch is recorded with its real specialization and grid, its op,
   layer, bytes and FLOPs. Identical specializations compile once.
2. Compile (worker subprocesses, no TRITON_INTERPRET, at most ``--jobs``): ``triton.compile``
   for the target, then ptxas's report (registers, spills) and the SASS (`sass`): load kinds,
   MMA kind, the main loop's length, MMAs and local-memory accesses. Results are cached by
   specialization and kernel source under ``~/.cache/regnet_kernels/static``.
3. The CUDA kernels (csrc/cuda/*.cu): nvcc -cubin for the arch, the same per-kernel table;
   with the eval mode, the eval forward's op calls mapped to the CUDA launchers' kernels,
   tiles and grids (`cuda_launches`) and predicted like the Triton launches (mode
   ``eval-cuda``).
4. A time per launch from the model below; sums per kernel family, per mode, img/s.

The model (predicted, not measured; calibrate it with the first GPU run). For a launch of C
CTAs of w warps, with R registers, S bytes of shared memory, B bytes to move, F FLOPs of dot
products (the op's: 2 x output pixels x weight elements), on P SMs (H200: 132) at clock f:

    occupancy   k = CTAs per SM from registers (per-warp allocation, 256-register units),
                shared memory (+1 KB per CTA), warps (64/SM), CTAs (32/SM)
    waves       W = C / (P k); quantization q = ceil(W) / W (the last wave's idle SMs)
    iterations  I = ceil(F / 2 / (C x MACs per main-loop iteration per CTA)) for a loop with
                MMAs (MACs per iteration from the loop's HGMMA/HMMA shapes); for a loop
                without MMAs, I = ceil(B / (C x global bytes loaded per loop iteration)); no
                loop: I = 1
    issue       T_issue = C w (N_static - N_loop + I N_loop) / (P x 4 schedulers x f) x q
                (every warp issues every instruction of its path once per iteration; one
                instruction per scheduler per clock)
    MMA         T_mma = 2 C I MACs_per_iteration / peak x q, peak = the dense bf16/fp16 rate
                for wgmma, MMA_SYNC_FRACTION of it for mma.sync, the fp64 rate for DMMA
                (padding of the tiles included: C I MACs_per_iteration >= F / 2)
    memory      T_mem = B / min(BW, min(C, P) x PER_SM_BW_FACTOR x BW / P)
    predicted   T = max(T_issue, T_mma, T_mem) + LAUNCH_S; the limiter is the largest term
    floor       max(B / BW, F / peak) (the roofline: each tensor moved once, no padding)

Known gaps (why the error bars are wide, +-40% or worse): latency (dependent loads, barriers,
pipeline fill) is not modelled, so launches with few CTAs per SM or short grids read too fast;
M/N padding inside a tile (a 56-wide group in a 64-wide tile) shows as fewer iterations;
instruction issue ignores dual issue, stalls and the MMA pipes' own throughput; caches are
ignored (B counts every tensor byte once, a stride-2 read of x counts all of x); the non-Triton
ops of a step (the head's pool and linear, small torch reductions in the backward) are not in
the report.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import io
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from . import sass
from .traffic import H200_PEAKS

#: The machine the prediction is for: NVIDIA H200 SXM. SMs, L2 and the achievable copy
#: bandwidth and bf16 matrix rate were measured on the H200 this project benchmarks on
#: (2026-10-28/11-04: 132 SMs, 4.3 TB/s copy, 769-798 TFLOP/s bf16, SM clock 1980 MHz under
#: load); the fp64 tensor rate is the datasheet's (H100-class arithmetic). The rest are assumptions of the model, to calibrate on a GPU.
H200_MODEL = {
    "sms": 132,
    "clock_hz": 1.98e9,
    "schedulers_per_sm": 4,
    "bandwidth": H200_PEAKS["bandwidth"],        # bytes/s, measured copy bandwidth
    "flops": dict(H200_PEAKS["flops"]),         # dense tensor-core FLOP/s by dtype (wgmma)
    "fp64_flops": 67e12,                        # DMMA (datasheet)
    "mma_sync_fraction": 0.5,                   # mma.sync (HMMA) vs wgmma: assumption
    "per_sm_bw_factor": 2.0,                    # one SM pulls at most 2x its share of BW
    "launch_s": 3e-6,                           # launch + ramp per kernel: assumption
}

PREDICTION_NOTE = ("predicted (model, not a measurement; calibrate with the first GPU run): "
                   "roughly +-40%, worse for small launches")

CACHE_VERSION = "2"


def cache_dir() -> Path:
    root = os.environ.get("REGNET_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "regnet_kernels")
    return Path(root) / "static"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def arch_capability(arch: str) -> int:
    """"sm_90" / "sm_90a" / "90" -> 90."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    if not digits:
        raise ValueError(f"unknown arch {arch!r} (e.g. sm_90)")
    return int(digits)


# ---------------------------------------------------------------------------
# Worker side: compile and analyse one job (runs in a subprocess without TRITON_INTERPRET)
# ---------------------------------------------------------------------------


def _restore_constexpr(value):
    import triton.language as tl
    if isinstance(value, str) and value.startswith("tl."):
        return tl.dtype(value[3:])
    if isinstance(value, list):
        return tuple(_restore_constexpr(v) for v in value)
    return value


def _loop_fields(loop: Optional["sass.Loop"], num_warps: int) -> Optional[dict]:
    return None if loop is None else {
        "instructions": loop.instructions, "mma": loop.mma, "local": loop.local,
        "loads": loop.loads, "mma_shapes": loop.mma_shapes,
        "macs_per_iteration": loop.macs_per_iteration(num_warps),
        "load_bytes_per_thread": loop.load_bytes_per_thread()}


def _sass_fields(stats: "sass.SassStats", num_warps: int) -> dict:
    return {
        "instructions": stats.instructions, "loads": stats.loads, "stores": stats.stores,
        "mma": stats.mma, "mma_shapes": stats.mma_shapes, "mma_kind": stats.mma_kind,
        "local_bytes": stats.local_bytes, "load_kinds": stats.load_kinds(),
        "loop": _loop_fields(stats.main_loop, num_warps),
    }


def _element_loop(stats: "sass.SassStats") -> Optional["sass.Loop"]:
    """A CUDA GEMM kernel's element-wise fallback main loop: the loop with the most MMAs
    among those that nest another loop (its element loads), if any."""
    leaves = {(lp.start, lp.end) for lp in sass._innermost(stats.loops)}
    outer = [lp for lp in stats.loops if lp.mma and (lp.start, lp.end) not in leaves]
    return max(outer, key=lambda lp: (lp.mma, lp.instructions)) if outer else None


def compile_triton(spec: dict, capability: int) -> dict:
    """Compile one specialization for the target and analyse it (see the module docstring)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{spec['module']}.{spec['name']} is not a JITFunction here "
                           "(is TRITON_INTERPRET set in the worker?)")
    names = [p.name for p in fn.params]
    constexprs = {k: _restore_constexpr(v) for k, v in spec["constexprs"].items()}
    attrs = {(names.index(k),): [tuple(a) for a in v] for k, v in spec["attrs"].items()}
    src = ASTSource(fn, dict(spec["signature"]), constexprs, attrs)
    options = dict(spec["options"])
    start = time.time()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    seconds = time.time() - start
    ptxas = sass.parse_ptxas_log(log.getvalue())
    if not ptxas:  # Triton's cache answered: no ptxas ran; run it for its report
        ptxas = sass.parse_ptxas_log(sass.ptxas_verbose(kernel.asm["ptx"],
                                                        f"sm_{capability}a"))
    entry = next(iter(ptxas.values())) if ptxas else {}
    num_warps = kernel.metadata.num_warps
    stats = sass.analyse_sass(sass.disassemble(kernel.asm["cubin"]))
    return {"ok": True, "kernel": spec["name"], "registers": entry.get("registers"),
            "spill_stores": entry.get("spill_stores"), "spill_loads": entry.get("spill_loads"),
            "stack": entry.get("stack"), "shared": kernel.metadata.shared,
            "num_warps": num_warps, "num_stages": options.get("num_stages"),
            "compile_s": round(seconds, 2), **_sass_fields(stats, num_warps)}


def compile_cuda_source(path: str, capability: int) -> dict:
    """nvcc -cubin one .cu for the arch; per kernel: registers, spills, smem, SASS counts."""
    nvcc = None
    for cand in ("nvcc", "/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc"):
        found = cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else \
            __import__("shutil").which(cand)
        if found:
            nvcc = found
            break
    if nvcc is None:
        return {"ok": False, "error": "nvcc not found"}
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="rk_cu_") as tmp:
        out = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-std=c++17", "-O3", "-cubin", f"-gencode=arch={compute},code={arch}",
               "-Xptxas", "-v", "-I", str(Path(path).parent), "-o", str(out), path]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"ok": False, "error": (proc.stdout + proc.stderr)[-2000:]}
        cubin = out.read_bytes()
    ptxas = sass.parse_ptxas_log(proc.stdout + proc.stderr)
    listing = sass.disassemble(cubin)
    usage = sass.resource_usage(cubin)
    kernels = {}
    for mangled, info in ptxas.items():
        stats = sass.analyse_sass(listing, mangled)
        kernels[mangled] = {"name": mangled, **info,
                            "shared": usage.get(mangled, {}).get("SHARED", info["static_smem"]),
                            **_sass_fields(stats, 1),
                            "element_loop": _loop_fields(_element_loop(stats), 1)}
    return {"ok": True, "source": Path(path).name, "compile_s": round(time.time() - start, 1),
            "kernels": kernels}


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (cu++filt, else binutils' c++filt); {} without either."""
    import shutil
    try:
        try:
            tool = sass.find_tool("cu++filt")
        except FileNotFoundError:
            tool = shutil.which("c++filt")
            if tool is None:
                return {}
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.SubprocessError, FileNotFoundError):
        return {}


def _job_cache_key(job: dict) -> Optional[str]:
    """Specialization + kernel source (Triton's cache key of the function and what it
    calls) + Triton version; .cu: the source tree's bytes + nvcc's path."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps(job, sort_keys=True).encode())
    if job["kind"] == "triton":
        import triton
        fn = getattr(importlib.import_module(job["spec"]["module"]), job["spec"]["name"])
        h.update(fn.cache_key.encode())
        h.update(triton.__version__.encode())
    else:
        for p in sorted(Path(job["path"]).parent.glob("*")):
            if p.suffix in (".cu", ".cuh", ".h"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def run_job(job: dict) -> dict:
    """One job (cached): {"kind": "triton", "spec", "capability"} or {"kind": "cu", "path",
    "capability"}."""
    key = _job_cache_key(job)
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()), cached=True)
        except (OSError, ValueError):
            pass
    try:
        if job["kind"] == "triton":
            result = compile_triton(job["spec"], job["capability"])
        else:
            result = compile_cuda_source(job["path"], job["capability"])
    except Exception as e:  # noqa: BLE001 - a failed compile is a result
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000]}
    if result.get("ok"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def worker_main() -> int:
    """Read one JSON job per line on stdin, answer one JSON line per job on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        result = run_job(job)
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


# ---------------------------------------------------------------------------
# Parent side: the worker pool
# ---------------------------------------------------------------------------


def _worker_env() -> dict:
    import regnet_kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without a warning
    root = str(Path(regnet_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get(
        "PYTHONPATH") else root  # the same package as this process, not an installed one
    return env


def run_jobs(jobs: list[dict], workers: int = 2, label=lambda job: "") -> list[dict]:
    """Run jobs in up to ``workers`` subprocesses; progress lines on stderr."""
    if not jobs:
        return []
    results: list[Optional[dict]] = [None] * len(jobs)
    todo: queue.Queue = queue.Queue()
    for i in sorted(range(len(jobs)), key=lambda i: jobs[i]["kind"] != "cu"):
        todo.put(i)  # the long nvcc jobs first
    done, start, lock = [0], time.time(), threading.Lock()
    env = _worker_env()

    def serve():
        proc = subprocess.Popen([sys.executable, "-m", "regnet_kernels.bench.static",
                                 "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                proc.stdin.write(json.dumps(jobs[i]) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                results[i] = json.loads(line) if line else {
                    "ok": False, "error": f"worker exited ({proc.poll()})"}
                with lock:
                    done[0] += 1
                    r = results[i]
                    status = ("cached" if r.get("cached") else f"{r.get('compile_s', '?')} s") \
                        if r.get("ok") else "FAILED"
                    _progress(f"[static] compiled {done[0]}/{len(jobs)} {label(jobs[i])}: "
                              f"{status} ({time.time() - start:.0f} s elapsed)")
                if not line:
                    proc = subprocess.Popen(proc.args, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, env=env)
        finally:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=serve) for _ in range(max(1, min(workers, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def _mma_peak(kind: str, dtype: str, machine: dict) -> Optional[float]:
    if kind == "wgmma":
        return machine["flops"][dtype]
    if kind == "mma.sync":
        return machine["flops"][dtype] * machine["mma_sync_fraction"]
    if kind == "dmma":
        return machine["fp64_flops"]
    return None


def predict(ctas: int, num_warps: int, nbytes: int, flops: int, analysis: dict, dtype: str,
            machine: dict = H200_MODEL) -> dict:
    """The model of the module docstring for one launch; times in microseconds."""
    bw, sms = machine["bandwidth"], machine["sms"]
    peak = machine["flops"][dtype]
    floor = max(nbytes / bw, flops / peak)
    out = {"floor_us": floor * 1e6}
    regs, shared = analysis.get("registers"), analysis.get("shared")
    if not analysis.get("ok") or regs is None or shared is None:
        return dict(out, predicted_us=None, limiter="not compiled")
    occ, occ_limit = sass.ctas_per_sm(regs, shared, num_warps)
    out.update(ctas_per_sm=occ, occupancy_limit=occ_limit)
    if occ == 0:
        return dict(out, predicted_us=None, limiter=f"cannot launch ({occ_limit})")
    waves = ctas / (sms * occ)
    quant = math.ceil(waves) / waves
    loop = analysis.get("loop")
    macs = flops / 2
    iterations, executed = 1, 0
    if loop and loop.get("macs_per_iteration") and macs:
        iterations = max(1, math.ceil(macs / (ctas * loop["macs_per_iteration"])))
        executed = ctas * iterations * loop["macs_per_iteration"]
    elif loop and loop.get("load_bytes_per_thread"):
        per_iter = num_warps * 32 * loop["load_bytes_per_thread"]
        iterations = max(1, math.ceil(nbytes / (ctas * per_iter)))
    n_loop = loop["instructions"] if loop else 0
    per_warp = analysis["instructions"] - n_loop + iterations * n_loop
    t_issue = ctas * num_warps * per_warp / (
        sms * machine["schedulers_per_sm"] * machine["clock_hz"]) * quant
    mma_peak = _mma_peak(analysis.get("mma_kind", "none"), dtype, machine)
    t_mma = 2 * executed / mma_peak * quant if mma_peak and executed else 0.0
    t_mem = nbytes / min(bw, min(ctas, sms) * machine["per_sm_bw_factor"] * bw / sms)
    terms = {"issue": t_issue, "mma": t_mma, "memory": t_mem}
    limiter = max(terms, key=terms.get)
    predicted = terms[limiter] + machine["launch_s"]
    if loop and loop.get("local"):
        limiter += " (spills in loop)"
    return dict(out, waves=waves, iterations=iterations,
                mma_util=macs / executed if executed else None,
                issue_us=t_issue * 1e6, mma_us=t_mma * 1e6, memory_us=t_mem * 1e6,
                predicted_us=predicted * 1e6, limiter=limiter)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _attach_flops(launches, analyses: dict) -> None:
    """An op's FLOPs go to its first launch whose kernel has MMAs (else its first launch)."""
    seen = set()
    for launch in launches:
        call = launch.op_call
        if call is None or id(call) in seen or not call.flops:
            continue
        seen.add(id(call))
        target = next((l for l in call.launches
                       if analyses.get(l.spec_key(), {}).get("mma")), call.launches[0])
        target.flops = call.flops


def _layer_range(layers: list[str]) -> str:
    unique = list(dict.fromkeys(layers))
    return unique[0] if len(unique) == 1 else f"{unique[0]}..{unique[-1]} ({len(unique)})"


def _kb(n):
    return None if n is None else round(n / 1024, 1)


ROW_FIELDS = [
    "model", "batch", "dtype", "arch", "mode", "phase", "layers", "count", "op", "kernel",
    "shape", "tile", "warps", "stages", "registers", "spill_stores", "spill_loads", "smem_kb",
    "ctas", "ctas_per_sm", "occupancy_limit", "waves", "load_kinds", "mma_kind",
    "loop_instructions", "loop_mma", "loop_local", "iterations", "mma_util", "mb", "gflop",
    "floor_us", "issue_us", "mma_us", "memory_us", "predicted_us", "limiter", "total_floor_us",
    "total_predicted_us", "error"]


def _predicted_row(ctas: int, warps: int, nbytes: int, flops: int, analysis: dict, dtype: str,
                   machine: dict, count: int) -> dict:
    """The compiled kernel's figures and the model's prediction for `count` identical
    launches: the columns of ROW_FIELDS both reports share (times in us per launch,
    total_* for all of them)."""
    p = predict(ctas, warps, nbytes, flops, analysis, dtype, machine)
    loop = analysis.get("loop") or {}
    predicted = p.get("predicted_us")
    return {
        "warps": warps, "registers": analysis.get("registers"),
        "spill_stores": analysis.get("spill_stores"), "spill_loads": analysis.get("spill_loads"),
        "smem_kb": _kb(analysis.get("shared")), "ctas": ctas,
        "ctas_per_sm": p.get("ctas_per_sm"), "occupancy_limit": p.get("occupancy_limit"),
        "waves": p.get("waves"), "load_kinds": analysis.get("load_kinds"),
        "mma_kind": analysis.get("mma_kind"), "loop_instructions": loop.get("instructions"),
        "loop_mma": loop.get("mma"), "loop_local": loop.get("local"),
        "iterations": p.get("iterations"), "mma_util": p.get("mma_util"),
        "mb": nbytes / 1e6, "gflop": flops / 1e9, "floor_us": p["floor_us"],
        "issue_us": p.get("issue_us"), "mma_us": p.get("mma_us"),
        "memory_us": p.get("memory_us"), "predicted_us": predicted,
        "limiter": p.get("limiter"), "total_floor_us": p["floor_us"] * count,
        "total_predicted_us": None if predicted is None else predicted * count,
    }


def static_report(model: str = "regnety_8gf", batch: int = 256, dtype: str = "bf16",
                  modes: tuple[str, ...] = ("eval", "train"), arch: str = "sm_90",
                  resolution: int = 224, jobs: int = 2, machine: dict = H200_MODEL) -> list[dict]:
    """One dict per group of identical launches (same mode, phase, kernel specialization,
    grid, bytes and FLOPs), in launch order; ``count`` launches each. Times in us for one
    launch; ``total_*`` for all ``count``. The API a GPU script can print beside its
    measurements (``row["kernel"]``, ``row["shape"]``, ``row["predicted_us"]``)."""
    from .capture import capture_model
    capability = arch_capability(arch)
    start = time.time()
    launches, recorder = capture_model(model, batch, dtype, modes, resolution, capability)
    specs = {}
    for launch in launches:
        specs.setdefault(launch.spec_key(), launch.spec())
    _progress(f"[static] captured {len(launches)} launches ({len(specs)} distinct "
              f"specializations) in {time.time() - start:.1f} s")
    keys = list(specs)
    job_list = [{"kind": "triton", "spec": specs[k], "capability": capability} for k in keys]
    results = run_jobs(job_list, jobs, label=lambda j: j["spec"]["name"])
    analyses = dict(zip(keys, results))
    _attach_flops(launches, analyses)
    groups: dict[tuple, list] = {}
    for launch in launches:
        key = (launch.mode, launch.phase, launch.spec_key(), launch.grid, launch.bytes,
               launch.flops, launch.op, launch.op_args)
        groups.setdefault(key, []).append(launch)
    rows = []
    for key, members in groups.items():
        first = members[0]
        a = analyses[key[2]]
        row = {
            "model": model, "batch": batch, "dtype": dtype, "arch": arch, "mode": first.mode,
            "phase": first.phase, "layers": _layer_range([m.layer for m in members]),
            "count": len(members), "op": first.op, "kernel": first.kernel_name,
            "shape": first.op_args, "tile": first.tile(),
            "stages": first.options.get("num_stages"),
            **_predicted_row(first.ctas, first.options.get("num_warps", 4), first.bytes,
                             first.flops, a, dtype, machine, len(members)),
            "error": "" if a.get("ok") else a.get("error", "")[:300],
        }
        rows.append(row)
    missing = sorted(recorder.unknown_flop_ops)
    if missing:
        _progress(f"[static] warning: no FLOP formula for ops {', '.join(missing)} "
                  "(their FLOPs count as 0; add them to capture.OP_FLOPS)")
    static_report.last_meta = {"launches": len(launches), "specializations": len(specs),
                               "unknown_flop_ops": missing,
                               "failed": sum(1 for r in results if not r.get("ok"))}
    return rows


static_report.last_meta = {}


def compile_cuda_kernels(arch: str = "sm_90", jobs: int = 2) -> dict:
    """Every CUDA .cu (csrc/cuda/*.cu) compiled for the arch: {"sources", "results"} as
    run_jobs returns them, and "kernels": short C++ name (`cuda_launches.kernel_key`) ->
    the kernel's analysis (per-warp loop MACs: compiled without a launch configuration),
    and "names": mangled -> demangled."""
    from ..backends.cpp.build import source_dir
    from .cuda_launches import kernel_key
    sources = sorted((source_dir() / "cuda").glob("*.cu"))
    capability = arch_capability(arch)
    job_list = [{"kind": "cu", "path": str(p), "capability": capability} for p in sources]
    results = run_jobs(job_list, jobs, label=lambda j: Path(j["path"]).name)
    names = _demangle([m for r in results if r.get("ok") for m in r["kernels"]])
    kernels = {}
    for r in results:
        for mangled, k in (r["kernels"].items() if r.get("ok") else ()):
            kernels[kernel_key(_short_cpp_name(names.get(mangled, mangled)))] = dict(
                k, name=names.get(mangled, mangled))
    return {"sources": sources, "results": results, "kernels": kernels, "names": names}


def cuda_source_report(arch: str = "sm_90", jobs: int = 2,
                       compiled: Optional[dict] = None) -> list[dict]:
    """Per-kernel rows of the CUDA .cu kernels (csrc/cuda/*.cu) compiled for the arch."""
    compiled = compiled or compile_cuda_kernels(arch, jobs)
    rows = []
    for src, r in zip(compiled["sources"], compiled["results"]):
        if not r.get("ok"):
            rows.append({"source": src.name, "kernel": "", "error": r.get("error", "")[:300]})
            continue
        for mangled, k in r["kernels"].items():
            loop = k.get("loop") or {}
            rows.append({"source": src.name,
                         "kernel": _short_cpp_name(compiled["names"].get(mangled, mangled)),
                         "registers": k["registers"], "spill_stores": k["spill_stores"],
                         "spill_loads": k["spill_loads"], "stack": k["stack"],
                         "smem_kb": _kb(k["shared"]), "mma_kind": k["mma_kind"],
                         "load_kinds": k["load_kinds"],
                         "loop_instructions": loop.get("instructions"),
                         "loop_mma": loop.get("mma"), "loop_local": loop.get("local"),
                         "error": ""})
    return rows


def cuda_eval_report(model: str = "regnety_8gf", batch: int = 256, dtype: str = "bf16",
                     arch: str = "sm_90", resolution: int = 224, jobs: int = 2,
                     machine: dict = H200_MODEL, compiled: Optional[dict] = None) -> list[dict]:
    """The CUDA backend's eval forward, predicted per launch with the same model as the
    Triton rows: the fused model's eval op calls (captured on meta tensors), each mapped
    to the CUDA launcher's kernel, tile and grid (`cuda_launches`), with the static
    figures of that kernel as nvcc compiled it (registers, shared memory incl. the
    pipeline's dynamic buffers, main loop: the cp.async one, or the element-wise one
    where the launch cannot take the 16-byte path). Rows grouped like static_report's."""
    from .capture import capture_model
    from .cuda_launches import LAYOUT, eval_launch, kernel_key
    compiled = compiled or compile_cuda_kernels(arch, jobs)
    _, recorder = capture_model(model, batch, dtype, ("eval",), resolution,
                                arch_capability(arch))
    groups: dict[tuple, list] = {}
    for call in recorder.op_calls:
        if call.mode != "eval" or not call.top_level:
            continue
        launch = eval_launch(call.name, call.args, dtype)
        if launch is None:
            continue
        key = (launch.kernel, launch.ctas, call.bytes, call.flops or 0, call.describe)
        groups.setdefault(key, []).append((call, launch))
    rows = []
    for (kernel, ctas, nbytes, flops, describe), members in groups.items():
        call, launch = members[0]
        k = compiled["kernels"].get(kernel_key(kernel))
        analysis = {"ok": False}
        if k:
            loop = k["loop"] if launch.vector_path else (k.get("element_loop") or k["loop"])
            if loop:  # compiled without a launch configuration: MACs per warp
                loop = dict(loop, macs_per_iteration=loop["macs_per_iteration"] * launch.warps)
            analysis = dict(k, ok=True, shared=k["shared"] + launch.dynamic_smem, loop=loop)
        rows.append({
            "model": model, "batch": batch, "dtype": dtype, "arch": arch,
            "mode": CUDA_EVAL_MODE, "phase": "forward",
            "layers": _layer_range([c.layer for c, _ in members]),
            "count": len(members), "op": call.name, "kernel": kernel, "shape": describe,
            "tile": launch.tile + ("" if launch.vector_path else " (element path)"),
            "stages": LAYOUT[dtype][2],
            **_predicted_row(ctas, launch.warps, nbytes, flops, analysis, dtype, machine,
                             len(members)),
            "error": "" if k else f"kernel {kernel} not found in the compiled .cu files"})
    return rows


#: The mode of cuda_eval_report's rows (the CUDA backend's eval forward).
CUDA_EVAL_MODE = "eval-cuda"


def _short_cpp_name(name: str) -> str:
    """void conv_bn_act_kernel<__nv_bfloat16, TileConfig<...>>(ConvParams<...>) -> the name
    and template arguments, without the parameter list and 'void '."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").replace("rk::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def summarize(rows: list[dict]) -> dict:
    """Per mode: totals and per-kernel-family (op / kernel) sums."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        fams = defaultdict(lambda: {"launches": 0, "floor": 0.0, "predicted": 0.0, "mb": 0.0,
                                    "gflop": 0.0})
        for r in mine:
            f = fams[(r["op"], r["kernel"])]
            f["launches"] += r["count"]
            f["floor"] += r["total_floor_us"]
            f["predicted"] += r["total_predicted_us"] or 0.0
            f["mb"] += r["mb"] * r["count"]
            f["gflop"] += r["gflop"] * r["count"]
        floor = sum(f["floor"] for f in fams.values())
        predicted = sum(f["predicted"] for f in fams.values())
        batch = mine[0]["batch"]
        out[mode] = {"families": dict(fams), "launches": sum(r["count"] for r in mine),
                     "floor_us": floor, "predicted_us": predicted,
                     "uncompiled": sum(r["count"] for r in mine if r["predicted_us"] is None),
                     "img_s_floor": batch / floor * 1e6 if floor else None,
                     "img_s_predicted": batch / predicted * 1e6 if predicted else None}
    return out


TABLE = [("layers", "layer(s)"), ("count", "x"), ("phase", "phase"), ("op", "op"),
         ("kernel", "kernel"), ("shape", "shape"), ("tile", "tile"), ("warps", "w"),
         ("stages", "st"), ("registers", "regs"), ("spills", "spill B st/ld"),
         ("smem_kb", "smem KB"), ("ctas", "CTAs"), ("occ", "CTA/SM (limit), waves"),
         ("load_kinds", "loads (static count)"), ("mma_kind", "MMA"),
         ("loop", "loop instr / MMA / LDL+STL"), ("iterations", "iters"),
         ("mma_util", "MMA util"), ("mb", "MB"), ("gflop", "GFLOP"), ("floor_us", "floor us"),
         ("predicted_us", "predicted us"), ("limiter", "limiter")]


def _cells(r: dict) -> list[str]:
    derived = {
        "spills": "" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}",
        "occ": "" if r.get("ctas_per_sm") is None else
        f"{r['ctas_per_sm']} ({r['occupancy_limit']}), {r['waves']:.1f}",
        "loop": "" if r.get("loop_instructions") is None else
        f"{r['loop_instructions']} / {r['loop_mma']} / {r['loop_local']}",
        "mma_util": "" if r.get("mma_util") is None else f"{100 * r['mma_util']:.0f}%",
        "shape": (r.get("shape") or "").replace("|", "/"),
        "predicted_us": _fmt(r.get("predicted_us")) if not r.get("error") else
        f"error: {r['error'][:80]}",
    }
    return [derived[k] if k in derived else _fmt(r.get(k)) for k, _ in TABLE]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def markdown_report(rows: list[dict], cuda_rows: Optional[list[dict]], meta: dict) -> str:
    """The report: header (what, versions, the model), per-launch tables per mode, sums per
    kernel family and per mode, the CUDA kernels' table."""
    lines = [f"# Static {meta['arch']} kernel report: {meta['model']}, batch {meta['batch']}, "
             f"{meta['dtype']}, channels_last, {meta['resolution']}x{meta['resolution']}", ""]
    lines += [f"Command: `{meta['command']}`  ", f"Versions: {meta['versions']}  ",
              f"Generated: {meta['timestamp']} on a machine without a GPU: every kernel was "
              "compiled for the target, none was run.", "",
              f"**Times are {PREDICTION_NOTE}.** The floor is the roofline: each tensor byte "
              "moved once at the measured copy bandwidth, the useful FLOPs at the measured "
              "dense matrix rate.", "",
              "Model (regnet_kernels/bench/static.py): per launch, predicted = max(issue, MMA, "
              "memory) + launch overhead, where issue = CTAs x warps x (SASS instructions outside "
              "the main loop + iterations x main-loop instructions) / (SMs x 4 schedulers x "
              "clock), MMA = executed tile MACs (padding included) / the tensor-core rate, memory "
              "= bytes / bandwidth (capped per SM for grids smaller than the GPU); issue and MMA "
              "times scale by the wave quantization ceil(waves) / waves. Iterations = useful "
              "MACs / (CTAs x MACs per main-loop iteration). Constants: "
              + ", ".join(f"{k} {v}" for k, v in meta["machine"].items() if k != "flops")
              + f", dense {meta['dtype']} {meta['machine']['flops'][meta['dtype']] / 1e12:.0f} "
              "TFLOP/s.", "",
              "Columns: tile = BLOCK_M x N x K constexprs (others by name); w/st = num_warps / "
              "num_stages; spills = ptxas's spill store / load bytes; CTA/SM from registers, "
              "shared memory and warps (limit = which); loads = static SASS counts by kind "
              "(LDG.16 = 16-byte global loads, cp.async = LDGSTS with its width, TMA = UTMALDG, "
              "LDSM = ldmatrix); MMA = wgmma (HGMMA), mma.sync (HMMA) or none; loop = the "
              "innermost SASS loop holding the MMAs; MMA util = useful / executed tile MACs; "
              "MB / GFLOP = what the launch must move / do.", ""]
    summary = summarize(rows)
    for mode, s in summary.items():
        lines += [f"## {mode}: per launch ({s['launches']} launches)", ""]
        mine = [r for r in rows if r["mode"] == mode]
        lines += _md_table([t for _, t in TABLE], [_cells(r) for r in mine])
        lines += ["", f"### {mode}: sums per kernel family (us per step, batch "
                      f"{meta['batch']})", ""]
        fam_rows = []
        for (op, kernel), f in sorted(s["families"].items(), key=lambda kv: -kv[1]["predicted"]):
            fam_rows.append([op or "-", kernel, str(f["launches"]), _fmt(f["mb"]),
                             _fmt(f["gflop"]), _fmt(f["floor"]), _fmt(f["predicted"]),
                             f"{100 * f['predicted'] / s['predicted_us']:.0f}%"
                             if s["predicted_us"] else ""])
        fam_rows.append(["**total**", "", str(s["launches"]),
                         _fmt(sum(f["mb"] for f in s["families"].values())),
                         _fmt(sum(f["gflop"] for f in s["families"].values())),
                         _fmt(s["floor_us"]), _fmt(s["predicted_us"]), "100%"])
        lines += _md_table(["op", "kernel", "launches", "MB", "GFLOP", "floor us",
                            "predicted us", "share"], fam_rows)
        note = f" ({s['uncompiled']} launches not compiled: not in the sum)" \
            if s["uncompiled"] else ""
        lines += ["", f"{mode}: floor {_fmt(s['floor_us'])} us = "
                      f"{_fmt(s['img_s_floor'])} img/s; predicted {_fmt(s['predicted_us'])} us = "
                      f"{_fmt(s['img_s_predicted'])} img/s{note} ("
                      f"{'CUDA' if mode == CUDA_EVAL_MODE else 'Triton'} kernels only).", ""]
    lines += ["## Model totals", "",
              "| mode | launches | floor us | predicted us | img/s floor | img/s predicted |",
              "|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['launches']} | {_fmt(s['floor_us'])} | "
                     f"{_fmt(s['predicted_us'])} | {_fmt(s['img_s_floor'])} | "
                     f"{_fmt(s['img_s_predicted'])} |")
    lines += ["", f"Times are {PREDICTION_NOTE}.", ""]
    extra = meta.get("notes") or []
    if extra:
        lines += ["Notes:", ""] + [f"- {n}" for n in extra] + [""]
    if cuda_rows is not None:
        lines += [f"## CUDA kernels (csrc/cuda/*.cu), nvcc for {meta['arch']}a, per kernel", "",
                  f"Every compiled kernel; the eval forward's launches of them are the "
                  f"`{CUDA_EVAL_MODE}` rows above (tiles and grids as csrc/cuda's launchers "
                  "choose them, `bench/cuda_launches.py`). Static counts as above.", ""]
        lines += _md_table(
            ["source", "kernel", "regs", "spill B st/ld", "stack B", "smem KB (static)", "MMA",
             "loads (static count)", "loop instr / MMA / LDL+STL", "error"],
            [[r["source"], r["kernel"], _fmt(r.get("registers")),
              "" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}",
              _fmt(r.get("stack")), _fmt(r.get("smem_kb")), r.get("mma_kind", ""),
              r.get("load_kinds", ""),
              "" if r.get("loop_instructions") is None else
              f"{r['loop_instructions']} / {r['loop_mma']} / {r['loop_local']}",
              r.get("error", "")[:80]] for r in cuda_rows])
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], cuda_rows: Optional[list[dict]]) -> None:
    """Per-launch-group rows (ROW_FIELDS), then the CUDA kernels' rows (mode "cuda-source")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ROW_FIELDS + ["source", "stack"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
        for r in cuda_rows or []:
            w.writerow(dict({k: ("" if r.get(k) is None else r.get(k)) for k in fields},
                            mode="cuda-source"))


def versions() -> str:
    import torch
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
        parts.append(f"ptxas {_tool_version(sass.triton_ptxas(90))} (Triton's)")
    except ImportError:
        parts.append("triton not installed")
    parts.append(f"nvcc {_tool_version('nvcc')}")
    return ", ".join(parts)


def _tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "not found"
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].strip().split(",")[0]
    return "?"


def run_static(args) -> int:
    """``bench --static MODEL``."""
    import datetime
    model = args.static
    batch = (args.batches or (256,))[0]
    dtype = (args.dtypes or ("bf16",))[0]
    modes = tuple(args.modes or ("eval", "train"))
    resolution = args.resolution or 224
    if dtype not in H200_MODEL["flops"]:
        raise SystemExit(f"error: unknown dtype {dtype}; known: {', '.join(H200_MODEL['flops'])}")
    if set(modes) - {"eval", "train"}:
        raise SystemExit("error: --mode takes eval and/or train")
    command = (f"python -m regnet_kernels bench --static {model} --batch {batch} --dtype {dtype}"
               f" --mode {','.join(modes)} --arch {args.arch} --resolution {resolution}"
               + (f" --markdown {args.markdown}" if args.markdown else "")
               + (f" --csv {args.csv}" if args.csv else "")
               + (" --no-cuda-sources" if args.no_cuda_sources else ""))
    rows = static_report(model, batch, dtype, modes, args.arch, resolution, args.jobs)
    cuda_rows = None
    if not args.no_cuda_sources:
        compiled = compile_cuda_kernels(args.arch, args.jobs)
        cuda_rows = cuda_source_report(args.arch, args.jobs, compiled)
        if "eval" in modes:
            rows += cuda_eval_report(model, batch, dtype, args.arch, resolution, args.jobs,
                                     compiled=compiled)
    meta = {"model": model, "batch": batch, "dtype": dtype, "arch": args.arch,
            "resolution": resolution, "command": command, "versions": versions(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"), "machine": H200_MODEL}
    info = static_report.last_meta
    notes = [f"{info['launches']} launches captured, {info['specializations']} distinct "
             "specializations compiled"]
    if info.get("failed"):
        notes.append(f"{info['failed']} specializations failed to compile (their rows say why)")
    if info.get("unknown_flop_ops"):
        notes.append("ops without a FLOP formula (counted as 0): "
                     + ", ".join(info["unknown_flop_ops"]))
    meta["notes"] = notes
    text = markdown_report(rows, cuda_rows, meta)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        _progress(f"[static] markdown written to {args.markdown}")
    if args.csv:
        write_csv(args.csv, rows, cuda_rows)
        _progress(f"[static] CSV written to {args.csv}")
    return 0 if not info.get("failed") else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    sys.exit("usage: python -m regnet_kernels bench --static MODEL (this module's --worker "
             "mode is for the report's own subprocesses)")
