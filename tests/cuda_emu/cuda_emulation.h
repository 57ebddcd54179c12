// CPU emulation of the small part of CUDA that the kernels in csrc/cuda use, so that
// those sources compile as host C++20 with g++ (-DRK_CUDA_EMULATION, this directory
// on the include path, `-include cuda_emulation.h`; launch.cuh includes it too) and
// their kernels run on the CPU. Built and driven by tests/cuda_emu/build.py and
// tests/test_cuda_emulation.py.
//
// Execution model
// - RK_LAUNCH(grid, block, smem, stream, kernel)(args...) runs the launch
//   synchronously. Block dims must be 1-D (blockDim.y == blockDim.z == 1); grid may
//   be 3-D. The CTAs run one after another (x fastest, then y, then z); each CUDA
//   thread of a CTA has its own threadIdx (thread_local, like blockIdx / blockDim /
//   gridDim) and calls the kernel with its own copy of the arguments.
// - Two backends for a CTA's threads:
//   * default: one fiber (ucontext) per CUDA thread, all on the calling OS thread; a
//     fiber runs until it reaches a barrier or exits, a barrier opens when every
//     thread of its scope that has not exited waits at it. Deterministic; threads run
//     in index order in even CTAs and in reverse order in odd CTAs, so a missing
//     barrier between one thread's write and another's read shows up either way; a
//     barrier that not all threads reach (divergent __syncthreads) aborts with a
//     message instead of hanging.
//   * -DRK_EMU_OS_THREADS (build.py: RK_EMU_OS_THREADS=1): one std::thread per CUDA
//     thread, std::barrier for __syncthreads (exited threads arrive_and_drop), real
//     concurrency; slower.
// - __shared__ is `static`: one CTA runs at a time, so a function-local static (one
//   per template instantiation) is exactly the CTA's shared memory. Dynamic shared
//   memory (RK_DYNAMIC_SMEM) is a per-launch buffer, filled with 0xff bytes (NaN
//   as floats) before every CTA so that reads of never-written shared memory show.
// - __syncthreads() is a barrier over the CTA's threads; a thread that returns from
//   the kernel drops out of it (as exited threads do on the GPU), so early returns
//   do not deadlock. Warp = 32 consecutive threadIdx.x; the warp intrinsics
//   (__shfl*_sync, __syncwarp, __ballot/__any/__all_sync) exchange values through a
//   per-warp slot array and a per-warp barrier: every lane of the warp (that has not
//   exited) must call them, as in all kernels here; the mask is not interpreted.
// - The handful of runtime API calls the launchers make (cudaGetLastError,
//   cudaPeekAtLastError, cudaFuncSetAttribute, cudaMemsetAsync, ...) are redirected to
//   host shims; an invalid launch configuration is reported through cudaGetLastError.
// - Tensor cores: rk_emu::mma_m16n8k16<T> (T = __half or __nv_bfloat16) emulates
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, the instruction
//   igemm.cuh's mma_16816 issues (under RK_CUDA_EMULATION it calls this instead of the
//   inline PTX). A warp collective like the shuffles: every lane deposits its A / B / C
//   fragments in per-warp slots, the warp synchronizes, each lane decodes the whole
//   16x16 A, 16x8 B and 16x8 C from the 32 lanes' fragments with the PTX ISA's tables
//   ("Matrix Fragments for mma.m16n8k16 with floating point type"; quoted at the
//   function) and computes its own four D elements (inputs converted to float exactly,
//   the 16 products summed in fp32 in k order, then C added); the warp synchronizes
//   again. All 32 lanes must call it.
// - cp.async (rk_emu::cp_async_16 / cp_async_commit / cp_async_wait, what igemm.cuh's
//   cp_async_* call under RK_CUDA_EMULATION): copies deferred to the wait_group that
//   retires their group in even CTAs, landed at once in odd CTAs, so both a read before
//   the wait and a refill before the barrier show up. ldmatrix (rk_emu::ldmatrix, .x2 /
//   .x4, b16, not transposed): a warp collective like the shuffles, decoded as the PTX
//   ISA specifies (quoted at the function).
// - __trap() prints a message and aborts.
//
// What this verifies: index math, tiling, bounds / padding handling, the epilogues and
// the (deterministic) reductions of the kernels, barrier placement as far as the
// barrier semantics go, the element-wise kernels in fp16 / bf16 (host conversions of
// cuda_fp16.h / cuda_bf16.h), and the fp16 / bf16 tensor-core GEMMs: that the fragments
// the kernels load with ldmatrix for mma.sync (igemm.cuh's compute_stage) and the
// accumulator layout their epilogues assume match the ISA's m16n8k16 layout, and the
// cp.async pipeline's waits and barriers.
// What it cannot: the tensor core's own arithmetic (the emulated D is the in-order fp32
// sum of the exact products; the hardware's internal rounding and summation order are
// not modelled, so it is not bit-exact to a GPU); the GPU memory model (races that a
// barrier does not order, missing __syncwarp on real hardware, the real
// warp-synchronous behaviour), occupancy / register / shared memory limits, and speed.
#ifndef RK_CUDA_EMULATION_H_
#define RK_CUDA_EMULATION_H_

