"""Finding, building (on first use) and loading the C++/CUDA extension.

Nothing is compiled at install time and `import regnet_kernels` never builds:
the first call of a C++ op (`regnet_kernels.backends.cpp.ops.*`) calls `load()`, which

1. finds the sources: `regnet_kernels/csrc/` in an installed package (setup.py ships
   them there), else `csrc/` at the repository root (a checkout or an editable install);
2. picks a cache directory keyed by everything the binary depends on:
   `$REGNET_KERNELS_CACHE` (or `$XDG_CACHE_HOME/regnet_kernels`, default
   `~/.cache/regnet_kernels`) / `<torch version>-<cpu|cuXY>-<hash>`, the hash over
   the sources, the compiler flags and the CPU's vector capability;
3. loads a finished build (`BUILD_OK` written) as it is, without a lock, so a
   read-only cache works; otherwise builds there with `torch.utils.cpp_extension.load`
   + ninja under an exclusive `fcntl.flock` on `<cache dir>/build.lock`: concurrent
   processes build once, the others say they wait and load the result. The flock dies
   with its process, so a torch `lock` file found while holding it was left by a killed
   build (which would make torch wait forever): it is removed, with one line saying so.
   The build reports each compiled file on stderr (n of m, elapsed; about a minute
   on 2 idle cores, several under load);
4. loads the shared library into torch (`torch.ops.regnet_kernels.*`).

The CUDA kernels (`csrc/cuda/<op>.cu`) and their torch bindings
(`csrc/cuda/<op>_binding.cpp`) are a second library, built and loaded by `load_cuda()`
after the first, only where
torch has CUDA and a device is present: a CUDA build problem leaves the CPU backend
working. A failed build raises `ExtensionBuildError` whose first line says why
(compiler not found, no OpenMP, killed, the first compiler error) and then what is
needed; it is remembered, so later calls fail fast with the same error. An interrupted
build (Ctrl-C) raises KeyboardInterrupt and is resumed by the next call.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

NAME = "regnet_kernels_cpp"
CUDA_NAME = "regnet_kernels_cuda"
CACHE_ENV = "REGNET_KERNELS_CACHE"

_lock = threading.Lock()
_loaded: dict[bool, str] = {}  # cuda? -> path of the loaded library
_errors: dict[bool, Exception] = {}


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be found, built or loaded."""


def source_dir() -> Path:
    """The C++/CUDA sources: `regnet_kernels/csrc` in an installed package (setup.py copies
    them there), else `csrc/` at the repository root (a checkout, an editable install)."""
    package = Path(__file__).resolve().parents[2]  # regnet_kernels
    installed = package / "csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


def _with_cuda() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def _cpu_flags() -> list[str]:
    """Compiler flags: optimization, OpenMP (at::parallel_for is OpenMP in torch's
    CPU builds) and AVX2 for ATen's Vectorized when this CPU and torch have it."""
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _sources(csrc: Path, cuda: bool) -> list[Path]:
    """The CPU library: the schemas (ops.cpp), the autograd kernels (autograd.cpp) and
    the CPU kernels; the CUDA one: kernels + binding."""
    if cuda:
        return sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
    return sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp"))


CUDA_ARCHS_ENV = "REGNET_KERNELS_CUDA_ARCHS"
DEFAULT_CUDA_ARCHS = ("90a", "80")


def cuda_arch_flags() -> list[str]:
    """nvcc's -gencode flags for $REGNET_KERNELS_CUDA_ARCHS (comma-separated compute
    capabilities, e.g. "90a" for an H100/H200 alone; default 90a and 80). Part of the build
    cache's key, so builds for different architectures never share a folder."""
    archs = [a.strip() for a in os.environ.get(CUDA_ARCHS_ENV, "").split(",") if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}a?", arch):
            raise ExtensionBuildError(
                f"{CUDA_ARCHS_ENV}={os.environ[CUDA_ARCHS_ENV]!r}: expected compute capabilities "
                "such as 90a or 90a,80")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs or DEFAULT_CUDA_ARCHS]


