"""The CUDA emulation harness: the CUDA kernels (csrc/cuda/*.cu), run on the CPU: every .cu file is compiled as host
C++ with g++ under RK_CUDA_EMULATION (tests/cuda_emu/cuda_emulation.h: CTAs run one
after another, a CTA's threads are fibers (or, with RK_EMU_OS_THREADS=1, OS threads),
__syncthreads is a barrier, warp shuffles go through per-warp slots; build.py builds
and caches the library) and the plain C launchers (launchers.h) are called through
ctypes with CPU tensors' data pointers as the "device" pointers. Outputs are NaN-filled (an unwritten element fails) and guarded
(a write past the end fails); references are float64 PyTorch.

What this verifies: the fp32 paths end to end, i.e. index math, tiling and bounds,
both load paths (16-byte vector and element), padding, groups, strides, the epilogues
(BN, ReLU, gate, shortcuts, squeeze sums, BN statistics partials) and the
deterministic reductions; the element-wise training kernels also in fp16 / bf16; and
the fp16 / bf16 tensor-core GEMMs of every conv kernel (conv_bn_act,
conv1x1_gate_residual, rk_conv_train / rk_conv_dgrad / rk_conv_wgrad) over all the
16-bit tile shapes. mma.sync m16n8k16 is emulated from the PTX ISA's fragment tables
(rk_emu::mma_m16n8k16 in cuda_emulation.h; checked on its own by
test_mma_m16n8k16_emulation, with a transposed-fragment negative control), so these
tests check the fragments igemm.cuh loads (compute_stage) and the accumulator layout
its epilogues assume against the ISA's layout. Their references are float64 from the
same 16-bit-rounded inputs, with the kernels' own roundings mirrored (the prologue's
u rounded to 16 bits before the GEMM); tolerances ||out - ref|| / ||ref|| < 2e-3
(fp16) and 1.5e-2 (bf16) for 16-bit outputs, 1e-5 for the fp32 side outputs (squeeze
sums, BN partials, dgate). Swapping two A (or the two B) fragment registers in
compute_stage made every 16-bit conv test fail and nothing else.
What it cannot: the tensor core's own arithmetic (the emulation sums the exact
products in fp32 in k order; the hardware's internal rounding / summation order is
not modelled, so outputs are not bit-exact to a GPU's); GPU memory-model issues and
races beyond what the barrier semantics expose; launch-resource limits (registers,
occupancy); speed.

Barrier placement is checked as far as a deterministic schedule can: the fibers of
a CTA run in thread order, or reversed in odd CTAs, so a missing __syncthreads
between a write and another thread's read fails (planting such bugs in igemm.cuh,
conv_bn_train.cu and the per-channel kernels (bn_stats.cu, se_squeeze.cu, bn_add_relu.cu)
made the tests fail).

The kernels run in the test process (a crash, e.g. an out-of-bounds access or a
__trap, ends the session; pytest's faulthandler names the test). RK_EMU_FORK=1 runs
each test in a forked child instead, so a crash fails just that test with its signal:
for debugging a kernel only, since a child forked after torch's OpenMP / MKL threads
have run can deadlock in its first parallel torch op (it did, in a full-suite run).
Skips only when g++ or the CUDA headers (cuda_runtime.h) are missing.

    python -m pytest tests -q -k cuda_emu                  # every op's emulated launches
    python -m pytest tests/backends/cuda/test_emulation_harness.py -q   # the harness itself

The emulated launches of each op are the `cuda_emu` tests of tests/ops/test_<op>.py; the
harness's own checks (mma, cp.async, ldmatrix, fast_div, the struct mirrors, barriers) are
tests/backends/cuda/test_emulation_harness.py. This module holds what they share: the `emu`
fixture (tests/conftest.py imports it), guarded inputs and outputs, the float64 comparisons.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import pickle
import signal
import sys
import traceback
import zlib
from pathlib import Path

import pytest
import torch

from cuda_emu import build as emu_build
from cuda_emu import structs as S

UNAVAILABLE = (emu_build.gxx() is None or emu_build.cuda_include() is None)
UNAVAILABLE_REASON = "the CUDA emulation needs g++ and the CUDA headers (cuda_runtime.h)"
needs_emulation = pytest.mark.skipif(UNAVAILABLE, reason=UNAVAILABLE_REASON)

DT = {torch.float32: S.RK_FLOAT32, torch.float16: S.RK_FLOAT16, torch.bfloat16: S.RK_BFLOAT16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
HALF_TYPES = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def emu(request, tmp_path_factory):
    """The emulated CUDA library (built once per session); skips without g++ or the CUDA
    headers."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE_REASON)
    try:
        cache = Path(request.config.cache.mkdir("rk_cuda_emu"))
    except Exception:  # cache provider disabled
        cache = tmp_path_factory.mktemp("rk_cuda_emu")
    return emu_build.build(cache)


