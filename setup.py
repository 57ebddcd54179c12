# Packaging metadata lives in pyproject.toml. Nothing is compiled at install time:
# the C++/CUDA extension is built on first use (see README, "Backends").
from setuptools import setup

setup()
