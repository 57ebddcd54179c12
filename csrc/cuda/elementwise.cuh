// The building blocks of the per-channel CUDA kernels around the convs (bn_stats.cu,
// se_squeeze.cu, bn_add_relu.cu): activations are dense NHWC viewed as (rows, C);
// per-channel vectors and every accumulation are fp32, each output is rounded once.
//
//   merge kernels        CTA per 32-channel chunk (lane = channel), up to 32 warps
//                        ("thread rows"); each row reduces its items sequentially, then
//                        warp 0 merges the rows in row order (merge_threads()).
//   elementwise kernels  grid-stride over the dense (rows, C) elements (grid_stride()),
//                        int64 indices, the channel advanced incrementally (no
//                        division per element), kUnroll elements loaded per thread
//                        before any is stored (memory-level parallelism).
//
// Determinism: no atomics; every sum runs in an order fixed by the shape (a thread's
// sequential partial, then shared-memory partials added in index order), never by
// scheduling: results are bit-identical run to run.
//
// Rounding: products that the CPU ops (csrc/cpu) compute as a separate multiply and
// add go through mul_rn(), so nvcc does not contract them into an FMA: the elementwise
// outputs (and e.g. the relu masks of y * scale + shift) round as the CPU ops do.
//
// Only __syncthreads, static shared arrays (the reductions go through shared memory:
// no shuffles, no atomics) and plain math are used, with 1-D blocks, and every launch
// goes through RK_LAUNCH, so the CPU emulation harness (tests/cuda_emu) runs these
// kernels unchanged.
#ifndef REGNET_KERNELS_CUDA_ELEMENTWISE_CUH_
#define REGNET_KERNELS_CUDA_ELEMENTWISE_CUH_

#include "dtypes.cuh"

namespace rk {

constexpr int kLanes = 32;                 // channels per warp (one per lane)
constexpr int kMaxRows = 32;               // thread rows (warps) of the merge kernels
constexpr int kElemThreads = 256;          // elementwise kernels
constexpr int kUnroll = 4;                 // elements in flight per thread
constexpr int64_t kMaxElemBlocks = 16384;  // grid-stride beyond this
constexpr int64_t kMaxGridY = 65535;

// a * b rounded on its own: never contracted with a following add into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// relu that propagates NaN like torch.relu / std::max(v, 0.f).
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

// c + step modulo C, for 0 <= c, step < C (no int32 overflow for any C).
__device__ __forceinline__ int advance_channel(int c, int step, int C) {
  return c >= C - step ? c - (C - step) : c + step;
}

// ---------------------------------------------------------------------------
// Grid-stride driver of the elementwise kernels over total dense (., C) elements:
// op.load(i, c) reads element i (channel c) into an Op::In, op.store(i, c, in)
// computes and writes it; kUnroll loads are issued before the stores.
// ---------------------------------------------------------------------------
template <class Op>
__device__ __forceinline__ void grid_stride(const Op& op, int64_t total, int C) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int step = static_cast<int>(stride % C);
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int c = static_cast<int>(i % C);
#pragma unroll 1  // kUnroll is the unrolling: more only costs registers
  for (; i < total; i += kUnroll * stride) {
    int64_t idx[kUnroll];
    int ch[kUnroll];
    typename Op::In in[kUnroll];
    idx[0] = i;
    ch[0] = c;
#pragma unroll
    for (int k = 1; k < kUnroll; ++k) {
      idx[k] = idx[k - 1] + stride;
      ch[k] = advance_channel(ch[k - 1], step, C);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (idx[k] < total) in[k] = op.load(idx[k], ch[k]);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (idx[k] < total) op.store(idx[k], ch[k], in[k]);
    c = advance_channel(ch[kUnroll - 1], step, C);
  }
}

inline unsigned elem_blocks(int64_t total) {
  const int64_t per_block = static_cast<int64_t>(kElemThreads) * kUnroll;
  const int64_t blocks = (total + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxElemBlocks ? blocks : kMaxElemBlocks);
}

// Thread rows (warps) of a merge kernel for `items` items per column: no idle rows.
inline int merge_threads(int64_t items) {
  const int64_t rows = items < kMaxRows ? (items > 0 ? items : 1) : kMaxRows;
  return static_cast<int>(rows) * kLanes;
}

// 32-channel chunks of c channels (the merge kernels' CTAs per column).
inline unsigned channel_chunks(int64_t c) { return static_cast<unsigned>((c + kLanes - 1) / kLanes); }

// rows * c elements addressable with int64 and a channel count that fits an int.
inline bool bad_matrix(int64_t rows, int64_t c) {
  return rows < 0 || c < 0 || c > kInt32Max || (c > 0 && rows > INT64_MAX / c);
}

}  // namespace rk

#endif  // REGNET_KERNELS_CUDA_ELEMENTWISE_CUH_
