"""Providers: the implementations a case is timed with, in one process.

Baselines (the reference modules): ``eager`` (NCHW), ``eager_cl`` (channels_last), ``compile``,
``compile_freeze`` and ``compile_max`` (torch.compile default, default with Inductor's freezing
-- the weights and BN statistics taken as constants: BN folded into the conv weights, which are
prepacked once, the best CPU inference Inductor offers; eval only -- and max-autotune; NCHW
as the reference is written).
cuDNN autotuning (``torch.backends.cudnn.benchmark``) is on for every provider on CUDA.
Fused: ``triton`` (CUDA), ``cuda`` (the C++ extension's CUDA kernels), ``cpu``
(the C++ CPU ops, CPU only).
Fused providers get channels_last inputs, their fast path. In eval, fused models and blocks
are frozen (`regnet_kernels.freeze`: BN folded once, not every forward), the same constant
weights assumption as ``compile_freeze``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.fused import freeze
from ..ops import dispatch
from ..ops.dispatch import interpreting
from .cases import Case

BASELINES = ("eager", "eager_cl", "compile", "compile_freeze", "compile_max")
FUSED = ("triton", "cuda", "cpu")
PROVIDERS = BASELINES + FUSED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


#: Set to 1 (with TRITON_INTERPRET=1) to let the ``triton`` provider run CPU tensors through
#: Triton's interpreter: for dry runs of the GPU scripts, which exercise the mechanics on tiny
#: shapes; such a time measures the interpreter, not a kernel.
INTERPRETER_ENV = "REGNET_BENCH_INTERPRETER"


def interpreter_allowed() -> bool:
    """The triton provider may run CPU tensors (INTERPRETER_ENV and TRITON_INTERPRET set)."""
    return os.environ.get(INTERPRETER_ENV, "0") not in ("", "0") and interpreting()


def unavailable_reason(provider: str, device: str) -> str | None:
    """Why ``provider`` cannot run on ``device`` ("cuda" or "cpu"), or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    if provider in FUSED:
        return _fused_unavailable_reason(provider, device)
    if provider.startswith("compile") and not hasattr(torch, "compile"):
        return "torch.compile is missing"
    return None


def _fused_unavailable_reason(provider: str, device: str) -> str | None:
    """The backend table's answer (`dispatch`), with the benchmark's own rule: Triton's CPU
    interpreter times the interpreter, not a kernel, so it runs only when asked for."""
    if provider == "triton" and device != "cuda" and not interpreter_allowed():
        return ("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (numpy, far "
                "too slow to benchmark)")
    if provider == "triton" and device == "cuda" and interpreting():
        return "TRITON_INTERPRET=1 is set: the kernels would run in the interpreter"
    if provider == "cuda" and device != "cuda":
        return "needs a CUDA device"
    backend = dispatch.BACKENDS[provider]
    reason = backend.why_not(device)
    if reason:
        return f"{provider} {reason}"
    usable, reason = backend.status()  # the C++ backends build on first use
    return None if usable else f"{provider} backend unavailable: {reason.splitlines()[0]}"


def _to_device(t, device: str, channels_last: bool):
    """Move an input to the device; activations (4-D, floating) get the memory format."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.to(device)
    if channels_last and t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


@dataclass
class Prepared:
    """A provider's module/function for one case, dtype and mode, ready for inputs."""

    provider: str
    fn: Callable
    fused_inputs: bool
    channels_last: bool
    module: torch.nn.Module | None


def prepare(case: Case, provider: str, dtype: str, mode: str, device: str) -> Prepared:
    """Build ``provider``'s callable for ``case``; raises Unavailable with the reason."""
    reason = unavailable_reason(provider, device)
    if reason:
        raise Unavailable(reason)
    if provider == "compile_freeze" and mode != "eval":
        raise Unavailable("Inductor's freezing is for inference: it takes the weights as "
                          "constants (a training step would run plain compile)")
    with torch.random.fork_rng(devices=[]):  # the same weights for every provider
        torch.manual_seed(0)
        module = case.make_module().to(device, DTYPES[dtype])
    if mode == "train":
        module.train()
    if provider in FUSED:
        fn = case.fused_fn(module, provider)
        if mode == "eval" and isinstance(fn, torch.nn.Module):
            freeze(fn)
        return Prepared(provider, fn, True, True, fn if isinstance(fn, torch.nn.Module) else None)
    channels_last = provider == "eager_cl"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    fn = module
    if provider.startswith("compile"):
        torch._dynamo.reset()  # a fresh cache per case
        # compile and compile_max share the module's forward code, one graph per batch size
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        options = {"compile_max": {"mode": "max-autotune"},
                   # an Inductor config patch for this compilation only, not a global setting
                   "compile_freeze": {"options": {"freezing": True}}}.get(provider, {})
        fn = torch.compile(module, dynamic=False, **options)
    return Prepared(provider, fn, False, channels_last, module)


def make_step(prepared: Prepared, case: Case, batch: int, dtype: str, mode: str,
              device: str) -> Callable[[], object]:
    """A zero-argument call of one eval forward, or one training step (forward, backward)."""
    inputs = tuple(_to_device(t, device, prepared.channels_last)
                   for t in case.make_inputs(batch, DTYPES[dtype], prepared.fused_inputs))
    fn = prepared.fn
    if mode == "eval":
        return lambda: fn(*inputs)
    module = prepared.module
    # A block inside a network also computes its input's gradient; a network's image does not.
    needs_grad = [t for t in inputs if case.level != "model" and isinstance(t, torch.Tensor)
                  and t.is_floating_point()]
    for t in needs_grad:
        t.requires_grad_()
    out = fn(*inputs)  # once for the output's shape (and to compile)
    grad = torch.randn_like(out)

    def train_step():
        module.zero_grad(set_to_none=True)
        for t in needs_grad:
            t.grad = None
        fn(*inputs).backward(grad)

    return train_step
