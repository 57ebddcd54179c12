"""Recording the Triton kernels a model launches, without a GPU and without running them.

The model runs on the ``meta`` device (shapes, dtypes and strides, no memory, no data) inside
`capture_launches`, which

1. sends every ``regnet_triton::*`` custom op to its real Python implementation (the
   launcher) instead of its fake one: a TorchDispatchMode that calls the op's registered
   function. Nested custom ops (an op whose implementation or backward calls another) go
   through the mode too. An op of any other non-aten namespace raises: on meta it would
   run its fake implementation, and whatever it launches would be missed silently;
2. replaces ``JITFunction.run`` (what ``kernel[grid](...)`` calls; autotuners and heuristics
   end there too) with a recorder: it binds the arguments exactly as Triton's launcher does
   for the target GPU (``native_specialize_impl`` with the CUDA backend: pointer types from
   tensor dtypes, i32/i64 from values, 1 and None become constexprs, 16-divisibility
   attributes), evaluates the grid, and returns without compiling or launching. Under
   ``TRITON_INTERPRET=1`` the kernels are InterpretedFunctions: their launches are recorded
   the same way (the compile step re-imports the kernel as a JITFunction in a subprocess).

Each `Launch` carries what compiling it needs (kernel module and name, signature,
constexprs, attributes, options), the grid, the bytes of the distinct tensors it touches
(each byte once: the floor of what it must move), the custom op that launched it with that
op's FLOPs (`OP_FLOPS`), and the model layer (module name) it ran for: forward launches from
forward pre/post hooks, backward launches from backward pre-hooks.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Namespaces whose ops are not custom ops: aten / prims run their meta kernels (shapes only).
_BUILTIN_NAMESPACES = {"aten", "prim", "prims", "_c10d_functional", "c10d", "profiler"}
#: Custom ops whose real implementation the capture runs.
CAPTURED_NAMESPACES = {"regnet_triton"}

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------
# FLOPs of the ops (the kernels' arguments are the kernels' business; the ops' semantics
# are the public API): op name -> f(args by schema name, outputs) -> FLOP
# ---------------------------------------------------------------------------


def _conv_flops(out: torch.Tensor, *weights: Optional[torch.Tensor]) -> int:
    """2 x output pixels x weight elements (= 2 * N*Ho*Wo * C_out * C_in/g * k * k)."""
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    return 2 * pixels * sum(w.numel() for w in weights if w is not None)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


OP_FLOPS: dict[str, Callable[[dict, Any], int]] = {
    "conv_bn_act": lambda a, out: _conv_flops(_first(out), a["weight"]),
    "conv_bn_act_squeeze": lambda a, out: _conv_flops(_first(out), a["weight"]),
    "conv_bn_stats": lambda a, out: _conv_flops(_first(out), a["weight"]),
    "conv_bn_train": lambda a, out: _conv_flops(_first(out), a["weight"]),
    "conv1x1_gate_residual": lambda a, out: _conv_flops(_first(out), a["weight"],
                                                        a.get("proj_weight")),
    "conv_dgrad": lambda a, out: _conv_flops(a["dy"], a["weight"]),
    "conv_wgrad": lambda a, out: _conv_flops(a["dy"], _first(out)),
    "se_excite": lambda a, out: 2 * a["sums"].shape[0] * (a["w1"].numel() + a["w2"].numel()),
}
#: Ops that do no dot products (elementwise, reductions): no FLOPs counted.
NO_DOT_OPS = {"se_squeeze", "bn_add_relu", "bn_finalize", "bn_update_running",
              "bn_act_backward"}


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass
class OpCall:
    """One custom-op call: its name, a short description of its arguments, its FLOPs, its
    arguments by schema name (meta tensors: shapes, strides, dtypes) and the bytes of the
    distinct tensors it reads and writes (what another backend's kernels for the same op
    must move at least)."""

    name: str
    describe: str
    flops: Optional[int]  # None: no formula for this op (reported, never silently zero)
    launches: list = field(default_factory=list)
    args: dict = field(default_factory=dict, repr=False)
    bytes: int = 0
    mode: str = ""
    layer: str = ""
    top_level: bool = True  # not called from inside another custom op


@dataclass
class Launch:
    """One kernel launch, as Triton would compile and launch it on the target."""

    index: int
    mode: str            # "eval" or "train"
    phase: str           # "forward" or "backward"
    layer: str           # module name ("stem", "s1.b1", ...; "" outside any module)
    op: str              # custom op that launched it ("" for a direct launch)
    op_args: str
    kernel_module: str
    kernel_name: str
    signature: dict      # arg name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict     # arg name -> JSON value (tl dtypes as "tl.float32")
    attrs: dict          # arg name -> [[attr, value], ...] (tt.divisibility ...)
    options: dict        # num_warps, num_stages and any other launch option given
    grid: tuple
    bytes: int           # distinct tensor bytes it touches, each once
    flops: int = 0       # filled in by the report (the op's FLOPs go to its dot kernel)
    op_call: Optional[OpCall] = field(default=None, repr=False)

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)

    def spec(self) -> dict:
        """What compiling it needs (JSON): equal specs compile to the same binary."""
        return {"module": self.kernel_module, "name": self.kernel_name,
                "signature": self.signature, "constexprs": self.constexprs,
                "attrs": self.attrs, "options": self.options}

    def spec_key(self) -> str:
        return json.dumps(self.spec(), sort_keys=True)

    def tile(self) -> str:
        """BLOCK_* constexprs as "64x128x32" (M, N, K, then others), or ""."""
        blocks = {k: v for k, v in self.constexprs.items() if k.startswith("BLOCK")}
        order = ["BLOCK_M", "BLOCK_N", "BLOCK_K"]
        keys = [k for k in order if k in blocks] + sorted(k for k in blocks if k not in order)
        if not keys:
            return ""
        if all(k in order for k in keys):
            return "x".join(str(blocks[k]) for k in keys)
        return " ".join(f"{k.removeprefix('BLOCK_')}{blocks[k]}" for k in keys)


# ---------------------------------------------------------------------------
# Binding a launch as Triton would for the target
# ---------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    name = type(v).__name__
    if name == "dtype" and hasattr(v, "name"):  # triton.language dtype
        return f"tl.{v.name}" if not str(v).startswith("tl.") else str(v)
    if name == "constexpr":
        return _json_value(v.value)
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    raise TypeError(f"cannot record constexpr value {v!r} of type {name}")


def _tensor_bytes(values) -> int:
    """Bytes of the distinct tensors (each storage byte once: views and the same tensor
    passed twice count once)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for t in values:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        start = t.storage_offset() * t.element_size()
        key = t.untyped_storage()._cdata
        spans.setdefault(key, []).append((start, start + extent * t.element_size()))
    total = 0
    for intervals in spans.values():
        intervals.sort()
        lo, hi = intervals[0]
        for a, b in intervals[1:]:
            if a > hi:
                total += hi - lo
                lo, hi = a, b
            else:
                hi = max(hi, b)
        total += hi - lo
    return total


