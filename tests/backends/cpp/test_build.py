"""Building the C++ extension on first use: importing builds nothing, a broken source is a
clear error, nvcc's targets from the environment; and with a two-file stand-in for csrc/ (it
compiles in about a second): two processes at once into a fresh cache directory (one builds,
the other waits and loads), recovery from a killed build, progress and waiting messages, a
read-only finished build, and the first line of a failure saying why. (The real sources'
first build is the one every CI run does on first use, in a fresh cache.)"""
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from regnet_kernels.backends.cpp import build

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 120  # a killed build once hung every later one forever


def test_import_does_not_build(tmp_path):
    env = dict(os.environ, REGNET_KERNELS_CACHE=str(tmp_path / "cache"))
    code = "import regnet_kernels, regnet_kernels.backends.cpp.ops; print('imported')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr
    assert not (tmp_path / "cache").exists()


def test_build_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(build.ExtensionBuildError, match="sources not found"):
        build._build_and_load()
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "ops.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(build, "source_dir", lambda: src)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(build.ExtensionBuildError) as info:
        build._build_and_load()
    msg = str(info.value)
    assert "deliberately broken" in msg and "C++20 compiler" in msg
    assert build.CACHE_ENV in msg and "ninja" in msg


def test_cuda_architectures_from_the_environment(monkeypatch):
    """REGNET_KERNELS_CUDA_ARCHS picks nvcc's targets (default sm_90a and sm_80); a bad
    value is a clear error."""
    monkeypatch.delenv(build.CUDA_ARCHS_ENV, raising=False)
    assert build.cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a",
                                            "-gencode=arch=compute_80,code=sm_80"]
    monkeypatch.setenv(build.CUDA_ARCHS_ENV, " 90a ")
    assert build.cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv(build.CUDA_ARCHS_ENV, "sm_90")
    with pytest.raises(build.ExtensionBuildError, match="expected compute capabilities"):
        build.cuda_arch_flags()


@pytest.fixture
def sources(tmp_path):
    """A stand-in for csrc/: ops.cpp and cpu/extra.cpp, one trivial function each."""
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "ops.cpp").write_text("int regnet_kernels_build_test_ops() { return 1; }\n")
    (src / "cpu" / "extra.cpp").write_text("int regnet_kernels_build_test_extra() { return 2; }\n")
    return src


def build_dir_of(src: Path, cache: Path) -> Path:
    """Where `load()` builds src with cache as REGNET_KERNELS_CACHE."""
    key = build._build_key(src, build._sources(src, False), build._cpu_flags(),
                                False)
    return cache / key


def load_command(src: Path) -> list[str]:
    """A python command that loads the extension built from src and prints its path."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from regnet_kernels.backends.cpp import build, ops as cpp
        build.source_dir = lambda: Path({str(src)!r})
        print(build.load())
    """)
    return [sys.executable, "-c", code]


def env_with(cache: Path, **extra) -> dict:
    env = dict(os.environ, REGNET_KERNELS_CACHE=str(cache))
    env.pop("CXX", None)  # the default compiler, unless the test picks one
    env.update(extra)
    return env