def isolated(fn):
    """With RK_EMU_FORK=1, runs the test in a forked child: a crash becomes a failure
    naming the signal (see the module docstring for why this is not the default)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not os.environ.get("RK_EMU_FORK") or not hasattr(os, "fork"):
            return fn(*args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                fn(*args, **kwargs)
                payload = ("ok", "")
            except pytest.skip.Exception as e:
                payload = ("skip", str(e.msg) if hasattr(e, "msg") else str(e))
            except pytest.fail.Exception as e:
                payload = ("fail", str(e.msg))
            except BaseException as e:  # noqa: BLE001
                payload = ("fail", f"{type(e).__name__}: {e}\n\n" + "".join(
                    traceback.format_exception(type(e), e, e.__traceback__)[-4:]))
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                with os.fdopen(w, "wb") as f:
                    f.write(pickle.dumps(payload))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not data:
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                pytest.fail(f"the emulated kernel crashed the test process ({sig}); "
                            "see the captured stderr (an abort is __trap() or an emulation "
                            "check, SIGSEGV an out-of-bounds access)", pytrace=False)
            pytest.fail(f"the test process exited with status {status}", pytrace=False)
        kind, msg = pickle.loads(data)
        if kind == "skip":
            pytest.skip(msg)
        if kind == "fail":
            pytest.fail(msg, pytrace=False)

    return wrapper


def call(emu, name, *args):
    """Calls a launcher; returns its result (cudaError_t: 0 = cudaSuccess)."""
    argtypes, restype = S.LAUNCHERS[name]
    try:
        f = emu.fn(name, argtypes, restype)
    except LookupError as e:
        pytest.fail(str(e), pytrace=False)
    return f(*args)


def launch(emu, name, *args):
    rc = call(emu, name, *args)
    assert rc == 0, f"{name} returned cudaError {rc}"


def ref(p):
    return ctypes.byref(p)


GUARD = 64
_KEEP: list[torch.Tensor] = []  # guarded input copies, alive until the test ends


@pytest.fixture(autouse=True)
def release_guarded_inputs():
    """Frees the guarded input copies after each test (autouse through tests/conftest.py)."""
    yield
    _KEEP.clear()


def _dense(t):
    """Whether t's elements fill exactly numel consecutive elements (any dim order)."""
    expect = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def ptr(t):
    """The data pointer of an input. A dense input (contiguous, channels_last, ...) is
    passed as a copy with NaN guard elements either side, so that a kernel reading past
    its end gets NaN, which shows in the output."""
    if t is None:
        return None
    if t.is_floating_point() and t.numel() > 0 and _dense(t):
        buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
        g = buf.as_strided(t.shape, t.stride(), GUARD)
        g.copy_(t)
        _KEEP.append(buf)
        return g.data_ptr()
    return t.data_ptr()


class Out:
    """A NaN-filled output with guard elements either side (checked after the launch)."""

    def __init__(self, shape, dtype=torch.float32, fill=float("nan")):
        n = math.prod(shape)
        self.buf = torch.full((n + 2 * GUARD,), -12345.0, dtype=dtype)
        self.buf[GUARD:GUARD + n] = fill
        self.t = self.buf[GUARD:GUARD + n].view(shape)
        self.n = n

    @property
    def ptr(self):
        return self.t.data_ptr()

    def check_guards(self, what="output"):
        g = torch.cat([self.buf[:GUARD], self.buf[GUARD + self.n:]])
        bad = (g != -12345.0).nonzero().flatten()
        assert bad.numel() == 0, f"{what}: {bad.numel()} elements written outside the output"


