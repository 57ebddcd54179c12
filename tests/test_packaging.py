"""A regular (not editable) install ships the C++/CUDA sources, so the CPU backend builds
from the installed package."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from regnet_kernels.backends.cpp import build

REPO = Path(__file__).resolve().parents[1]
# What a package build reads: the metadata, the package and the C++/CUDA sources.
PACKAGE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "regnet_kernels",
                 "csrc")


def copy_checkout(target: Path) -> Path:
    """The files a package build reads, copied, so that the build's own outputs (build/,
    *.egg-info) stay out of the checkout."""
    target.mkdir()
    for name in PACKAGE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)
    return target


def cpu_build_key(csrc: Path) -> str:
    """The extension's build key: a hash over every source and header file under csrc."""
    return build._build_key(csrc, build._sources(csrc, False), build._cpu_flags(),
                                 False)


def test_build_py_ships_the_cpp_sources(tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    build_lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build_lib)],
                   cwd=checkout, check=True, capture_output=True, timeout=120)
    shipped = build_lib / "regnet_kernels" / "csrc"
    assert (shipped / "ops.cpp").is_file()
    assert cpu_build_key(shipped) == cpu_build_key(REPO / "csrc"), \
        "the package's sources and headers differ from csrc/"


def test_pip_install_into_a_fresh_venv_runs_a_fused_model(tmp_path):
    """`pip install .` (a wheel build, no network) into a new venv that sees this
    environment's torch; the installed package, run from outside the checkout, finds its
    sources and runs a fused model on the CPU backend. About 10 s when the extension's build
    is cached (the suite's other C++ tests build it into the same cache), else a build."""
    checkout = copy_checkout(tmp_path / "checkout")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         str(checkout)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    code = textwrap.dedent(f"""
        import sys, torch
        import regnet_kernels as rk
        from regnet_kernels.backends.cpp import build
        assert rk.__file__.startswith({str(venv)!r}), rk.__file__
        print(build.source_dir())
        ref = rk.reference_model("regnetx_200mf").eval()
        fused = rk.fused_model("regnetx_200mf").eval()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            print(float((fused(x) - ref(x)).abs().max()))
    """)
    run = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    source_dir, max_abs_diff = run.stdout.split()
    assert Path(source_dir).is_relative_to(venv)
    assert cpu_build_key(Path(source_dir)) == cpu_build_key(REPO / "csrc")
    assert float(max_abs_diff) < 1e-4
