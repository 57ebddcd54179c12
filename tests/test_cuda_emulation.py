"""The CUDA kernels (csrc/cuda/*.cu), run on the CPU: every .cu file is compiled as host
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

    python -m pytest tests/test_cuda_emulation.py -q
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import traceback
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emu import build as emu_build  # noqa: E402
from cuda_emu import structs as S  # noqa: E402

pytestmark = pytest.mark.skipif(
    emu_build.gxx() is None or emu_build.cuda_include() is None,
    reason="the CUDA emulation needs g++ and the CUDA headers (cuda_runtime.h)",
)

DT = {torch.float32: S.RK_FLOAT32, torch.float16: S.RK_FLOAT16, torch.bfloat16: S.RK_BFLOAT16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
HALF_TYPES = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def emu(request, tmp_path_factory):
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
def _release_guarded_inputs():
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
# The harness itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("src", [p.name for p in emu_build.sources()])
def test_source_compiles_under_emulation(emu, src):
    if src in emu.errors:
        pytest.fail(f"{src} does not compile under RK_CUDA_EMULATION:\n{emu.errors[src]}",
                    pytrace=False)
    assert "<link>" not in emu.errors, emu.errors.get("<link>")


SELFTEST = r"""
#include "launch.cuh"
namespace {
__global__ void probe(int* out, float* shfl, int n_early) {
  RK_DYNAMIC_SMEM(int, dyn);
  __shared__ int stat[256];
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  dyn[t] = t + 1;
  stat[t] = 1000 + t;
  __syncthreads();
  // neighbour's values: only ordered by the barrier
  out[base + t] = dyn[(t + 1) % blockDim.x] + stat[(t + 3) % blockDim.x];
  float v = static_cast<float>(t);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  float d = __shfl_down_sync(0xffffffffu, static_cast<float>(t), 1);
  float b = __shfl_sync(0xffffffffu, static_cast<float>(t), 5);
  shfl[3 * (base + t)] = v;
  shfl[3 * (base + t) + 1] = d;
  shfl[3 * (base + t) + 2] = b;
  if (t >= static_cast<int>(blockDim.x) - n_early) return;   // early exit: no deadlock
  __syncthreads();
  out[base + t] += min(t, 7) + max(2, 1);
}
}  // namespace
extern "C" int rk_emu_selftest(int* out, float* shfl, int blocks, int threads, int early) {
  RK_LAUNCH(dim3(blocks), threads, threads * sizeof(int), 0, probe)(out, shfl, early);
  return cudaGetLastError();
}
extern "C" int rk_emu_bad_launch() {
  RK_LAUNCH(dim3(0), 64, 0, 0, probe)(nullptr, nullptr, 0);
  return cudaGetLastError();
}

// The emulated mma.sync m16n8k16 alone. Warp w of CTA b multiplies matrix set
// s = b * warps + w: A (16 x 16, row-major), B (16 x 8, row-major: B[k][n]), C and D
// (16 x 8, row-major). Each lane builds its fragments from the PTX ISA's tables
// ("Matrix Fragments for mma.m16n8k16 with floating point type"; g = lane >> 2,
// t = lane % 4; two 16-bit elements per register, the lower index in the low half):
//   a_i: row g + 8 * (i in {2, 3, 6, 7}), col 2t + (i & 1) + 8 * (i >= 4)
//   b_i: row 2t + (i & 1) + 8 * (i >= 2), col g
//   c_i / d_i: row g + 8 * (i >= 2), col 2t + (i & 1)
// bad_b = 1 builds B's fragment transposed inside each 8 x 8 block (row g + 8 * (i >= 2),
// col 2t + (i & 1): B read as if it were stored [n][k]), the negative control.
namespace {
template <typename T>
uint32_t pack2(float lo, float hi) {
  const T l(lo), h(hi);
  uint16_t bl, bh;
  std::memcpy(&bl, &l, 2);
  std::memcpy(&bh, &h, 2);
  return static_cast<uint32_t>(bl) | (static_cast<uint32_t>(bh) << 16);
}

template <typename T>
__global__ void mma_probe(const float* A, const float* B, const float* C, float* D, int bad_b,
                          int reps) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int set = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  A += set * 256;
  B += set * 128;
  C += set * 128;
  D += set * 128;
  uint32_t a[4], b[2];
  float v[8];
  for (int i = 0; i < 8; ++i) {
    const int row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
    const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
    v[i] = A[row * 16 + col];
  }
  for (int r = 0; r < 4; ++r) a[r] = pack2<T>(v[2 * r], v[2 * r + 1]);
  for (int i = 0; i < 4; ++i) {
    int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0), col = g;
    if (bad_b) row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    v[i] = B[row * 8 + col];
  }
  for (int r = 0; r < 2; ++r) b[r] = pack2<T>(v[2 * r], v[2 * r + 1]);
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  for (int r = 0; r < reps; ++r) rk_emu::mma_m16n8k16<T>(d, a, b);
  for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}
}  // namespace

// cp.async: thread t of CTA b copies the 16 bytes src[b][t][0..3] into its shared slot
// (group 0; zero-filled for t >= n_fill) and src[b][t][4..7] into a second slot (group
// 1), reading both slots (set to -1 first) before any wait (seen[0]), after waiting for
// all but one group (seen[1]) and after waiting for all (seen[2]): seen is
// (CTA, thread, 3 reads, 8 ints).
namespace {
__global__ void cp_async_probe(const int* src, int* seen, int n_fill) {
  __shared__ __align__(16) int slot[64][8];
  const int t = threadIdx.x, id = blockIdx.x * blockDim.x + t;
  for (int j = 0; j < 8; ++j) slot[t][j] = -1;
  rk_emu::cp_async_16(&slot[t][0], src + 8 * id, t < n_fill);
  rk_emu::cp_async_commit();
  rk_emu::cp_async_16(&slot[t][4], src + 8 * id + 4, true);
  rk_emu::cp_async_commit();
  for (int j = 0; j < 8; ++j) seen[24 * id + j] = slot[t][j];
  rk_emu::cp_async_wait(1);
  for (int j = 0; j < 8; ++j) seen[24 * id + 8 + j] = slot[t][j];
  rk_emu::cp_async_wait(0);
  for (int j = 0; j < 8; ++j) seen[24 * id + 16 + j] = slot[t][j];
}

// ldmatrix: 32 shared rows of 8 16-bit elements (element c of row r = 16 r + c); lane l
// passes the address of row perm[l]; out = (lane, 4 registers) for .x4, then (lane, 2)
// for .x2.
__global__ void ldmatrix_probe(const int* perm, uint32_t* out) {
  __shared__ __align__(16) uint16_t rows[32][8];
  const int l = threadIdx.x;
  for (int c = 0; c < 8; ++c) rows[l][c] = static_cast<uint16_t>(16 * l + c);
  __syncwarp();
  uint32_t r4[4], r2[2];
  rk_emu::ldmatrix(r4, 4, &rows[perm[l]][0]);
  rk_emu::ldmatrix(r2, 2, &rows[perm[l]][0]);
  for (int j = 0; j < 4; ++j) out[4 * l + j] = r4[j];
  for (int j = 0; j < 2; ++j) out[128 + 2 * l + j] = r2[j];
}
}  // namespace