#ifndef RK_CUDA_EMULATION
#define RK_CUDA_EMULATION 1
#endif

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef RK_EMU_OS_THREADS
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#endif

// ---------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static
#ifndef __restrict__
#define __restrict__ __restrict
#endif

// ---------------------------------------------------------------------------
// Built-in variables (per CPU thread)
// ---------------------------------------------------------------------------
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace rk_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "rk_cuda_emulation: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}

inline unsigned lane_id() { return threadIdx.x & 31u; }

// Checks a launch configuration; false (and the launch error set) when invalid.
inline bool valid_launch(dim3 grid, dim3 block, size_t smem) {
  if (block.y != 1 || block.z != 1) fail("only 1-D thread blocks are emulated");
  if (block.x == 0 || block.x > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return false;
  }
  if (smem > 227 * 1024) {
    last_error() = cudaErrorInvalidValue;
    return false;
  }
  return true;
}

inline uint3 block_index(uint64_t b, dim3 grid) {
  return uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
               static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
}

// One lane's operands of an emulated mma.sync (see mma_m16n8k16 below).
struct MmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

struct DynSmem {  // 128-byte aligned, poisoned (0xff) before every CTA
  std::unique_ptr<unsigned char[]> buf;
  unsigned char* p = nullptr;
  size_t bytes = 0;
  explicit DynSmem(size_t n) : buf(new unsigned char[n + 128]), bytes(n) {
    p = buf.get() + (128 - reinterpret_cast<uintptr_t>(buf.get()) % 128) % 128;
  }
  void poison() {
    if (bytes) std::memset(p, 0xff, bytes);
  }
};

// One CUDA thread's cp.async copies: the open group (issued since the last commit) and
// the committed groups, oldest first. A copy lands when a wait_group retires its group.
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: 16 zero bytes
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> committed;
};

#ifdef RK_EMU_OS_THREADS
// ---- Backend: one std::thread per CUDA thread (real concurrency) ----
struct Cta {
  unsigned threads = 0;
  std::optional<std::barrier<>> bar;                      // __syncthreads
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;  // per warp
  std::vector<uint64_t> slots;                            // 32 per warp
  std::vector<MmaLane> mma;                               // 32 per warp (mma.sync)
  unsigned char* dyn = nullptr;                           // dynamic shared memory
  std::vector<AsyncCopies> async;                         // per thread (cp.async)
  bool eager_copies = false;                              // this CTA lands cp.async at once
};

inline thread_local Cta* tls_cta = nullptr;

inline Cta& cta() {
  if (tls_cta == nullptr) fail("device function called outside an emulated kernel");
  return *tls_cta;
}

inline void syncthreads() { cta().bar->arrive_and_wait(); }
inline void warp_sync() { cta().warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }

// Runs body on every thread of every CTA of the grid.
inline void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (!valid_launch(grid, block, smem)) return;
  const unsigned nt = block.x;
  const unsigned nwarps = (nt + 31) / 32;
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  Cta c;
  c.threads = nt;
  c.warp_bar.resize(nwarps);
  c.slots.assign(static_cast<size_t>(nwarps) * 32, 0);
  c.mma.assign(static_cast<size_t>(nwarps) * 32, MmaLane{});
  DynSmem dyn(smem);
  c.dyn = dyn.p;
  // Between CTAs: all threads meet here; the completion (one thread, the others
  // blocked) makes fresh barriers for the next CTA and poisons its dynamic smem.
  uint64_t seq = 0;
  auto next_cta = [&c, &dyn, &seq, nt, nwarps]() noexcept {
    c.bar.reset();
    c.bar.emplace(nt);
    for (unsigned w = 0; w < nwarps; ++w)
      c.warp_bar[w] = std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w));
    dyn.poison();
    c.async.assign(nt, AsyncCopies{});
    c.eager_copies = (seq++ & 1) != 0;
  };
  std::barrier<decltype(next_cta)> between(nt, next_cta);
  auto worker = [&](unsigned t) {
    tls_cta = &c;
    threadIdx = uint3{t, 0, 0};
    blockDim = block;
    gridDim = grid;
    for (uint64_t b = 0; b < nblocks; ++b) {
      between.arrive_and_wait();
      blockIdx = block_index(b, grid);
      body();
      c.bar->arrive_and_drop();  // an exited thread no longer counts at the barriers
      c.warp_bar[t >> 5]->arrive_and_drop();
    }
    tls_cta = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
}

#else
// ---- Backend (default): one fiber (ucontext) per CUDA thread, all on the calling
// thread. A fiber runs until it reaches a barrier or exits; a barrier opens when every
// fiber of its scope that has not exited waits at it. Deterministic, and fast enough
// for grids of thousands of CTAs. The fibers run in thread order in even CTAs and in
// reverse order in odd ones, so a missing barrier between a write and another thread's
// read shows up whichever of the two threads comes first. In CTAs 2 and 3 of every 4,
// one warp runs ahead: of the warps whose warp barrier (shuffle, mma, ldmatrix) is
// complete only the lowest is released, so it runs on to its next __syncthreads while
// the others wait (the warps otherwise advance in lockstep, collective by collective,
// which would hide a missing __syncthreads between warps).
enum FiberState : int { kRun = 0, kAtCta = 1, kAtWarp = 2, kDone = 3 };

struct Cta {
  unsigned threads = 0;
  std::vector<ucontext_t> ctx;
  std::vector<int> state;
  ucontext_t sched;
  unsigned cur = 0;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<MmaLane> mma;     // 32 per warp (mma.sync fragments)
  unsigned char* dyn = nullptr;
  std::vector<AsyncCopies> async;  // per thread (cp.async)
  bool eager_copies = false;       // this CTA lands cp.async at once
  const std::function<void()>* body = nullptr;
};

inline thread_local Cta* tls_cta = nullptr;

inline Cta& cta() {
  if (tls_cta == nullptr) fail("device function called outside an emulated kernel");
  return *tls_cta;
}

inline void block_on(int st) {
  Cta& c = cta();
  const unsigned t = c.cur;
  c.state[t] = st;
  swapcontext(&c.ctx[t], &c.sched);
}

inline void syncthreads() { block_on(kAtCta); }
inline void warp_sync() { block_on(kAtWarp); }

inline void fiber_entry() {
  Cta& c = *tls_cta;
  (*c.body)();
  c.state[c.cur] = kDone;  // returns to c.sched through uc_link
}

constexpr size_t kFiberStack = 256 * 1024;