def load(src: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(load_command(src), env=env_with(cache, **env), cwd=REPO,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"load() did not finish in {TIMEOUT} s; stderr:\n{stderr}")


def assert_built(result: subprocess.CompletedProcess, build_dir: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(build_dir / f"{build.NAME}.so")
    assert (build_dir / "BUILD_OK").is_file()
    assert not (build_dir / "lock").exists()


def test_concurrent_first_build(sources, tmp_path):
    """Two processes load at once from a fresh cache directory: exactly one builds, the other
    waits on the lock and loads the finished build."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(load_command(sources), env=env_with(cache), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=TIMEOUT), *p.communicate())
               for p in procs]
    build_dir = build_dir_of(sources, cache)
    for result in results:
        assert_built(result, build_dir)
    building = [r.stderr for r in results if "regnet_kernels: building the C++ extension" in r.stderr]
    assert len(building) == 1, "exactly one process builds; the other waits on the lock and loads"
    assert str(build_dir) in building[0]
    assert len(list(cache.glob("*/BUILD_OK"))) == 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_is_recovered(sources, tmp_path, sig):
    """A build killed while torch's `lock` file exists (its compiler is made slow), then a
    normal run: it removes the stale lock, says so in one line, and builds."""
    cache = tmp_path / "cache"
    build_dir = build_dir_of(sources, cache)
    slow_cxx = tmp_path / "slow-c++"
    slow_cxx.write_text('#!/bin/sh\ncase " $* " in *" -c "*) sleep 60;; esac\nexec c++ "$@"\n')
    slow_cxx.chmod(0o755)
    first = subprocess.Popen(load_command(sources), env=env_with(cache, CXX=str(slow_cxx)),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (build_dir / "lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, sig)  # the build's process group: python, ninja, the compilers
        first.wait()
    assert (build_dir / "lock").exists() and not (build_dir / "BUILD_OK").exists()

    result = load(sources, cache)
    assert_built(result, build_dir)
    removed = [line for line in result.stderr.splitlines() if "was killed" in line]
    assert len(removed) == 1 and str(build_dir / "lock") in removed[0], result.stderr


def test_waiting_for_another_build_says_so(sources, tmp_path):
    """While another process holds the build lock, a second one says it waits and for whom,
    then builds once the lock is released."""
    import fcntl

    cache = tmp_path / "cache"
    build_dir = build_dir_of(sources, cache)
    build_dir.mkdir(parents=True)
    with open(build_dir / "build.lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        waiter = subprocess.Popen(load_command(sources), env=env_with(cache), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said_something = select.select([waiter.stderr], [], [], TIMEOUT)[0]
        first_line = waiter.stderr.readline() if said_something else "(nothing)"
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    out, err = waiter.communicate(timeout=TIMEOUT)
    assert first_line.startswith("regnet_kernels: waiting for another process (pid 4242) "
                                 f"building the C++ extension in {build_dir}"), first_line
    assert_built(subprocess.CompletedProcess(waiter.args, waiter.returncode, out, err), build_dir)


def read_only_command(folder: Path, command: list[str]) -> list[str] | None:
    """command run with folder read-only: by permissions, or for root (whom permissions do
    not stop) in a mount namespace where folder is a read-only bind mount; None if neither."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return command
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run(
        [unshare, "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                                    f"mount -o remount,bind,ro {folder}"], capture_output=True)
    if not probe or probe.returncode != 0:
        return None
    script = (f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && '
              'exec "$@"')
    return [unshare, "-m", "sh", "-c", script, "sh", *command]


def test_build_progress_then_a_read_only_finished_build_loads(sources, tmp_path):
    cache = tmp_path / "cache"
    build_dir = build_dir_of(sources, cache)
    result = load(sources, cache)
    assert_built(result, build_dir)
    compiled = re.findall(r"regnet_kernels: compiled (\S+) \((\d) of 2, \d+ s\)", result.stderr)
    assert sorted(name for name, _ in compiled) == ["extra.cpp", "ops.cpp"], result.stderr
    assert sorted(n for _, n in compiled) == ["1", "2"], result.stderr
    assert re.search(r"regnet_kernels: built in \d+ s", result.stderr), result.stderr

    command = read_only_command(cache, load_command(sources))
    if command is None:
        pytest.skip("no way to make a read-only folder here (root without mount namespaces)")
    try:
        result = subprocess.run(command, env=env_with(cache), cwd=REPO, capture_output=True,
                                text=True, timeout=TIMEOUT)
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(build_dir / f"{build.NAME}.so")
    assert "regnet_kernels:" not in result.stderr, "a finished build loads silently"


def test_missing_compiler_is_the_first_line(sources, tmp_path):
    """The first line of the error (all that `python -m regnet_kernels env` shows) says the
    compiler is missing, before the build log."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from regnet_kernels.ops import dispatch
        from regnet_kernels.backends.cpp import build, ops as cpp
        build.source_dir = lambda: Path({str(sources)!r})
        print(dispatch.environment_report())
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT,
                            env=env_with(tmp_path / "cache", CXX="/nonexistent/c++"))
    assert result.returncode == 0, result.stderr[-3000:]
    cpu_line = next(line for line in result.stdout.splitlines() if line.startswith("  cpu "))
    assert "the C++ compiler ('/nonexistent/c++'; set CXX to choose one) was not found" in \
           cpu_line, result.stdout


def test_interrupted_build_is_a_keyboard_interrupt(sources, tmp_path, monkeypatch):
    """Ctrl-C reaches ninja too, which stops; torch reports that as a failed build. It is an
    interruption (resumed by the next call), not a missing compiler."""
    from torch.utils import cpp_extension

    def interrupted_ninja(**kwargs):
        ninja = subprocess.CalledProcessError(-signal.SIGINT, ["ninja"],
                                              b"ninja: build stopped: interrupted by user.\n")
        raise RuntimeError("Error building extension: ninja: build stopped") from ninja

    monkeypatch.setattr(cpp_extension, "load", interrupted_ninja)
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt, match="interrupted; the next use resumes it"):
        build._build_and_load()