def assert_close(what, out, expect, tol=1e-5):
    """||out - expect|| / ||expect|| < tol, and every element finite."""
    out = out.detach().double()
    expect = expect.detach().double()
    assert out.shape == expect.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expect.shape)}"
    bad = ~torch.isfinite(out)
    if bad.any():
        idx = bad.nonzero()
        pytest.fail(f"{what}: {int(bad.sum())} of {out.numel()} elements not finite (unwritten?), "
                    f"first at {tuple(idx[0].tolist())}; shape {tuple(out.shape)}", pytrace=False)
    err = (out - expect).norm().item()
    scale = expect.norm().item()
    rel = err / max(scale, 1e-30)
    if not rel < tol:
        diff = (out - expect).abs()
        i = int(diff.argmax())
        loc = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), out.shape))
        pytest.fail(f"{what}: relative error {rel:.3e} >= {tol:.0e} (max |diff| {diff.max().item():.4g} "
                    f"at {loc}: got {out.flatten()[i].item():.6g}, expected "
                    f"{expect.flatten()[i].item():.6g})", pytrace=False)


def seed_of(case):
    return zlib.crc32(repr(case).encode()) % 100000


def nhwc_strides(t):
    """(n, h, w, c) element strides of an NCHW-shaped tensor view."""
    s = t.stride()
    return s[0], s[2], s[3], s[1]


def to_layout(x, layout):
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return x.contiguous()
    raise ValueError(layout)