inline void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (!valid_launch(grid, block, smem)) return;
  const unsigned nt = block.x;
  const unsigned nwarps = (nt + 31) / 32;
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t slot = kFiberStack + page;  // a PROT_NONE guard page below each stack
  void* mem = mmap(nullptr, slot * nt, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) fail("cannot map the fiber stacks");
  auto* stacks = static_cast<unsigned char*>(mem);
  for (unsigned t = 0; t < nt; ++t) mprotect(stacks + t * slot, page, PROT_NONE);
  Cta c;
  c.threads = nt;
  c.ctx.resize(nt);
  c.state.assign(nt, kDone);
  c.slots.assign(static_cast<size_t>(nwarps) * 32, 0);
  c.mma.assign(static_cast<size_t>(nwarps) * 32, MmaLane{});
  c.body = &body;
  DynSmem dyn(smem);
  c.dyn = dyn.p;
  Cta* const saved = tls_cta;
  tls_cta = &c;
  blockDim = block;
  gridDim = grid;
  for (uint64_t b = 0; b < nblocks; ++b) {
    blockIdx = block_index(b, grid);
    dyn.poison();
    c.async.assign(nt, AsyncCopies{});
    c.eager_copies = (b & 1) != 0;
    for (unsigned t = 0; t < nt; ++t) {
      getcontext(&c.ctx[t]);
      c.ctx[t].uc_stack.ss_sp = stacks + t * slot + page;
      c.ctx[t].uc_stack.ss_size = kFiberStack;
      c.ctx[t].uc_link = &c.sched;
      makecontext(&c.ctx[t], fiber_entry, 0);
      c.state[t] = kRun;
    }
    const bool reverse = (b & 1) != 0;
    const bool one_warp_ahead = (b & 2) != 0;
    for (;;) {
      for (unsigned i = 0; i < nt; ++i) {
        const unsigned t = reverse ? nt - 1 - i : i;
        if (c.state[t] != kRun) continue;
        c.cur = t;
        threadIdx = uint3{t, 0, 0};
        swapcontext(&c.sched, &c.ctx[t]);
      }
      // Every fiber is now blocked or done: open the barriers that are complete.
      bool released = false, live = false, all_cta = true;
      for (unsigned w = 0; w < nwarps; ++w) {
        const unsigned t0 = 32 * w, t1 = std::min(nt, t0 + 32);
        bool any = false, all = true;
        for (unsigned t = t0; t < t1; ++t) {
          if (c.state[t] == kDone) continue;
          live = true;
          if (c.state[t] == kAtWarp) any = true; else all = false;
          if (c.state[t] != kAtCta) all_cta = false;
        }
        if (any && all && !(one_warp_ahead && released)) {
          for (unsigned t = t0; t < t1; ++t)
            if (c.state[t] == kAtWarp) c.state[t] = kRun;
          released = true;
        }
      }
      if (!live) break;
      if (!released && all_cta) {
        for (unsigned t = 0; t < nt; ++t)
          if (c.state[t] == kAtCta) c.state[t] = kRun;
        released = true;
      }
      if (!released) {
        threadIdx = uint3{0, 0, 0};
        fail("deadlock: the threads wait at different barriers (__syncthreads in divergent "
             "code, or a warp collective that not every lane of the warp reaches)");
      }
    }
  }
  tls_cta = saved;
  munmap(mem, slot * nt);
}
#endif

inline unsigned warp_lanes() {
  const unsigned w0 = threadIdx.x & ~31u;
  return std::min(32u, cta().threads - w0);
}

// Every lane publishes v, then reads lane src's (own value when src is out of range).
template <typename T>
inline T exchange(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "shuffled type must be trivially copyable, at most 8 bytes");
  Cta& c = cta();
  uint64_t* slots = c.slots.data() + (threadIdx.x & ~31u);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane_id()] = bits;
  warp_sync();
  T out = v;
  if (src >= 0 && static_cast<unsigned>(src) < warp_lanes()) std::memcpy(&out, &slots[src], sizeof(T));
  warp_sync();  // nobody overwrites a slot before all have read
  return out;
}

inline int seg_base(int width) {
  return static_cast<int>(lane_id()) / width * width;
}

inline void* dynamic_smem() { return cta().dyn; }

