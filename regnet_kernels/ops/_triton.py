"""`triton` and `triton.language`, or stand-ins where Triton is not installed.

Triton is a Linux-only dependency. Without it the package still imports, so the C++
backends, the builder, the reference models and the CLI work (on macOS, say); the
Triton kernels are then defined against stand-ins, and launching one raises
`TritonUnavailable`, which says why.
"""
from __future__ import annotations

from typing import Optional


class TritonUnavailable(RuntimeError):
    """A Triton kernel was launched where Triton cannot be imported."""


def unavailable_reason() -> str:
    return (f"triton is not importable ({IMPORT_ERROR}); the Triton backend needs it (Linux: "
            "pip install 'triton>=3.6'); the C++ backends ('cpu', 'cuda') do not")


class _MissingKernel:
    """What `triton.jit` returns without Triton: launching it raises."""

    def __init__(self, fn):
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        raise TritonUnavailable(f"cannot launch {self.__name__}: {unavailable_reason()}")


class _MissingTriton:
    """`triton` without Triton: `jit` and the host-side `cdiv`, which the launchers'
    argument checks share with the C++ ops."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)


class _MissingLanguage:
    """`triton.language` without Triton: names that are only read inside kernels (or
    to pick a constexpr for a launch) resolve to inert placeholders."""

    def __getattr__(self, name: str) -> str:
        return f"triton.language.{name} (triton not installed)"


try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Optional[ImportError] = None
except ImportError as e:
    IMPORT_ERROR = e
    triton = _MissingTriton()
    tl = _MissingLanguage()

__all__ = ["triton", "tl", "IMPORT_ERROR", "TritonUnavailable", "unavailable_reason"]