class _Binder:
    """Triton's argument binding for a GPU target, without a GPU: per kernel, the same
    generated binder the launcher uses, built with the target's backend."""

    def __init__(self, capability: int = 90, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        self.backend = make_backend(GPUTarget("cuda", capability, warp_size))
        self._binders: dict[int, Callable] = {}

    def bind(self, fn, args, kwargs) -> tuple[dict, dict, dict, dict, dict]:
        """(bound args, signature, constexprs, attrs, options) of a launch."""
        from triton.runtime.jit import create_function_from_signature
        key = id(fn)
        if key not in self._binders:
            self._binders[key] = create_function_from_signature(fn.signature, fn.params,
                                                                self.backend)
        bound, specialization, options = self._binders[key](*args, **kwargs)
        names = [p.name for p in fn.params]
        parsed = self.backend.parse_options(dict(kwargs))
        signature, constexprs, attrs = {}, {}, {}
        for name, spec, value in zip(names, specialization, bound.values()):
            kind = spec[0]
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = _json_value(value)
            elif len(spec) > 1 and isinstance(spec[1], str) and spec[1]:
                attrs[name] = [list(a) for a in self.backend.parse_attr(spec[1])]
        given = {k: kwargs[k] for k in kwargs if k not in names and k in parsed.__dict__}
        given.setdefault("num_warps", parsed.num_warps)
        given.setdefault("num_stages", parsed.num_stages)
        return bound, signature, constexprs, attrs, given


# ---------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------


class _Recorder:
    def __init__(self, capability: int):
        self.binder = _Binder(capability)
        self.launches: list[Launch] = []
        self.op_stack: list[OpCall] = []
        self.op_calls: list[OpCall] = []
        self.layer = ""
        self.mode = "eval"
        self.phase = "forward"
        self.unknown_flop_ops: set[str] = set()
        self.other_ops: dict[str, int] = {}

    def record(self, fn, args, grid, kwargs) -> None:
        bound, signature, constexprs, attrs, options = self.binder.bind(fn, args, kwargs)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        op = self.op_stack[-1] if self.op_stack else None
        module = fn.fn.__module__
        launch = Launch(len(self.launches), self.mode, self.phase, self.layer,
                        op.name if op else "", op.describe if op else "", module,
                        fn.fn.__qualname__, signature, constexprs, attrs, options, grid,
                        _tensor_bytes(bound.values()), op_call=op)
        if op:
            op.launches.append(launch)
        self.launches.append(launch)


def _describe(args: dict) -> str:
    """Short text of an op's arguments: 4-D tensors' shapes, ints and flags that are set."""
    parts = []
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            parts.append(f"{name} {'x'.join(map(str, v.shape))}")
        elif isinstance(v, bool):
            if v:
                parts.append(name)
        elif isinstance(v, int) and name in ("stride", "groups", "kernel_size", "proj_stride"):
            if v != 1 or name == "stride":
                parts.append(f"{name[0] if name in ('stride', 'groups') else name}{v}")
    return " ".join(parts)


class _CaptureMode(TorchDispatchMode):
    """Sends the captured namespaces' custom ops to their real implementation."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace in _BUILTIN_NAMESPACES:
            return func(*args, **kwargs)
        if namespace not in CAPTURED_NAMESPACES:
            raise RuntimeError(
                f"static capture: custom op {func} is not a {'/'.join(CAPTURED_NAMESPACES)} op; "
                "on meta tensors it would run its fake implementation and its kernel launches "
                "would be missed")
        from torch._library.custom_ops import OPDEFS
        qualname = func._schema.name
        opdef = OPDEFS.get(qualname)
        if opdef is None:
            raise RuntimeError(f"static capture: {qualname} is not a torch.library.custom_op; "
                               "its real implementation cannot be run on meta tensors")
        impl = opdef._backend_fns.get("cuda") or opdef._init_fn
        if impl is None:
            raise RuntimeError(f"static capture: {qualname} has no implementation to run")
        names = [a.name for a in func._schema.arguments]
        bound = dict(zip(names, args))
        bound.update(kwargs)
        short = qualname.split("::", 1)[1]
        rec = self.recorder
        call = OpCall(short, _describe(bound), None, args=bound, mode=rec.mode, layer=rec.layer,
                      top_level=not rec.op_stack)
        rec.op_stack.append(call)
        try:
            with self:  # nested custom ops come back here
                out = impl(*args, **kwargs)
        finally:
            rec.op_stack.pop()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        call.bytes = _tensor_bytes([*bound.values(), *outs])
        if short in OP_FLOPS:
            call.flops = int(OP_FLOPS[short](bound, out))
        elif short in NO_DOT_OPS:
            call.flops = 0
        else:
            rec.unknown_flop_ops.add(short)
        rec.op_calls.append(call)
        return out


def _kernel_classes():
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    return classes


_JIT_OF_INTERPRETED: dict[int, Any] = {}


def _as_jit(fn):
    """A JITFunction for binding: the kernel itself, or (under TRITON_INTERPRET=1, where
    kernels are InterpretedFunctions) a JITFunction of the same Python function with the
    same specialization options (building one compiles nothing)."""
    if hasattr(fn, "params"):
        return fn
    key = id(fn)
    if key not in _JIT_OF_INTERPRETED:
        from triton.runtime.jit import JITFunction
        keep = ("do_not_specialize", "do_not_specialize_on_alignment")
        _JIT_OF_INTERPRETED[key] = (fn, JITFunction(fn.fn, **{k: v for k, v in fn.kwargs.items()
                                                               if k in keep}))
    return _JIT_OF_INTERPRETED[key][1]


@contextlib.contextmanager
def capture_launches(capability: int = 90) -> Iterator[_Recorder]:
    """Record (not run) every Triton launch and run the captured custom ops' real
    implementations, for code running on meta tensors inside the block."""
    recorder = _Recorder(capability)
    saved = {}

    def make_run(cls):
        def run(self, *args, grid, warmup=False, **kwargs):
            if warmup:
                return saved[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.record(_as_jit(self), args, grid, kwargs)
            return None
        return run

    for cls in _kernel_classes():
        saved[cls] = cls.run
        cls.run = make_run(cls)
    try:
        with _CaptureMode(recorder):
            yield recorder
    finally:
        for cls, run in saved.items():
            cls.run = run


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def short_layer(name: str) -> str:
    """trunk_output.block2.block2-0 -> s2.b1 (stage 2, block 1: module names of the
    reference RegNet); other names unchanged."""
    name = name.removeprefix("trunk_output.")
    m = re.fullmatch(r"block(\d+)\.block\1-(\d+)(.*)", name)
    return f"s{m[1]}.b{int(m[2]) + 1}{m[3]}" if m else name


@contextlib.contextmanager
def _layer_hooks(model: torch.nn.Module, recorder: _Recorder, backward: bool):
    """Keep recorder.layer = the innermost module running (forward), or the module whose
    gradient is being computed (backward pre-hooks)."""
    handles, stack = [], []
    for name, module in model.named_modules():
        if module is model:
            continue
        label = short_layer(name)

        def pre(mod, inputs, label=label):
            stack.append(recorder.layer)
            recorder.layer = label

        def post(mod, inputs, output):
            recorder.layer = stack.pop() if stack else ""

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
        if backward:
            def bpre(mod, grad_output, label=label):
                recorder.layer = label
            handles.append(module.register_full_backward_pre_hook(bpre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def meta_model(model, dtype: str = "bf16", num_classes: int = 1000) -> torch.nn.Module:
    """The fused model (Triton backend) of a zoo name or RegNetParams on the meta device,
    parameters in ``dtype`` (as the benchmark's ``module.to(device, dtype)``)."""
    from ..models.fused import fused_model
    with torch.device("meta"):
        net = fused_model(model, backend="triton", num_classes=num_classes)
    return net.to(DTYPE_NAMES[dtype])


def capture_model(model, batch: int, dtype: str = "bf16",
                  modes: tuple[str, ...] = ("eval", "train"), resolution: int = 224,
                  capability: int = 90) -> tuple[list[Launch], _Recorder]:
    """Every Triton launch of the fused model's eval forward (no_grad) and/or one training
    step (forward, then backward of a gradient the shape of the logits: the benchmark's
    step), at ``batch`` x 3 x resolution^2 channels_last input in ``dtype``."""
    net = model if isinstance(model, torch.nn.Module) else meta_model(model, dtype)
    x = torch.empty(batch, 3, resolution, resolution, device="meta",
                    dtype=DTYPE_NAMES[dtype]).contiguous(memory_format=torch.channels_last)
    launches: list[Launch] = []
    with capture_launches(capability) as rec:
        for mode in modes:
            rec.mode, rec.phase = mode, "forward"
            if mode == "eval":
                net.eval()
                with torch.no_grad(), _layer_hooks(net, rec, backward=False):
                    net(x)
            elif mode == "train":
                net.train()
                with _layer_hooks(net, rec, backward=True), warnings.catch_warnings():
                    # "Full backward hook is firing when gradients are computed with respect
                    # to module outputs since no inputs require gradients": the stem's, meant
                    warnings.filterwarnings("ignore", message="Full backward hook")
                    out = net(x)
                    rec.phase, rec.layer = "backward", "head"
                    out.backward(torch.empty_like(out))
                net.zero_grad(set_to_none=True)
            else:
                raise ValueError(f"unknown mode {mode!r} (eval, train)")
    launches = rec.launches
    return launches, rec