// ---- Tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 ----
//
// D (16x8, fp32) = A (16x16) * B (16x8) + C (16x8, fp32), a warp collective: every lane
// of the warp holds a fragment of each matrix. The fragments are decoded as the PTX ISA
// specifies them, section "Matrix Fragments for mma.m16n8k16 with floating point type"
// (9.7.14.5.8 in PTX ISA 9.2; 9.7.15.5.8 in some releases; Figures 79, 81 and 83:
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float),
// with groupID = %laneid >> 2 and threadID_in_group = %laneid % 4:
//   A, .f16 / .bf16: four .f16x2 registers holding a0..a7 (low to high),
//     row = groupID for ai with 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise
//     col = threadID_in_group * 2 + (i & 0x1)      for ai with i < 4
//           threadID_in_group * 2 + (i & 0x1) + 8  for ai with i >= 4
//   B, .f16 / .bf16: two .f16x2 registers holding b0..b3 (low to high),
//     row = threadID_in_group * 2 + (i & 0x1)      for bi with i < 2
//           threadID_in_group * 2 + (i & 0x1) + 8  for bi with i >= 2
//     col = groupID
//   C / D, .f32: four .f32 registers c0..c3,
//     row = groupID for ci with i < 2, groupID + 8 for i >= 2
//     col = threadID_in_group * 2 + (i & 0x1)
// "Elements (low to high)": element 2r of the list sits in the lower 16 bits of
// register r, element 2r + 1 in the upper 16 bits.
//
// Every lane deposits its A / B / C fragments in the warp's slots, the warp
// synchronizes, each lane gathers the whole A, B and C from the 32 fragments and
// computes its own four D elements (the 16-bit inputs converted to float exactly, the
// 16 products summed in fp32 in k order, then C added), and the warp synchronizes again
// before a slot may be overwritten. The real tensor core's internal rounding and
// summation order are not modelled (they differ in the last bits of fp32).
namespace mma_detail {

inline int a_row(int lane, int i) { return (lane >> 2) + ((i == 2 || i == 3 || i >= 6) ? 8 : 0); }
inline int a_col(int lane, int i) { return (lane % 4) * 2 + (i & 0x1) + (i >= 4 ? 8 : 0); }
inline int b_row(int lane, int i) { return (lane % 4) * 2 + (i & 0x1) + (i >= 2 ? 8 : 0); }
inline int b_col(int lane, int /*i*/) { return lane >> 2; }
inline int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
inline int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 0x1); }

// Element i of a list packed two per .b32 register, lower index in the lower half.
inline uint16_t packed(const uint32_t* regs, int i) {
  return static_cast<uint16_t>(regs[i >> 1] >> (16 * (i & 1)));
}

template <typename T>
inline float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma.m16n8k16 emulated for f16 / bf16 only");
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
}

}  // namespace mma_detail

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace mma_detail;
  Cta& c = cta();
  if (warp_lanes() != 32) fail("mma.sync needs a full warp of 32 threads");
  MmaLane* lanes = c.mma.data() + (threadIdx.x & ~31u);
  MmaLane& mine = lanes[lane_id()];
  for (int r = 0; r < 4; ++r) mine.a[r] = a[r];
  for (int r = 0; r < 2; ++r) mine.b[r] = b[r];
  for (int r = 0; r < 4; ++r) mine.c[r] = d[r];
  warp_sync();
  float A[16][16], B[16][8], C[16][8];
  bool seen_a[16][16] = {}, seen_b[16][8] = {}, seen_c[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      const int r = a_row(l, i), k = a_col(l, i);
      if (seen_a[r][k]) fail("mma emulation: A element decoded twice");
      seen_a[r][k] = true;
      A[r][k] = to_float<T>(packed(lanes[l].a, i));
    }
    for (int i = 0; i < 4; ++i) {
      const int k = b_row(l, i), n = b_col(l, i);
      if (seen_b[k][n]) fail("mma emulation: B element decoded twice");
      seen_b[k][n] = true;
      B[k][n] = to_float<T>(packed(lanes[l].b, i));
    }
    for (int i = 0; i < 4; ++i) {
      const int r = c_row(l, i), n = c_col(l, i);
      if (seen_c[r][n]) fail("mma emulation: C element decoded twice");
      seen_c[r][n] = true;
      C[r][n] = lanes[l].c[i];
    }
  }
  const int me = static_cast<int>(lane_id());
  for (int i = 0; i < 4; ++i) {
    const int r = c_row(me, i), n = c_col(me, i);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][n];
    d[i] = s + C[r][n];
  }
  warp_sync();  // nobody overwrites a slot before all have read
}

// ---- cp.async (cp.async.cg.shared.global, 16 bytes, zero fill) and its groups ----
//
// The copies are deferred: in even CTAs (in launch order) a copy lands only when
// cp.async.wait_group retires its group (so reading shared memory before the wait sees
// stale or poisoned data), in odd CTAs it lands at once (so refilling a buffer before
// every thread has finished reading it, i.e. a missing barrier, overwrites data still in
// use). Both addresses must be 16-byte aligned.
inline bool eager_copies() { return cta().eager_copies; }

