"""The CUDA emulation harness's own checks (tests/cuda_emu: CUDA sources compiled as host
C++ and run on the CPU): every .cu compiles under RK_CUDA_EMULATION; barriers, shuffles and
shared memory; mma.sync m16n8k16 from the PTX ISA's fragment tables (with a
transposed-fragment negative control); cp.async; ldmatrix; fast_div; the ctypes struct
mirrors against the C headers; negative controls (a wrong launch fails the comparison);
and the static report's model of the CUDA launches against the launchers' plan function.
The emulated launches of each op are the `cuda_emu` tests in tests/ops/test_<op>.py; see
tests/cuda_emu/harness.py for what the emulation verifies and what it cannot."""
from __future__ import annotations

import ctypes
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from cuda_emu.harness import (HALF_TYPES, TOL, S, Out, assert_close, bn_add_relu_case,
                              conv_args, emu_build, isolated, launch, needs_emulation, ref)

pytestmark = [needs_emulation, pytest.mark.cuda_emu]

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
# Negative controls and the launch plans
# ---------------------------------------------------------------------------

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


@isolated
def test_harness_catches_a_wrong_bn_add_relu_launch(emu):
    """Negative control: C = 24 passed as 20 leaves elements unwritten and misplaces others."""
    args, out, expect, _keep = bn_add_relu_case(torch.float32, 98, 24, "identity")
    args.c = 20
    launch(emu, "rk_bn_add_relu", ref(args), None)
    with pytest.raises(pytest.fail.Exception, match="not finite"):
        assert_close("out", out.t, expect)


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
