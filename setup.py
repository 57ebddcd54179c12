# Packaging metadata lives in pyproject.toml. Nothing is compiled at install time:
# the C++/CUDA extension is built on first use (see README, "Backends"), from sources
# that therefore ship inside the package (regnet_kernels/csrc) in a regular install.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh", ".hpp"}


class BuildPyWithCppSources(build_py):
    """build_py that also copies csrc/ to regnet_kernels/csrc, where
    regnet_kernels/backends/cpp/build.py looks first. Editable installs read csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "regnet_kernels" / "csrc"
        for source in sorted(CSRC.rglob("*")):
            if source.suffix in SOURCE_SUFFIXES:
                destination = target / source.relative_to(CSRC)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)


setup(cmdclass={"build_py": BuildPyWithCppSources})