def _build_key(csrc: Path, sources: list[Path], flags: list[str], cuda: bool) -> str:
    h = hashlib.sha256()
    dirs = [csrc, csrc / "cuda"] if cuda else [csrc, csrc / "cpu"]
    headers = sorted(p for d in dirs for p in d.glob("*") if p.suffix in (".h", ".cuh", ".hpp"))
    for p in sorted(sources) + headers:
        h.update(str(p.relative_to(csrc)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(flags).encode())
    device = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    return f"{torch.__version__.replace('+', '_')}-{device}-{h.hexdigest()[:16]}"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "regnet_kernels"


def _say(message: str) -> None:
    print(f"regnet_kernels: {message}", file=sys.stderr, flush=True)


WAIT_NOTE_SECONDS = 30  # how often a process waiting for another's build says it still waits


@contextlib.contextmanager
def _build_lock(path: Path, what: str):
    """An exclusive flock on path, holding the owner's pid (for the messages of the processes
    that wait). Waiting says so, and again every WAIT_NOTE_SECONDS."""
    import fcntl

    with open(path, "a+") as f:
        start = time.monotonic()
        next_note = start
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now >= next_note:
                    f.seek(0)
                    owner = f.read().strip() or "?"
                    waited = f" ({now - start:.0f} s so far)" if now - start >= 1 else ""
                    _say(f"waiting for another process (pid {owner}) building the {what} in "
                         f"{path.parent}{waited}")
                    next_note = now + WAIT_NOTE_SECONDS
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """torch.utils.cpp_extension builds under a `lock` file it deletes when done and waits
    forever while one exists. Called with the build lock held: no live process of ours is
    building here, so a `lock` file was left by a killed build (SIGKILL, SIGTERM, OOM)."""
    stale = build_dir / "lock"
    if stale.exists():
        stale.unlink()
        _say(f"removed {stale}, left by a build that was killed; building again")


def _object_name(source: Path) -> str:
    """The object file torch.utils.cpp_extension compiles source to."""
    return source.stem + (".cuda.o" if source.suffix == ".cu" else ".o")


@contextlib.contextmanager
def _progress(build_dir: Path, sources: list[Path]):
    """Reports each source whose object file the build writes: `compiled x.cpp (n of m, t s)`
    (polled from a thread, since cpp_extension.load blocks until the build ends)."""
    start = time.time()
    pending = {_object_name(s): s.name for s in sources}
    done: list[str] = []
    stop = threading.Event()

    def poll():
        for obj in list(pending):
            path = build_dir / obj
            if path.is_file() and path.stat().st_mtime >= start - 1:
                done.append(pending.pop(obj))
                _say(f"compiled {done[-1]} ({len(done)} of {len(sources)}, "
                     f"{time.time() - start:.0f} s)")

    def watch():
        while not stop.wait(0.5):
            poll()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    poll()
    _say(f"built in {time.time() - start:.0f} s")


def _how_to_build(csrc: Path, build_dir: Path | None) -> str:
    return (
        "The regnet_kernels C++ extension is compiled on first use with "
        "torch.utils.cpp_extension and ninja. It needs: the sources in "
        f"{csrc} (shipped with the package), a C++20 "
        "compiler with OpenMP (g++ >= 10 or clang >= 12; pick one with the CXX environment variable), "
        "the `ninja` package, and a writable cache directory "
        f"({build_dir if build_dir else cache_root()}; set {CACHE_ENV}=/some/dir to move it). "
        "The Triton backend (regnet_kernels.ops) does not need it."
    )


def _nvcc_toolkit() -> Path | None:
    """The CUDA toolkit `nvcc` on PATH belongs to, as nvcc itself reports it (its
    `--dryrun` TOP): right also when nvcc is a wrapper script outside the toolkit."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return None


def _cuda_toolkit_flags() -> tuple[list[str], list[str]]:
    """(include paths, linker flags) for the CUDA runtime when torch's guess of the
    toolkit (CUDA_HOME, else the folder above nvcc) has no CUDA headers, as when
    /usr/local/bin/nvcc is a wrapper script: then the toolkit nvcc runs from."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
        return [], []
    top = _nvcc_toolkit()
    if top is None or not (top / "include" / "cuda_runtime.h").is_file():
        raise ExtensionBuildError(
            f"the CUDA headers (cuda_runtime.h) are not under CUDA_HOME={home} nor next to "
            "nvcc; set CUDA_HOME to the CUDA toolkit's folder")
    return [str(top / "include")], [f"-L{top / 'lib64'}"]


def _failure_cause(error: Exception, log: str) -> str:
    """One line on why a build failed, from the build log: what a user must fix first."""
    compiler = os.environ.get("CXX", "c++")
    for pattern, cause in (
            (r"omp\.h: No such file", "the C++ compiler has no OpenMP (omp.h not found)"),
            (r"Killed signal terminated program|internal compiler error: Killed",
             "the compiler was killed (out of memory?)"),
            (r"^/bin/sh: .*: not found$|^FAILED: \[code=127\]",  # ninja: "command not found"
             f"the C++ compiler ({compiler!r}; set CXX to choose one) was not found"),
    ):
        if re.search(pattern, log, re.M):
            return cause
    first_error = re.search(r"^.*\berror:.*$", log, re.M)  # compilers: "file:line: error: ..."
    if first_error:
        return f"first error: {first_error.group(0).strip()}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _interrupted(error: Exception) -> bool:
    """Whether the build's ninja stopped because of Ctrl-C (SIGINT reaches the whole
    process group: ninja stops, and torch reports it as a failed build)."""
    cause = error.__cause__
    returncode = getattr(cause, "returncode", 0)
    return returncode in (-2, 130) or "interrupted by user" in str(error)


def _build(csrc: Path, sources: list[Path], build_dir: Path, name: str, flags: list[str],
           cuda_flags: list[str], cuda: bool) -> None:
    what = "CUDA kernels" if cuda else "C++ extension"
    done = build_dir / "BUILD_OK"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir / "build.lock", what):
            if done.is_file():  # another process built it while this one waited
                return
            _remove_stale_torch_lock(build_dir)
            _say(f"building the {what} from {len(sources)} files (first use only; about a "
                 f"minute on 2 idle cores, several under load) in {build_dir}")
            from torch.utils import cpp_extension

            kwargs, includes, ldflags = {}, [str(csrc)], ["-fopenmp"]
            if cuda:
                kwargs["extra_cuda_cflags"] = cuda_flags
                cuda_includes, cuda_ldflags = _cuda_toolkit_flags()
                includes += cuda_includes
                ldflags += cuda_ldflags
            with _progress(build_dir, sources):
                cpp_extension.load(
                    name=name, sources=[str(s) for s in sources],
                    build_directory=str(build_dir), extra_cflags=flags, extra_ldflags=ldflags,
                    extra_include_paths=includes, is_python_module=False, is_standalone=False,
                    verbose=False, **kwargs)
            done.write_text(str(build_dir / f"{name}.so") + "\n")
    except ExtensionBuildError:
        raise
    except Exception as e:  # compiler errors, missing ninja, unwritable cache, ...
        if _interrupted(e):
            raise KeyboardInterrupt(f"the regnet_kernels {what} build in {build_dir} was "
                                    "interrupted; the next use resumes it") from e
        log = str(e).strip()
        if len(log) > 4000:  # keep the first compiler error, not only the tail
            first_error = log.find("error")
            start = max(0, log.rfind("\n", 0, max(first_error, 0)) - 500)
            log = ("..." if start else "") + log[start:start + 4000] + "\n..."
        raise ExtensionBuildError(
            f"building the regnet_kernels {what} failed: {_failure_cause(e, log)}\n"
            f"{_how_to_build(csrc, build_dir)}\nBuild log ({build_dir}):\n{log}") from e


