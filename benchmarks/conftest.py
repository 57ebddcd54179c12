"""Collect the pytest-benchmark files benchmarks/bench_<op>.py (named after the op they time,
not test_*.py, so the default `python -m pytest` run, whose testpaths is tests/, never picks them
up). Run them with `pytest benchmarks/ --benchmark-only`."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