inline void land(const AsyncCopy& cp) {
  if (cp.src != nullptr)
    std::memcpy(cp.dst, cp.src, 16);
  else
    std::memset(cp.dst, 0, 16);
}

inline void cp_async_16(void* dst, const void* src, bool fill) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      (fill && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fail("cp.async: a 16-byte copy needs 16-byte aligned addresses");
  const AsyncCopy cp{dst, fill ? src : nullptr};
  if (eager_copies())
    land(cp);
  else
    cta().async[threadIdx.x].open.push_back(cp);
}

inline void cp_async_commit() {
  AsyncCopies& a = cta().async[threadIdx.x];
  a.committed.push_back(std::move(a.open));
  a.open.clear();
}

inline void cp_async_wait(int pending) {
  AsyncCopies& a = cta().async[threadIdx.x];
  while (a.committed.size() > static_cast<size_t>(pending)) {
    for (const AsyncCopy& cp : a.committed.front()) land(cp);
    a.committed.pop_front();
  }
}

// ---- ldmatrix.sync.aligned.m8n8.{x2,x4}.shared.b16 (not transposed) ----
//
// PTX ISA, "Warp-level matrix load instruction: ldmatrix": for .x1/.x2/.x4, threads
// 0-7 / 0-15 / 0-31 supply the addresses of the 8 rows (16 bytes each) of matrix 0, 1,
// 2, 3 in turn; in each matrix, lane l receives the two 16-bit elements 2 (l % 4),
// 2 (l % 4) + 1 of row l / 4, in destination register j for matrix j. A warp
// collective: all 32 lanes must call it. Row addresses must be 16-byte aligned.
template <size_t R>
inline void ldmatrix(uint32_t (&r)[R], int matrices, const void* row) {
  Cta& c = cta();
  if (warp_lanes() != 32) fail("ldmatrix needs a full warp of 32 threads");
  if (matrices != static_cast<int>(R)) fail("ldmatrix: one register per matrix");
  uint64_t* slots = c.slots.data() + (threadIdx.x & ~31u);
  slots[lane_id()] = reinterpret_cast<uintptr_t>(row);
  warp_sync();
  const unsigned me = lane_id();
  for (int j = 0; j < matrices; ++j) {
    const uint64_t addr = slots[j * 8 + me / 4];
    if (addr % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
    std::memcpy(&r[j], reinterpret_cast<const unsigned char*>(addr) + 4 * (me % 4), 4);
  }
  warp_sync();  // nobody overwrites a slot before all have read
}

template <typename K>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  K kernel;
  template <typename... A>
  void operator()(A&&... args) const {
    // The kernel's arguments, copied once like a launch's parameter buffer; every
    // thread calls the kernel, whose by-value parameters copy them again.
    auto packed = std::make_tuple(std::decay_t<A>(std::forward<A>(args))...);
    K k = kernel;
    run_grid(grid, block, smem, [&]() { std::apply(k, packed); });
  }
};

template <typename S, typename K>
inline Launcher<K> make_launcher(dim3 grid, dim3 block, size_t smem, S /*stream*/, K kernel) {
  return Launcher<K>{grid, block, smem, kernel};
}

// ---- runtime API shims ----
inline cudaError_t get_last_error() {
  const cudaError_t e = last_error();
  last_error() = cudaSuccess;
  return e;
}
inline cudaError_t peek_at_last_error() { return last_error(); }
template <typename... A>
inline cudaError_t success(A&&...) { return cudaSuccess; }
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t = 0) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t memcpy_async(void* d, const void* s, size_t n, cudaMemcpyKind = cudaMemcpyDefault,
                                cudaStream_t = 0) {
  if (n) std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
// Device attributes of an H100 SXM (what a launcher might size its grid by).
inline cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    default: *v = 0; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename K>
inline cudaError_t occupancy_max_blocks(int* n, K, int, size_t, unsigned = 0) {
  *n = 1;
  return cudaSuccess;
}

}  // namespace rk_emu