// rk::FastDiv (igemm.cuh): q[i] = n[i] / d[i] by its multiply-high and shift.
#include "igemm.cuh"
extern "C" void rk_emu_fast_div_probe(const int* n, const int* d, int count, int* q) {
  for (int i = 0; i < count; ++i) q[i] = rk::FastDiv(d[i]).div(n[i]);
}

extern "C" int rk_emu_cp_async_probe(const int* src, int* seen, int blocks, int threads,
                                     int n_fill) {
  RK_LAUNCH(dim3(blocks), threads, 0, 0, cp_async_probe)(src, seen, n_fill);
  return cudaGetLastError();
}

extern "C" int rk_emu_ldmatrix_probe(const int* perm, uint32_t* out) {
  RK_LAUNCH(dim3(1), 32, 0, 0, ldmatrix_probe)(perm, out);
  return cudaGetLastError();
}

extern "C" int rk_emu_mma_probe(int bf16, const float* A, const float* B, const float* C,
                                float* D, int blocks, int warps, int bad_b, int reps) {
  if (bf16)
    RK_LAUNCH(dim3(blocks), 32 * warps, 0, 0, mma_probe<__nv_bfloat16>)(A, B, C, D, bad_b, reps);
  else
    RK_LAUNCH(dim3(blocks), 32 * warps, 0, 0, mma_probe<__half>)(A, B, C, D, bad_b, reps);
  return cudaGetLastError();
}
"""


@pytest.fixture(scope="module")
def selftest_lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu_selftest")
    src = d / "selftest.cu"
    src.write_text(SELFTEST)
    so = d / "libselftest.so"
    inc = emu_build.cuda_include()
    r = subprocess.run([emu_build.gxx(), *emu_build._flags(inc), "-shared", "-x", "c++", str(src),
                        "-o", str(so)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(so))


@isolated
def test_harness_barriers_shuffles_smem(selftest_lib):
    blocks, threads, early = 3, 96, 17
    out = torch.full((blocks * threads,), -1, dtype=torch.int32)
    sh = torch.full((blocks * threads * 3,), float("nan"))
    f = selftest_lib.rk_emu_selftest
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    assert f(out.data_ptr(), sh.data_ptr(), blocks, threads, early) == 0
    t = torch.arange(threads)
    expect = ((t + 1) % threads + 1) + (1000 + (t + 3) % threads)
    expect = expect + torch.where(t < threads - early, torch.clamp(t, max=7) + 2, 0)
    assert torch.equal(out.view(blocks, threads), expect.int().expand(blocks, threads))
    sh = sh.view(blocks, threads, 3)
    warp0 = t // 32 * 32
    warp_sum = (warp0 * 32 + 31 * 16).float()  # sum of the 32 lanes' indices
    assert torch.equal(sh[..., 0], warp_sum.expand(blocks, threads))
    down = torch.where(t % 32 < 31, t + 1, t).float()
    assert torch.equal(sh[..., 1], down.expand(blocks, threads))
    assert torch.equal(sh[..., 2], (warp0 + 5).float().expand(blocks, threads))
    # an invalid configuration is reported through cudaGetLastError, not run
    assert selftest_lib.rk_emu_bad_launch() != 0


def mma_probe(lib, dtype, A, B, C, bad_b=False, reps=1, warps=2):
    sets = A.shape[0]
    D = torch.full((sets, 16, 8), float("nan"))
    f = lib.rk_emu_mma_probe
    f.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 4, *[ctypes.c_int] * 4]
    assert f(int(dtype == torch.bfloat16), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(),
             sets // warps, warps, int(bad_b), reps) == 0
    return D


def fp32_mma(A, B, C):
    """D = A B + C as the emulation sums it: exact products, fp32 sums over k in order."""
    s = torch.zeros(A.shape[0], 16, 8)
    for k in range(16):
        s = s + A[:, :, k:k + 1] * B[:, k:k + 1, :]
    return s + C


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: str(d)[6:])
@isolated
def test_mma_m16n8k16_emulation(selftest_lib, dtype):
    """rk_emu::mma_m16n8k16 with fragments built per the PTX ISA tables gives A @ B + C,
    in every warp of every CTA (4 sets: 2 CTAs x 2 warps); a B fragment transposed in its
    8 x 8 blocks gives A @ B' + C instead, B' = B with each 8 x 8 block transposed."""
    torch.manual_seed(7 if dtype == torch.float16 else 8)
    sets = 4
    A = torch.randn(sets, 16, 16).to(dtype).float()  # exactly representable in dtype
    B = torch.randn(sets, 16, 8).to(dtype).float()
    C = torch.randn(sets, 16, 8)
    D = mma_probe(selftest_lib, dtype, A, B, C)
    assert_close("D = A @ B + C", D, A.double() @ B.double() + C.double(), 1e-6)
    assert torch.equal(D, fp32_mma(A, B, C)), "D != the fp32 sum of the exact products"
    # twice: D = A B + (A B + C), the fragments (and the warp's slots) reused
    D2 = mma_probe(selftest_lib, dtype, A, B, C, reps=2)
    assert_close("D = 2 A @ B + C", D2, 2 * (A.double() @ B.double()) + C.double(), 1e-6)
    # one lane's element stands for one matrix element: a unit A picks single B rows
    for r, k in [(0, 0), (9, 3), (15, 12)]:
        E = torch.zeros(sets, 16, 16)
        E[:, r, k] = 1
        De = mma_probe(selftest_lib, dtype, E, B, torch.zeros(sets, 16, 8))
        expect = torch.zeros(sets, 16, 8)
        expect[:, r] = B[:, k]
        assert torch.equal(De, expect), f"A = e_({r},{k}): D is not B's row {k} in row {r}"
    # negative control: B's fragment transposed
    Dbad = mma_probe(selftest_lib, dtype, A, B, C, bad_b=True)
    Bt = B.view(sets, 2, 8, 8).transpose(2, 3).reshape(sets, 16, 8)
    assert_close("D with a transposed B fragment = A @ B' + C", Dbad,
                 A.double() @ Bt.double() + C.double(), 1e-6)
    with pytest.raises(pytest.fail.Exception, match="relative error"):
        assert_close("D with a transposed B fragment", Dbad, A.double() @ B.double() + C.double(),
                     TOL[dtype])


@isolated
def test_cp_async_emulation(selftest_lib):
    """cp.async lands at the wait_group that retires its group in even CTAs (stale data
    before), at once in odd CTAs; zero-fill writes zeros; wait_group(1) retires only the
    older group."""
    blocks, threads, n_fill = 2, 48, 40
    src = torch.randint(0, 1 << 20, (blocks, threads, 8), dtype=torch.int32)
    seen = torch.full((blocks, threads, 3, 8), -7, dtype=torch.int32)
    f = selftest_lib.rk_emu_cp_async_probe
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    assert f(src.data_ptr(), seen.data_ptr(), blocks, threads, n_fill) == 0
    landed = src.clone()
    landed[:, n_fill:, :4] = 0
    stale = torch.full((threads, 8), -1, dtype=torch.int32)
    even, odd = seen[0], seen[1]
    assert torch.equal(even[:, 0], stale), "even CTA: copies landed before any wait"
    assert torch.equal(even[:, 1, :4], landed[0, :, :4]), "wait_group(1): first group missing"
    assert torch.equal(even[:, 1, 4:], stale[:, 4:]), "wait_group(1) retired the newer group"
    assert torch.equal(even[:, 2], landed[0])
    for read in range(3):
        assert torch.equal(odd[:, read], landed[1]), "odd CTA: copies not landed at once"


def test_fast_div_matches_integer_division(selftest_lib):
    """FastDiv(d).div(n) == n // d for every divisor the kernels use (1 to 2^31 - 1:
    powers of two and their neighbours, primes, the 3x3 taps, group widths, image sizes)
    at the dividends where a rounding error would show: multiples of d and their
    neighbours, 0, 2^31 - 1, and random ones."""
    gen = torch.Generator().manual_seed(11)
    divisors = {1, 2, 3, 5, 7, 9, 49, 56, 196, 784, 3136, 12544, 50176, 2 ** 31 - 1,
                *range(1, 300), *torch.randint(1, 2 ** 31 - 1, (200,), generator=gen).tolist()}
    for e in range(1, 31):
        divisors |= {2 ** e - 1, 2 ** e, 2 ** e + 1}
    ns, ds = [], []
    top = 2 ** 31 - 1
    for d in sorted(divisors):
        for k in (1, 2, 3, top // d - 1, top // d):
            ns += [v for v in (k * d - 1, k * d, k * d + 1) if 0 <= v <= top]
        ns += [0, top, *torch.randint(0, top, (20,), generator=gen).tolist()]
        ds += [d] * (len(ns) - len(ds))
    n = torch.tensor(ns, dtype=torch.int32)
    d = torch.tensor(ds, dtype=torch.int32)
    q = torch.full_like(n, -1)
    f = selftest_lib.rk_emu_fast_div_probe
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    f(n.data_ptr(), d.data_ptr(), n.numel(), q.data_ptr())
    expect = torch.div(n.long(), d.long(), rounding_mode="floor")
    bad = (q.long() != expect).nonzero().flatten()
    assert bad.numel() == 0, [(int(n[i]), int(d[i]), int(q[i])) for i in bad[:5]]


@isolated
def test_ldmatrix_emulation(selftest_lib):
    """ldmatrix .x4 / .x2 per the PTX ISA: threads 8j..8j+7 give matrix j's row addresses;
    lane l gets elements 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of matrix j in register j."""
    torch.manual_seed(3)
    perm = torch.randperm(32).int()
    out32 = torch.zeros(32 * 6, dtype=torch.int32)
    f = selftest_lib.rk_emu_ldmatrix_probe
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    assert f(perm.data_ptr(), out32.data_ptr()) == 0
    out = out32.long() & 0xFFFFFFFF
    for lane in range(32):
        for regs, base in ((4, 0), (2, 128)):
            for j in range(regs):
                row = int(perm[8 * j + lane // 4])
                lo, hi = 16 * row + 2 * (lane % 4), 16 * row + 2 * (lane % 4) + 1
                assert int(out[base + regs * lane + j]) == lo | (hi << 16), (lane, regs, j)


def test_struct_mirrors_match_headers(tmp_path):
    """The ctypes mirrors have the C structs' sizes and field offsets."""
    inc = emu_build.cuda_include()
    src = tmp_path / "layout.c"
    src.write_text(S.layout_program())
    exe = tmp_path / "layout"
    r = subprocess.run([emu_build.gxx(), "-x", "c", "-std=c11", "-I", str(emu_build.CUDA_SRC),
                        "-I", str(inc), str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, f"the mirrored fields do not match the headers:\n{r.stderr[-6000:]}"
    got = dict(line.rsplit(" ", 1) for line in
               subprocess.run([str(exe)], capture_output=True, text=True, check=True)
               .stdout.splitlines())
    mirror = S.mirror_layout()
    diffs = [f"{k}: C {got[k]} vs ctypes {v}" for k, v in mirror.items() if int(got[k]) != v]
    assert not diffs, "ctypes mirrors drifted from the headers:\n" + "\n".join(diffs)


# ---------------------------------------------------------------------------
# Eval kernels (launchers.h)
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


CONV_CASES = [
    # n, c_in, h, c_out, k, stride, groups, relu, x layout, weight layout, squeeze
    (2, 16, 7, 24, 1, 1, 1, True, "nhwc", "cl", False),
    (2, 16, 7, 32, 3, 1, 1, False, "nhwc", "cl", True),
    (2, 48, 13, 48, 3, 2, 6, True, "nhwc", "cl", True),       # group width 8
    (2, 48, 7, 48, 3, 1, 2, True, "nhwc", "contig", False),   # group width 24, element B
    (2, 32, 5, 32, 3, 1, 2, True, "nchw", "cl", True),        # group width 16, element A
    (2, 48, 5, 48, 1, 2, 3, False, "nchw", "contig", False),  # k = 1, stride 2, both element
    (2, 3, 13, 16, 3, 2, 1, True, "nhwc", "contig", False),   # the stem
    (2, 3, 13, 16, 3, 2, 1, True, "nchw", "cl", True),        # the stem, squeeze
    (2, 24, 13, 40, 1, 2, 1, False, "nhwc", "cl", False),     # block_n 64, partial channel tile
    (2, 6, 7, 10, 3, 1, 1, True, "nhwc", "cl", True),         # odd widths: element paths
    (1, 16, 13, 16, 3, 1, 1, True, "nhwc", "cl", True),       # 169 pixels: partial row tile
    (2, 8, 5, 72, 3, 1, 1, True, "nhwc", "cl", False),        # block_n 128
]


def conv_ids(c):
    return "n{}c{}h{}o{}k{}s{}g{}{}{}-{}-{}".format(
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], "r" if c[7] else "", c[8], c[9],
        "sq" if c[10] else "")


def run_conv_bn_act(emu, case, dtype):
    """x and w rounded to dtype; the reference is float64 from those rounded values (the
    kernel accumulates in fp32 and rounds y once to dtype; the sums are fp32)."""
    n, c_in, h, c_out, k, stride, groups, relu, xl, wl, squeeze = case
    torch.manual_seed(seed_of(case))
    x64 = torch.randn(n, c_in, h, h, dtype=torch.float64)
    w64 = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64) / math.sqrt(c_in // groups * k * k)
    scale = torch.rand(c_out) + 0.5
    shift = torch.randn(c_out) * 0.3
    x = to_layout(x64.to(dtype), xl)
    w = w64.to(dtype)
    w = w.contiguous(memory_format=torch.channels_last) if wl == "cl" else w.contiguous()
    expect = F.conv2d(x.double(), w.double(), stride=stride, padding=k // 2, groups=groups)
    expect = expect * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if relu:
        expect = expect.clamp_min(0)
    ho = out_hw(h, k, stride)

    args = conv_args(x, w, scale, shift, stride, groups, relu, None, None, dtype=dtype)
    plan = S.rk_conv_plan()
    launch(emu, "rk_conv_bn_act_plan", ref(args), int(squeeze), ref(plan))
    assert (plan.out_h, plan.out_w) == (ho, ho)
    y = Out((n, ho, ho, c_out), dtype)
    args.y = y.ptr
    sums = None
    if squeeze:
        assert plan.tiles_per_image == -(-ho * ho // plan.block_m)
        sums = Out((n, plan.tiles_per_image, c_out))
        args.sums = sums.ptr
    launch(emu, "rk_conv_bn_act", ref(args), None)
    y.check_guards("y")
    expect_nhwc = expect.permute(0, 2, 3, 1)
    assert_close("y", y.t, expect_nhwc, TOL[dtype])
    if squeeze:  # fp32 sums of the fp32 epilogue values (before y is rounded)
        sums.check_guards("sums")
        assert_close("sums summed over tiles", sums.t.double().sum(1), expect_nhwc.sum((1, 2)))
        per_tile = torch.stack([row_tiles(expect_nhwc[i].reshape(-1, c_out), plan.block_m).sum(1)
                                for i in range(n)])
        assert_close("sums per row tile", sums.t, per_tile)
    return plan


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_ids)
@isolated
def test_conv_bn_act_fp32(emu, case):
    run_conv_bn_act(emu, case, torch.float32)


# 16-bit only: the tensor-core tiles the fp32 path never uses (BM = 128 when a tile has
# more than 64 rows and BN > 16; pick_tiles in igemm.cuh).
CONV_CASES_16 = [
    (2, 128, 9, 128, 3, 1, 2, True, "nhwc", "cl", False),     # group width 64: 128 x 64 tiles
    (1, 264, 9, 264, 1, 1, 1, True, "nhwc", "cl", True),      # width 264 > 128: 128 x 128, 3 column tiles
    (2, 16, 13, 136, 3, 2, 1, False, "nhwc", "cl", False),    # 128 x 128, stride 2, partial column tile
    (2, 64, 5, 64, 3, 2, 1, True, "nhwc", "cl", True),        # group width 64, 9 rows per image: 64 x 64
    (2, 16, 13, 40, 3, 1, 1, True, "nchw", "contig", True),   # 169 rows per image, 128 x 64, element paths
]

# The tile shapes of igemm.cuh's 16-bit table (with_tile).
TILES_16 = {"64x8", "64x16", "64x32", "64x64", "64x128", "128x32", "128x64", "128x128"}


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CONV_CASES + CONV_CASES_16, ids=conv_ids)
@isolated
def test_conv_bn_act_16bit(emu, case, dtype):
    run_conv_bn_act(emu, case, dtype)


def test_conv_bn_act_16bit_cases_cover_every_tile(emu):
    """The 16-bit cases above run every tile shape of igemm.cuh's 16-bit table."""
    seen = set()
    for case in CONV_CASES + CONV_CASES_16:
        n, c_in, h, c_out, k, stride, groups, relu, xl, wl, squeeze = case
        args = S.rk_conv_bn_act_args(dtype=S.RK_FLOAT16, n=n, h=h, w=h, c_in=c_in, c_out=c_out,
                                     k=k, stride=stride, groups=groups)
        plan = S.rk_conv_plan()
        launch(emu, "rk_conv_bn_act_plan", ref(args), int(squeeze), ref(plan))
        seen.add(f"{plan.block_m}x{plan.block_n}")
    assert seen == TILES_16, f"16-bit tiles not covered: {sorted(TILES_16 - seen)}"


def test_static_report_mirrors_the_cuda_tile_choice(emu):
    """bench/cuda_launches.py (the static report's model of the CUDA launches) picks the
    tiles the launchers' plan function picks, and its tile and pipeline tables are the
    ones in igemm.cuh / conv1x1_gate_residual.cu."""
    from regnet_kernels.bench import cuda_launches as CL
    for dtype, rk in (("fp32", S.RK_FLOAT32), ("bf16", S.RK_BFLOAT16)):
        for n_g in (3, 8, 12, 16, 24, 32, 40, 56, 64, 96, 128, 264):
            for rows in (7, 49, 64, 65, 3136):
                args = S.rk_conv_bn_act_args(dtype=rk, n=1, h=rows, w=1, c_in=n_g, c_out=n_g,
                                             k=1, stride=1, groups=1)
                plan = S.rk_conv_plan()
                launch(emu, "rk_conv_bn_act_plan", ref(args), 0, ref(plan))
                assert CL.pick_tiles(dtype, n_g, rows) == (plan.block_m, plan.block_n)
    src = (emu_build.CUDA_SRC / "igemm.cuh").read_text()
    tiles = {(int(a), int(b)): (int(c), int(d)) for a, b, c, d in
             re.findall(r"using T\d+x\d+ = Tile<(\d+), (\d+), (\d+), (\d+)>;", src)}
    assert tiles == CL.CONV_TILES
    gate = (emu_build.CUDA_SRC / "conv1x1_gate_residual.cu").read_text()
    assert {(int(a), int(b)): (int(c), int(d)) for a, b, c, d in
            re.findall(r"using G\d+x\d+ = Tile<(\d+), (\d+), (\d+), (\d+)>;", gate)} \
        == CL.GATE_TILES
    assert re.search(r"kBK = sizeof\(T\) == 2 \? 32 : 16;", src)
    assert re.search(r"kStages = 3;", src) and CL.LAYOUT["bf16"] == (32, 40, 3)
    assert CL.LAYOUT["fp32"] == (16, 20, 3)


@isolated
def test_conv_bn_act_rejects_bad_args(emu):
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 2, 2)  # even k
    s = torch.ones(8)
    y = Out((1, 5, 5, 8))
    args = conv_args(x, w, s, s, 1, 1, True, y.ptr, None)
    assert call(emu, "rk_conv_bn_act", ref(args), None) != 0
    y.check_guards()
    assert torch.isnan(y.t).all()