def out_hw(h, k, stride):
    return (h + 2 * (k // 2) - k) // stride + 1


def row_tiles(t, block):
    """(R, C) -> (ceil(R / block), block, C), zero-padded rows."""
    r = t.shape[0]
    tiles = -(-r // block)
    pad = torch.zeros((tiles * block - r, *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad]).view(tiles, block, *t.shape[1:])


# ---------------------------------------------------------------------------
# Launcher arguments (shared by the op tests and the harness's negative controls)
# ---------------------------------------------------------------------------

def conv_args(x, w, scale, shift, stride, groups, relu, y_ptr, sums_ptr, dtype=torch.float32):
    n, c_in, h, wd = x.shape
    sxn, sxh, sxw, sxc = nhwc_strides(x)
    swo, swi, swh, sww = w.stride()
    return S.rk_conv_bn_act_args(
        dtype=DT[dtype], x=ptr(x), n=n, h=h, w=wd, c_in=c_in, sx_n=sxn, sx_h=sxh, sx_w=sxw,
        sx_c=sxc, weight=ptr(w), c_out=w.shape[0], k=w.shape[2], sw_o=swo, sw_i=swi, sw_h=swh,
        sw_w=sww, scale=ptr(scale), shift=ptr(shift), stride=stride, groups=groups,
        relu=int(relu), y=y_ptr, sums=sums_ptr)


def bn_add_relu_case(dtype, rows, c, mode, seed=0):
    torch.manual_seed(seed + rows + c)
    y = torch.randn(rows, c).to(dtype)
    scale, shift = torch.rand(c) + 0.5, torch.randn(c) * 0.5
    short = torch.randn(rows, c).to(dtype) if mode != "none" else None
    sc_s, sc_t = (torch.rand(c) + 0.5, torch.randn(c) * 0.5) if mode == "proj" else (None, None)
    expect = y.double() * scale.double() + shift.double()
    if mode == "identity":
        expect = expect + short.double()
    elif mode == "proj":
        expect = expect + short.double() * sc_s.double() + sc_t.double()
    out = Out((rows, c), dtype)
    args = S.rk_bn_add_relu_args(dtype=DT[dtype], y=ptr(y), rows=rows, c=c, scale=ptr(scale),
                                 shift=ptr(shift), shortcut=ptr(short), sc_scale=ptr(sc_s),
                                 sc_shift=ptr(sc_t), out=out.ptr)
    return args, out, expect.clamp_min(0), (y, scale, shift, short, sc_s, sc_t)


def tile_stats(y_rows, block_m):
    """Per row tile of (R, C): mean and sum of squared deviations from it."""
    out = []
    for t0 in range(0, y_rows.shape[0], block_m):
        tile = y_rows[t0:t0 + block_m]
        mean = tile.mean(0)
        out.append(torch.stack([mean, ((tile - mean) ** 2).sum(0)]))
    return torch.stack(out)


# ---------------------------------------------------------------------------
# Conv training kernels: the prologue and the cases shared by rk_conv_train (tests/ops/
# test_conv_bn_train.py), rk_conv_dgrad and rk_conv_wgrad (tests/ops/test_conv_grad.py)
# ---------------------------------------------------------------------------

def prologue_parts(parts, n, c_in, seed):
    g = torch.Generator().manual_seed(seed)
    in_scale = in_shift = gate = gate_full = None
    if parts in ("affine_relu", "affine", "all"):
        in_scale = torch.rand(c_in, generator=g) + 0.5
        in_shift = torch.randn(c_in, generator=g) * 0.5
    relu = parts in ("affine_relu", "relu", "all")
    if parts in ("gate", "all"):
        gate_full = torch.rand(n, c_in + 3, generator=g)  # row stride c_in + 3
        gate = gate_full[:, :c_in]
    pro = S.rk_prologue(in_scale=ptr(in_scale), in_shift=ptr(in_shift), in_relu=int(relu),
                        gate=ptr(gate), s_gate_n=c_in + 3 if gate is not None else 0)
    return pro, (in_scale, in_shift, relu, gate), gate_full


def apply_prologue(x64, parts):
    """u and v (the pre-gate value) in float64; x64 (N, C, H, W)."""
    in_scale, in_shift, relu, gate = parts
    v = x64
    if in_scale is not None:
        v = v * in_scale.double().view(1, -1, 1, 1) + in_shift.double().view(1, -1, 1, 1)
    a = v.clamp_min(0) if relu else v
    u = a * gate.double()[:, :, None, None] if gate is not None else a
    return u, v, a


def gemm_input(x, parts):
    """u as the kernels' A operand holds it (float64 values): computed in fp32 from x
    (v = fmaf(x, in_scale, in_shift), ReLU, times the gate) and rounded once to x's
    dtype; x itself when there is no prologue."""
    in_scale, in_shift, relu, gate = parts
    if in_scale is None and not relu and gate is None:
        return x.double()
    v = x.float()
    if in_scale is not None:  # fmaf: one rounding of the exact x * s + t
        v = (x.double() * in_scale.double().view(1, -1, 1, 1)
             + in_shift.double().view(1, -1, 1, 1)).float()
    if relu:
        v = v.clamp_min(0)
    if gate is not None:
        v = v * gate[:, :, None, None]
    return v.to(x.dtype).double()


CONV_TRAIN_CASES = [
    # n, c_in, h, c_out, k, stride, groups, prologue, x layout
    (2, 16, 7, 24, 3, 1, 1, "none", "nhwc"),
    (2, 48, 13, 48, 3, 2, 6, "affine_relu", "nhwc"),
    (2, 32, 7, 32, 1, 1, 1, "gate", "nhwc"),
    (2, 24, 13, 24, 3, 2, 3, "all", "nhwc"),
    (2, 16, 5, 32, 1, 2, 1, "all", "nchw"),
    (2, 3, 13, 16, 3, 2, 1, "none", "nhwc"),
    (2, 48, 7, 48, 3, 1, 2, "all", "nhwc"),
    (1, 16, 13, 40, 3, 1, 1, "affine_relu", "nchw"),
    (2, 16, 7, 16, 3, 1, 2, "affine", "nhwc"),               # scale + shift, no ReLU
    (2, 24, 7, 24, 1, 1, 1, "relu", "nhwc"),                 # ReLU alone
    (2, 16, 1, 16, 3, 2, 2, "all", "nhwc"),                  # 1x1 map, stride 2: empty phases
    (2, 12, 7, 18, 3, 1, 1, "affine_relu", "nhwc"),          # channels off the 16-byte chunks
]

# 16-bit only: BM = 128 tiles with wide columns (forward: 128 x 128 with a partial column
# tile; dgrad: 128 x 128 per image with the dgate partials).
CONV_TRAIN_CASES_16 = [
    (1, 24, 9, 136, 3, 1, 1, "affine_relu", "nhwc"),
    (1, 136, 9, 24, 3, 1, 1, "all", "nhwc"),
]

TRAIN_16 = [(c, d) for c in CONV_TRAIN_CASES + CONV_TRAIN_CASES_16 for d in HALF_TYPES]


def conv_train_ids(c):
    return "n{}c{}h{}o{}k{}s{}g{}-{}-{}".format(*c)


def train16_ids(cd):
    return conv_train_ids(cd[0]) + "-" + str(cd[1])[6:]


# ---------------------------------------------------------------------------
# The `cuda_emu` op backend (tests/op_backends.py): op-level calls on the launchers
# ---------------------------------------------------------------------------

class EmulatedOps:
    """The eval ops with regnet_kernels.backends.cpp.ops' signatures, run by the CUDA
    launchers under the emulation (the CUDA backend's kernels, on CPU tensors): inputs are
    guarded copies, outputs NaN-filled and guarded (checked after every launch), returned as
    the C++ binding returns them (y channels_last, the squeeze sums per row tile). No argument
    checks (those are the Python functions', run by every backend) and no autograd."""

    def __init__(self, emu):
        self.emu = emu

    def conv_bn_act(self, x, weight, scale, shift, stride=1, groups=1, relu=True,
                    squeeze=False):
        args = conv_args(x, weight, scale, shift, stride, groups, relu, None, None, x.dtype)
        plan = S.rk_conv_plan()
        launch(self.emu, "rk_conv_bn_act_plan", ref(args), int(squeeze), ref(plan))
        n, c_out = x.shape[0], weight.shape[0]
        y = Out((n, plan.out_h, plan.out_w, c_out), x.dtype)
        args.y = y.ptr
        sums = Out((n, plan.tiles_per_image, c_out)) if squeeze else None
        if squeeze:
            args.sums = sums.ptr
        launch(self.emu, "rk_conv_bn_act", ref(args), None)
        y.check_guards("y")
        if not squeeze:
            return y.t.permute(0, 3, 1, 2)
        sums.check_guards("sums")
        return y.t.permute(0, 3, 1, 2), sums.t

    def se_excite(self, sums, hw, w1, b1, w2, b2):
        sums = (sums[:, None] if sums.dim() == 2 else sums).contiguous()
        n, t, c = sums.shape
        w1, w2 = w1.flatten(1), w2.flatten(1)
        gate = Out((n, c))
        args = S.rk_se_excite_args(
            sums=ptr(sums), n=n, t=t, c=c, hw=hw, weight_dtype=DT[w1.dtype], w1=ptr(w1),
            s=w1.shape[0], s1_o=w1.stride(0), s1_i=w1.stride(1), b1=ptr(b1), w2=ptr(w2),
            s2_o=w2.stride(0), s2_i=w2.stride(1), b2=ptr(b2), gate=gate.ptr)
        launch(self.emu, "rk_se_excite", ref(args), None)
        gate.check_guards("gate")
        return gate.t

    def conv1x1_gate_residual(self, x, weight, scale, shift, shortcut, gate=None,
                              proj_weight=None, proj_scale=None, proj_shift=None, proj_stride=1):
        n, c_in, h, w = x.shape
        wm = weight.flatten(1)
        pw = proj_weight.flatten(1) if proj_weight is not None else None
        y = Out((n, h, w, wm.shape[0]), x.dtype)
        sx, sr = nhwc_strides(x), nhwc_strides(shortcut)
        args = S.rk_conv1x1_gate_residual_args(
            dtype=DT[x.dtype], x=ptr(x), n=n, h=h, w=w, c_in=c_in, sx_n=sx[0], sx_h=sx[1],
            sx_w=sx[2], sx_c=sx[3], weight=ptr(wm), c_out=wm.shape[0], sw_o=wm.stride(0),
            sw_i=wm.stride(1), scale=ptr(scale), shift=ptr(shift), gate=ptr(gate),
            s_gate_n=gate.stride(0) if gate is not None else 0, res=ptr(shortcut),
            res_h=shortcut.shape[2], res_w=shortcut.shape[3], res_c=shortcut.shape[1],
            sr_n=sr[0], sr_h=sr[1], sr_w=sr[2], sr_c=sr[3], proj_weight=ptr(pw),
            sp_o=pw.stride(0) if pw is not None else 0, sp_i=pw.stride(1) if pw is not None else 0,
            proj_scale=ptr(proj_scale), proj_shift=ptr(proj_shift),
            proj_stride=proj_stride if pw is not None else 1, y=y.ptr)
        launch(self.emu, "rk_conv1x1_gate_residual", ref(args), None)
        y.check_guards("y")
        return y.t.permute(0, 3, 1, 2)