def _build_and_load(cuda: bool = False) -> str:
    """Builds (unless a finished build is cached) and loads the CPU or the CUDA library."""
    csrc = source_dir()
    if not (csrc / "ops.cpp").is_file():
        raise ExtensionBuildError(f"C++ sources not found at {csrc}. " + _how_to_build(csrc, None))
    name = CUDA_NAME if cuda else NAME
    flags = _cpu_flags()
    cuda_flags = ["-O3", *cuda_arch_flags()] if cuda else []
    sources = _sources(csrc, cuda)
    build_dir = cache_root() / _build_key(csrc, sources, flags + cuda_flags, cuda)
    library = build_dir / f"{name}.so"
    if not (build_dir / "BUILD_OK").is_file():  # a finished build loads as it is: read-only too
        _build(csrc, sources, build_dir, name, flags, cuda_flags, cuda)
    try:
        torch.ops.load_library(str(library))
    except Exception as e:
        raise ExtensionBuildError(
            f"loading {library} failed ({e}); delete {build_dir} to rebuild. "
            + _how_to_build(csrc, build_dir)) from e
    return str(library)


def _load(cuda: bool) -> str:
    if cuda in _loaded:
        return _loaded[cuda]
    with _lock:
        if cuda not in _loaded:
            if cuda in _errors:
                raise _errors[cuda]
            try:
                _loaded[cuda] = _build_and_load(cuda)
            except ExtensionBuildError as e:
                _errors[cuda] = e
                raise
    return _loaded[cuda]


def load() -> str:
    """Build (first use only) and load the extension (the op schemas and the CPU
    kernels); returns the library's path. Raises ExtensionBuildError, with what the
    build needs, when it cannot."""
    return _load(cuda=False)


def load_cuda() -> str:
    """Build (first use only) and load the CUDA kernels' library, after `load()`.
    Raises ExtensionBuildError when torch has no CUDA or no device is present, or
    when the build fails."""
    load()
    if not _with_cuda():
        raise ExtensionBuildError(
            "the CUDA kernels need a CUDA build of torch and a CUDA device "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"device present: {torch.cuda.is_available()})")
    return _load(cuda=True)


def available(cuda: bool = False) -> tuple[bool, str]:
    """(True, "") when the extension (with cuda=True: its CUDA kernels) is, or can be,
    built and loaded, else (False, reason). Builds it when it was not yet built."""
    try:
        load_cuda() if cuda else load()
    except ExtensionBuildError as e:
        return False, str(e)
    return True, ""