// ---------------------------------------------------------------------------
// Launch and shared memory
// ---------------------------------------------------------------------------
#undef RK_LAUNCH
#undef RK_DYNAMIC_SMEM
#define RK_LAUNCH(grid, block, smem, stream, ...) \
  ::rk_emu::make_launcher(dim3(grid), dim3(block), static_cast<size_t>(smem), (stream), __VA_ARGS__)
#define RK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::rk_emu::dynamic_smem())

// Runtime API: the real functions need a GPU (and libcudart).
#undef cudaGetLastError
#undef cudaPeekAtLastError
#undef cudaFuncSetAttribute
#undef cudaFuncSetCacheConfig
#undef cudaMemsetAsync
#undef cudaMemcpyAsync
#undef cudaMemset
#undef cudaMemcpy
#undef cudaGetDevice
#undef cudaDeviceGetAttribute
#undef cudaStreamSynchronize
#undef cudaDeviceSynchronize
#undef cudaOccupancyMaxActiveBlocksPerMultiprocessor
#define cudaGetLastError ::rk_emu::get_last_error
#define cudaPeekAtLastError ::rk_emu::peek_at_last_error
#define cudaFuncSetAttribute ::rk_emu::success
#define cudaFuncSetCacheConfig ::rk_emu::success
#define cudaMemsetAsync ::rk_emu::memset_async
#define cudaMemcpyAsync ::rk_emu::memcpy_async
#define cudaMemset ::rk_emu::memset_async
#define cudaMemcpy ::rk_emu::memcpy_async
#define cudaGetDevice ::rk_emu::get_device
#define cudaDeviceGetAttribute ::rk_emu::device_get_attribute
#define cudaStreamSynchronize ::rk_emu::success
#define cudaDeviceSynchronize ::rk_emu::success
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::rk_emu::occupancy_max_blocks

// ---------------------------------------------------------------------------
// Device functions
// ---------------------------------------------------------------------------
inline void __syncthreads() { ::rk_emu::syncthreads(); }
inline int __syncthreads_count(int p) {
  static std::atomic<int> count{0};
  static std::atomic<int> result{0};
  if (threadIdx.x == 0) count = 0;
  ::rk_emu::syncthreads();
  if (p) ++count;
  ::rk_emu::syncthreads();
  if (threadIdx.x == 0) result = count.load();
  ::rk_emu::syncthreads();
  return result.load();
}
inline void __syncwarp(unsigned = 0xffffffffu) { ::rk_emu::warp_sync(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { ::rk_emu::fail("__trap() called"); }
inline unsigned __activemask() { return 0xffffffffu; }

template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return ::rk_emu::exchange(v, ::rk_emu::seg_base(width) + (src % width + width) % width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(::rk_emu::lane_id());
  const int src = lane ^ lane_mask;
  return ::rk_emu::exchange(v, src / width == lane / width ? src : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(::rk_emu::lane_id());
  const int src = lane + static_cast<int>(delta);
  return ::rk_emu::exchange(v, src < ::rk_emu::seg_base(width) + width ? src : lane);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(::rk_emu::lane_id());
  const int src = lane - static_cast<int>(delta);
  return ::rk_emu::exchange(v, src >= ::rk_emu::seg_base(width) ? src : lane);
}
inline unsigned __ballot_sync(unsigned, int p) {
  unsigned bits = 0;
  const unsigned lanes = ::rk_emu::warp_lanes();
  // Gather every lane's predicate (32 exchanges keep this simple and exact).
  for (unsigned l = 0; l < lanes; ++l)
    if (::rk_emu::exchange(static_cast<int>(p != 0), static_cast<int>(l))) bits |= 1u << l;
  return bits;
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) {
  const unsigned lanes = ::rk_emu::warp_lanes();
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  return __ballot_sync(m, p) == full;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

// atomics (the kernels here are meant to use none; provided for completeness)
inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lock(atomic_mutex());
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  std::lock_guard<std::mutex> lock(atomic_mutex());
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}

// integer / float min and max as CUDA's math headers overload them (functions, not
// macros: std::min / std::max are untouched)
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// fast-math intrinsics, computed exactly (the GPU's are approximations)
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }

#endif  // RK_CUDA_EMULATION_H_