@isolated
def test_harness_catches_a_wrong_conv_launch(emu):
    """Negative control: a launch told N = 1 instead of 2 leaves image 1 unwritten."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    s, t = torch.ones(16), torch.zeros(16)
    y = Out((2, 7, 7, 16))
    args = conv_args(x, w, s, t, 1, 1, False, y.ptr, None)
    args.n = 1
    launch(emu, "rk_conv_bn_act", ref(args), None)
    expect = F.conv2d(x.double(), w.double(), padding=1).permute(0, 2, 3, 1)
    assert_close("image 0", y.t[:1], expect[:1])
    with pytest.raises(pytest.fail.Exception, match="not finite"):
        assert_close("y", y.t, expect)


SE_CASES = [(2, 3, 48, 12, torch.float32, False), (3, 1, 100, 40, torch.float32, True),
            (2, 2, 64, 70, torch.float16, False), (2, 2, 40, 8, torch.bfloat16, True)]


@pytest.mark.parametrize("case", SE_CASES, ids=lambda c: f"n{c[0]}t{c[1]}c{c[2]}s{c[3]}-{str(c[4])[6:]}"
                         + ("-strided" if c[5] else ""))
@isolated
def test_se_excite(emu, case):
    n, t, c, s, wdt, strided = case
    torch.manual_seed(c + s)
    hw = 49
    sums = torch.randn(n, t, c) * 10
    w1 = (torch.randn(s, c) / math.sqrt(c)).to(wdt)
    w2 = (torch.randn(c, s) / math.sqrt(s)).to(wdt)
    if strided:  # transposed storage: w1[s, c] at c * S + s
        w1 = w1.t().contiguous().t()
        w2 = w2.t().contiguous().t()
    b1 = (torch.randn(s) * 0.1).to(wdt)
    b2 = (torch.randn(c) * 0.1).to(wdt)
    gate = Out((n, c))
    args = S.rk_se_excite_args(
        sums=ptr(sums), n=n, t=t, c=c, hw=hw, weight_dtype=DT[wdt], w1=ptr(w1), s=s,
        s1_o=w1.stride(0), s1_i=w1.stride(1), b1=ptr(b1), w2=ptr(w2), s2_o=w2.stride(0),
        s2_i=w2.stride(1), b2=ptr(b2), gate=gate.ptr)
    launch(emu, "rk_se_excite", ref(args), None)
    gate.check_guards("gate")
    mean = sums.double().sum(1) / hw
    hidden = (mean @ w1.double().t() + b1.double()).clamp_min(0)
    expect = torch.sigmoid(hidden @ w2.double().t() + b2.double())
    assert_close("gate", gate.t, expect)


GATE_CASES = [
    # n, h, c_in, c_out, gate, proj (None | (c_r, stride, h_r)), x layout
    (2, 7, 24, 24, True, None, "nhwc"),
    (2, 7, 24, 24, False, None, "nchw"),
    (2, 5, 32, 48, False, (16, 1, 5), "nhwc"),
    (2, 7, 40, 80, True, (24, 2, 13), "nhwc"),
    (2, 7, 16, 24, True, (20, 2, 14), "nchw"),
    (2, 5, 12, 40, True, (20, 1, 5), "nhwc"),   # widths 12 / 20: element paths in NHWC
    (1, 13, 16, 20, True, None, "nhwc"),        # C_out 20: element-wise output chunks
    (3, 5, 8, 36, False, (8, 2, 9), "nhwc"),    # C_out 36: a partial chunk per row
]


def gate_ids(c):
    return "h{}c{}o{}{}-{}-{}".format(c[1], c[2], c[3], "-gate" if c[4] else "",
                                      "id" if c[5] is None else f"proj{c[5][1]}", c[6])


def run_conv1x1_gate_residual(emu, case, dtype):
    """x, w, res, proj_weight in dtype, scale / shift / gate fp32. The kernel gates x in
    fp32 and rounds u = x * gate to dtype before the GEMM: so does the reference."""
    n, h, c_in, c_out, use_gate, proj, xl = case
    torch.manual_seed(c_in * 7 + c_out)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in) / math.sqrt(c_in)).to(dtype)
    scale, shift = torch.rand(c_out) + 0.5, torch.randn(c_out) * 0.3
    gate_full = torch.rand(n, c_in + 5) if use_gate else None  # row stride c_in + 5
    gate = gate_full[:, :c_in] if use_gate else None
    u = (x.float() * gate.view(n, c_in, 1, 1)).to(dtype) if use_gate else x
    main = torch.einsum("nchw,oc->nhwo", u.double(), w.double()) * scale.double() + shift.double()
    if proj is None:
        res = to_layout(torch.randn(n, c_out, h, h), xl).to(dtype)
        short = res.double().permute(0, 2, 3, 1)
        hr, cr = h, c_out
        pw = ps = psh = None
        ps_stride = 1
    else:
        cr, ps_stride, hr = proj
        res = to_layout(torch.randn(n, cr, hr, hr), xl).to(dtype)
        pw = (torch.randn(c_out, cr) / math.sqrt(cr)).to(dtype)
        ps, psh = torch.rand(c_out) + 0.5, torch.randn(c_out) * 0.3
        rs = res.double()[:, :, ::ps_stride, ::ps_stride]
        short = torch.einsum("nchw,oc->nhwo", rs, pw.double()) * ps.double() + psh.double()
    expect = (main + short).clamp_min(0)
    y = Out((n, h, h, c_out), dtype)
    sx, sr = nhwc_strides(x), nhwc_strides(res)
    args = S.rk_conv1x1_gate_residual_args(
        dtype=DT[dtype], x=ptr(x), n=n, h=h, w=h, c_in=c_in, sx_n=sx[0], sx_h=sx[1],
        sx_w=sx[2], sx_c=sx[3], weight=ptr(w), c_out=c_out, sw_o=w.stride(0), sw_i=w.stride(1),
        scale=ptr(scale), shift=ptr(shift), gate=ptr(gate), s_gate_n=c_in + 5, res=ptr(res),
        res_h=hr, res_w=hr, res_c=cr, sr_n=sr[0], sr_h=sr[1], sr_w=sr[2], sr_c=sr[3],
        proj_weight=ptr(pw), sp_o=pw.stride(0) if pw is not None else 0,
        sp_i=pw.stride(1) if pw is not None else 0, proj_scale=ptr(ps), proj_shift=ptr(psh),
        proj_stride=ps_stride, y=y.ptr)
    launch(emu, "rk_conv1x1_gate_residual", ref(args), None)
    y.check_guards("y")
    assert_close("y", y.t, expect, TOL[dtype])


@pytest.mark.parametrize("case", GATE_CASES, ids=gate_ids)
@isolated
def test_conv1x1_gate_residual_fp32(emu, case):
    run_conv1x1_gate_residual(emu, case, torch.float32)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", GATE_CASES, ids=gate_ids)
@isolated
def test_conv1x1_gate_residual_16bit(emu, case, dtype):
    run_conv1x1_gate_residual(emu, case, dtype)


# ---------------------------------------------------------------------------
# Training kernels (launchers.h, "Training ops")
# ---------------------------------------------------------------------------

def tile_stats(y_rows, block_m):
    """Per row tile of (R, C): mean and sum of squared deviations from it."""
    out = []
    for t0 in range(0, y_rows.shape[0], block_m):
        tile = y_rows[t0:t0 + block_m]
        mean = tile.mean(0)
        out.append(torch.stack([mean, ((tile - mean) ** 2).sum(0)]))
    return torch.stack(out)


@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("rows,c,block_m", [(98, 24, 64), (338, 40, 64), (50, 7, 128), (256, 16, 32),
                                          (3000, 40, 32)])  # 94 tiles > 32 merge rows
@isolated
def test_bn_finalize(emu, rows, c, block_m, gamma):
    torch.manual_seed(rows + c)
    y = torch.randn(rows, c, dtype=torch.float64) * 3 + torch.randn(c, dtype=torch.float64) * 5
    partials = tile_stats(y, block_m).float().contiguous()
    g = torch.rand(c) + 0.5 if gamma else None
    b = torch.randn(c) if gamma else None
    eps = 1e-5
    stats = Out((S.RK_STAT_ROWS, c))
    args = S.rk_bn_finalize_args(partials=ptr(partials), tiles=partials.shape[0], c=c, rows=rows,
                                 block_m=block_m, gamma=ptr(g), beta=ptr(b), eps=eps,
                                 stats=stats.ptr)
    launch(emu, "rk_bn_finalize", ref(args), None)
    stats.check_guards("stats")
    mean = y.mean(0)
    var = y.var(0, unbiased=False)
    inv_std = 1 / torch.sqrt(var + eps)
    sc = (g.double() if gamma else 1) * inv_std
    sh = (b.double() if gamma else 0) - mean * sc
    for row, name, e in [(S.RK_STAT_MEAN, "mean", mean), (S.RK_STAT_VAR, "var", var),
                         (S.RK_STAT_INV_STD, "inv_std", inv_std), (S.RK_STAT_SCALE, "scale", sc),
                         (S.RK_STAT_SHIFT, "shift", sh)]:
        assert_close(name, stats.t[row], e)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,hw,c", [(2, 49, 24), (3, 25, 7), (1, 300, 72)])
@isolated
def test_se_squeeze(emu, n, hw, c, dtype):
    torch.manual_seed(hw * c)
    y = torch.randn(n, hw, c).to(dtype)
    scale, shift = torch.randn(c), torch.randn(c) * 0.5
    sums = Out((n, c))
    args = S.rk_se_squeeze_args(dtype=DT[dtype], y=ptr(y), n=n, hw=hw, c=c, scale=ptr(scale),
                                shift=ptr(shift), sums=sums.ptr)
    launch(emu, "rk_se_squeeze", ref(args), None)
    sums.check_guards("sums")
    expect = (y.double() * scale.double() + shift.double()).clamp_min(0).sum(1)
    assert_close("sums", sums.t, expect, 1e-5)  # fp32 sums of exactly converted inputs


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n,hw,c", [(2, 49, 24), (3, 25, 7)])
@isolated
def test_se_squeeze_backward(emu, n, hw, c, dtype):
    torch.manual_seed(hw + c)
    y = torch.randn(n, hw, c).to(dtype)
    scale, shift = torch.randn(c), torch.randn(c) * 0.5
    gs = torch.randn(n, c)
    dv = Out((n, hw, c), dtype)
    args = S.rk_se_squeeze_backward_args(dtype=DT[dtype], grad_sums=ptr(gs), y=ptr(y), n=n, hw=hw,
                                         c=c, scale=ptr(scale), shift=ptr(shift), dv=dv.ptr)
    launch(emu, "rk_se_squeeze_backward", ref(args), None)
    dv.check_guards("dv")
    mask = (y.float() * scale + shift) > 0
    expect = gs.view(n, 1, c).double() * mask
    assert_close("dv", dv.t, expect, TOL[dtype])


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


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["identity", "proj", "none"])
@pytest.mark.parametrize("rows,c", [(98, 24), (50, 13), (7, 200)])
@isolated
def test_bn_add_relu(emu, rows, c, mode, dtype):
    args, out, expect, _keep = bn_add_relu_case(dtype, rows, c, mode)
    launch(emu, "rk_bn_add_relu", ref(args), None)
    out.check_guards("out")
    assert_close("out", out.t, expect, TOL[dtype])


@isolated
def test_harness_catches_a_wrong_bn_add_relu_launch(emu):
    """Negative control: C = 24 passed as 20 leaves elements unwritten and misplaces others."""
    args, out, expect, _keep = bn_add_relu_case(torch.float32, 98, 24, "identity")
    args.c = 20
    launch(emu, "rk_bn_add_relu", ref(args), None)
    with pytest.raises(pytest.fail.Exception, match="not finite"):
        assert_close("out", out.t, expect)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("numel", [1, 1000, 4099])
@isolated
def test_relu_backward(emu, numel, dtype):
    torch.manual_seed(numel)
    grad = torch.randn(numel).to(dtype)
    out_fwd = torch.randn(numel).clamp_min(0).to(dtype)
    dz = Out((numel,), dtype)
    launch(emu, "rk_relu_backward", DT[dtype], ptr(grad), ptr(out_fwd), numel, dz.ptr, None)
    dz.check_guards("dz")
    expect = grad.double() * (out_fwd > 0)
    assert torch.equal(dz.t.double(), expect), "dz != grad * (out > 0)"


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rows,c", [(98, 24), (338, 40), (5, 3), (2000, 8)])
@isolated
def test_bn_backward_sums(emu, rows, c, dtype):
    torch.manual_seed(rows * c)
    dv = torch.randn(rows, c).to(dtype)
    y = (torch.randn(rows, c) * 2 + 3).to(dtype)
    mean = y.double().mean(0).float()
    ws_n = call(emu, "rk_bn_backward_workspace", rows, c)
    assert ws_n >= 0
    ws = Out((max(ws_n, 1),))  # NaN-filled: the kernel must not assume a zeroed workspace
    sums = Out((2, c))
    args = S.rk_bn_backward_sums_args(dtype=DT[dtype], dv=ptr(dv), y=ptr(y), rows=rows, c=c,
                                      mean=ptr(mean), workspace=ws.ptr, sums=sums.ptr)
    launch(emu, "rk_bn_backward_sums", ref(args), None)
    sums.check_guards("sums")
    ws.check_guards("workspace")
    expect = torch.stack([dv.double().sum(0), (dv.double() * (y.double() - mean.double())).sum(0)])
    assert_close("sums[0] (sum dv)", sums.t[0], expect[0])
    assert_close("sums[1] (sum dv * (y - mean))", sums.t[1], expect[1])


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("rows,c", [(98, 24), (50, 13)])
@isolated
def test_bn_backward_dy(emu, rows, c, frozen, dtype):
    """dy = dL/dy of v = BN(y) with the batch statistics (float64 autograd), or
    scale * dv with frozen (constant) statistics."""
    torch.manual_seed(rows + 3 * c)
    eps = 1e-5
    y = (torch.randn(rows, c) * 2 + 1).to(dtype)
    dv = torch.randn(rows, c).to(dtype)
    gamma, beta = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    y64 = y.double().requires_grad_(True)
    mean, var = y64.mean(0), y64.var(0, unbiased=False)
    inv_std = 1 / torch.sqrt(var + eps)
    scale = gamma * inv_std
    shift = beta - mean * scale
    stats = torch.stack([mean, inv_std, scale, shift, var]).detach().float().contiguous()
    sums = torch.stack([dv.double().sum(0),
                        (dv.double() * (y.double() - stats[0].double())).sum(0)]).float()
    if frozen:
        v = y64 * stats[S.RK_STAT_SCALE].double() + stats[S.RK_STAT_SHIFT].double()
    else:
        v = (y64 - mean) * inv_std * gamma + beta
    (expect,) = torch.autograd.grad(v, y64, dv.double())
    dy = Out((rows, c), dtype)
    args = S.rk_bn_backward_dy_args(dtype=DT[dtype], dv=ptr(dv), y=ptr(y), rows=rows, c=c,
                                    stats=ptr(stats), sums=ptr(sums), frozen=int(frozen),
                                    dy=dy.ptr)
    launch(emu, "rk_bn_backward_dy", ref(args), None)
    dy.check_guards("dy")
    assert_close("dy", dy.t, expect, TOL[dtype] * (1 if dtype == torch.float32 else 2))


# ---- conv training kernels ----

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


def run_conv_train(emu, case, dtype):
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case)
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, k) / math.sqrt(c_in // groups * k * k)
         ).to(dtype).contiguous(memory_format=torch.channels_last)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    u = gemm_input(x, parts)
    expect = F.conv2d(u, w.double(), stride=stride, padding=k // 2, groups=groups)
    expect = expect.permute(0, 2, 3, 1)  # NHWC
    ho = out_hw(h, k, stride)
    sx = nhwc_strides(x)
    swo, swi, swh, sww = w.stride()
    args = S.rk_conv_train_args(
        dtype=DT[dtype], x=ptr(x), n=n, h=h, w=h, c_in=c_in, sx_n=sx[0], sx_h=sx[1], sx_w=sx[2],
        sx_c=sx[3], weight=ptr(w), c_out=c_out, k=k, sw_o=swo, sw_i=swi, sw_h=swh, sw_w=sww,
        stride=stride, groups=groups, prologue=pro)
    plan = S.rk_conv_train_plan_t()
    launch(emu, "rk_conv_train_plan", ref(args), ref(plan))
    assert (plan.out_h, plan.out_w) == (ho, ho)
    rows = n * ho * ho
    assert plan.tiles_m == -(-rows // plan.block_m), (plan.tiles_m, plan.block_m)
    for with_partials in (True, False):
        y = Out((n, ho, ho, c_out), dtype)
        args.y = y.ptr
        partials = Out((plan.tiles_m, 2, c_out)) if with_partials else None
        args.partials = partials.ptr if with_partials else None
        launch(emu, "rk_conv_train", ref(args), None)
        y.check_guards("y")
        assert_close(f"y (partials={with_partials})", y.t, expect, TOL[dtype])
        if with_partials:  # from the fp32 accumulators, not from the rounded y
            partials.check_guards("partials")
            e = tile_stats(expect.reshape(rows, c_out), plan.block_m)
            assert_close("partials mean", partials.t[:, 0], e[:, 0])
            assert_close("partials M2", partials.t[:, 1], e[:, 1])


@pytest.mark.parametrize("case", CONV_TRAIN_CASES, ids=conv_train_ids)
@isolated
def test_conv_train_fp32(emu, case):
    run_conv_train(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16, ids=train16_ids)
@isolated
def test_conv_train_16bit(emu, case_dtype):
    run_conv_train(emu, *case_dtype)


def dgrad_reference(x, w, dy_nhwc, stride, groups, parts):
    x64 = x.double()
    k = w.shape[2]
    dy = dy_nhwc.double().permute(0, 3, 1, 2)
    du = torch.nn.grad.conv2d_input(x.shape, w.double(), dy, stride=stride, padding=k // 2,
                                    groups=groups)
    _, v, a = apply_prologue(x64, parts)
    in_scale, in_shift, relu, gate = parts
    dx = du
    if gate is not None:
        dx = dx * gate.double()[:, :, None, None]
    if relu:
        dx = dx * (v > 0)
    dgate = (du * a) if gate is not None else None  # per pixel, NCHW
    return dx.permute(0, 2, 3, 1), (dgate.permute(0, 2, 3, 1) if dgate is not None else None)


def phase_tiles_of(dgate_image, stride, block_m, tiles):
    """The dgrad's dgate partials of one image (H, W, C): its pixels phase by phase
    (ih % stride, iw % stride), each phase's pixels in row tiles of block_m, tiles per
    phase padded with zero rows."""
    out = []
    for ph in range(stride):
        for pw in range(stride):
            pixels = dgate_image[ph::stride, pw::stride].reshape(-1, dgate_image.shape[-1])
            t = row_tiles(pixels, block_m).sum(1) if pixels.shape[0] else pixels.new_zeros(0, pixels.shape[-1])
            pad = pixels.new_zeros(tiles - t.shape[0], pixels.shape[-1])
            out.append(torch.cat([t, pad]))
    return torch.cat(out)


def run_conv_dgrad(emu, case, dtype):
    """dy, the weight and x in dtype; du accumulates in fp32, dx = du * gate * relu'(v)
    is rounded once to dtype, the dgate partials stay fp32."""
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case) + 1
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, k) / math.sqrt(c_in // groups * k * k)).to(dtype)
    cin_g, cout_g = c_in // groups, c_out // groups
    # weight_t[g * cin_g + ci, kh, kw, co] = weight[g * cout_g + co, ci, kh, kw]
    w_t = (w.view(groups, cout_g, cin_g, k, k).permute(0, 2, 3, 4, 1)
           .reshape(c_in, k, k, cout_g).contiguous())
    ho = out_hw(h, k, stride)
    dy = torch.randn(n, ho, ho, c_out).to(dtype)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    exp_dx, exp_dgate = dgrad_reference(x, w, dy, stride, groups, parts)
    sx = nhwc_strides(x)
    args = S.rk_conv_dgrad_args(
        dtype=DT[dtype], dy=ptr(dy), n=n, out_h=ho, out_w=ho, c_out=c_out, weight_t=ptr(w_t),
        c_in=c_in, k=k, stride=stride, groups=groups,
        x=None if parts_name == "none" else ptr(x),  # read only with a prologue
        h=h, w=h, sx_n=sx[0], sx_h=sx[1],
        sx_w=sx[2], sx_c=sx[3], prologue=pro)
    plan = S.rk_conv_dgrad_plan_t()
    launch(emu, "rk_conv_dgrad_plan", ref(args), ref(plan))
    dx = Out((n, h, h, c_in), dtype)
    args.dx = dx.ptr
    dgp = None
    if exp_dgate is not None:
        phase_tiles = -(-(-(-h // stride)) ** 2 // plan.block_m)  # of the largest phase
        assert plan.tiles_per_image == stride * stride * phase_tiles, (plan.tiles_per_image,
                                                                        plan.block_m)
        dgp = Out((n, plan.tiles_per_image, c_in))
        args.dgate_partials = dgp.ptr
    launch(emu, "rk_conv_dgrad", ref(args), None)
    dx.check_guards("dx")
    assert_close("dx", dx.t, exp_dx, TOL[dtype])
    if dgp is not None:  # fp32 sums of the fp32 du
        dgp.check_guards("dgate_partials")
        assert_close("dgate (partials summed over t)", dgp.t.double().sum(1), exp_dgate.sum((1, 2)))
        per_tile = torch.stack([phase_tiles_of(exp_dgate[i], stride, plan.block_m, phase_tiles)
                                for i in range(n)])
        assert_close("dgate partials per tile", dgp.t, per_tile)


@pytest.mark.parametrize("case", CONV_TRAIN_CASES, ids=conv_train_ids)
@isolated
def test_conv_dgrad_fp32(emu, case):
    run_conv_dgrad(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16, ids=train16_ids)
@isolated
def test_conv_dgrad_16bit(emu, case_dtype):
    run_conv_dgrad(emu, *case_dtype)


# Many narrow groups: about 1024 CTAs in all, so each pixel split spans several K
# steps of the wgrad main loop (the small cases above get one step per split).
WGRAD_EXTRA_CASES = [(2, 4096, 7, 4096, 1, 1, 512, "all", "nhwc")]


def run_conv_wgrad(emu, case, dtype):
    """dy in dtype, u = the prologue of x rounded to dtype (as the kernel loads it);
    fp32 split partials summed in order, dw rounded once to dtype."""
    n, c_in, h, c_out, k, stride, groups, parts_name, xl = case
    seed = seed_of(case) + 2
    torch.manual_seed(seed)
    x = to_layout(torch.randn(n, c_in, h, h), xl).to(dtype)
    ho = out_hw(h, k, stride)
    dy = torch.randn(n, ho, ho, c_out).to(dtype)
    pro, parts, _keep = prologue_parts(parts_name, n, c_in, seed)
    u = gemm_input(x, parts)
    wshape = (c_out, c_in // groups, k, k)
    expect = torch.nn.grad.conv2d_weight(u, wshape, dy.double().permute(0, 3, 1, 2),
                                         stride=stride, padding=k // 2, groups=groups)
    expect = expect.permute(0, 2, 3, 1)  # (C_out, k, k, C_in / groups)
    sx = nhwc_strides(x)
    args = S.rk_conv_wgrad_args(
        dtype=DT[dtype], dy=ptr(dy), n=n, out_h=ho, out_w=ho, c_out=c_out, x=ptr(x), h=h, w=h,
        c_in=c_in, sx_n=sx[0], sx_h=sx[1], sx_w=sx[2], sx_c=sx[3], k=k, stride=stride,
        groups=groups, prologue=pro)
    ws_n = call(emu, "rk_conv_wgrad_workspace", ref(args))
    assert ws_n >= 0
    ws = Out((max(ws_n, 1),))  # NaN-filled: the kernel must not assume a zeroed workspace
    dw = Out(tuple(expect.shape), dtype)
    args.workspace = ws.ptr
    args.dw = dw.ptr
    launch(emu, "rk_conv_wgrad", ref(args), None)
    dw.check_guards("dw")
    ws.check_guards("workspace")
    assert_close("dw", dw.t, expect, TOL[dtype])


@pytest.mark.parametrize("case", CONV_TRAIN_CASES + WGRAD_EXTRA_CASES, ids=conv_train_ids)
@isolated
def test_conv_wgrad_fp32(emu, case):
    run_conv_wgrad(emu, case, torch.float32)


@pytest.mark.parametrize("case_dtype", TRAIN_16 + [(c, torch.bfloat16) for c in WGRAD_EXTRA_CASES],
                         ids=train16_ids)
@isolated
def test_conv_wgrad_16bit(emu, case_dtype):
    run_conv_wgrad(emu, *case_dtype)
