// The BatchNorm pieces of conv_bn_train (launchers.h, "Training ops"): the batch
// statistics from the conv's per-tile partials (forward) and the BN backward's
// per-channel sums and dy (backward). Building blocks and conventions: elementwise.cuh.
//
//   bn_finalize          merge kernel over the conv's row tiles: thread row r
//                        Chan-merges tiles r, r + R, ... in order, then warp 0 merges
//                        the rows' (n, mean, M2) in row order.
//   bn_backward_sums     1. CTA per (1024-row chunk, 32-channel chunk): 8 warps over
//                           the chunk's rows, rows of the warps added in warp order,
//                           one (sum dv, sum dv * (y - mean)) partial per chunk in the
//                           workspace; 2. the chunks reduced like bn_finalize's tiles.
//   bn_backward_dy       elementwise.
#include "elementwise.cuh"
#include "launchers.h"

namespace rk {
namespace {

constexpr int kSumsWarps = 8;              // bn_backward_sums, first kernel
constexpr int64_t kSumsChunkRows = 1024;   // rows per workspace partial

// Chan's parallel update: merge (n_b, mean_b, m2_b) into (n, mean, m2), in the
// CPU's order of operations (batch_mean_var in csrc/cpu/conv_bn_train.cpp).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float n_b,
                                           float mean_b, float m2_b) {
  if (n_b == 0.0f) return;  // nothing to merge (and no 0 / 0)
  const float n_ab = n + n_b;
  const float w_b = n_b / n_ab, w_m2 = mul_rn(n, n_b) / n_ab;
  const float delta = mean_b - mean;
  mean = mean + mul_rn(delta, w_b);
  m2 = m2 + (m2_b + mul_rn(mul_rn(delta, delta), w_m2));
  n = n_ab;
}

// ---------------------------------------------------------------------------
// bn_finalize
// ---------------------------------------------------------------------------
struct FinalizeParams {
  const float* partials;  // (tiles, 2, C)
  int64_t tiles, rows, block_m;
  int c;
  const float* gamma;
  const float* beta;
  float eps;
  float* stats;           // (5, C)
};

__global__ void __launch_bounds__(kMaxRows * kLanes) bn_finalize_kernel(const FinalizeParams p) {
  __shared__ float s_n[kMaxRows];
  __shared__ float s_mean[kMaxRows][kLanes];
  __shared__ float s_m2[kMaxRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int nrows = blockDim.x / kLanes;
  const int c = blockIdx.x * kLanes + lane;
  const bool ok = c < p.c;
  const int64_t C = p.c;

  // This thread row's tiles, in order.
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int64_t t = row; t < p.tiles; t += nrows) {
    const int64_t left = p.rows - t * p.block_m;
    const float n_t = static_cast<float>(left < p.block_m ? left : p.block_m);
    float mean_t = 0.0f, m2_t = 0.0f;
    if (ok) {
      const float* src = p.partials + t * 2 * C + c;
      mean_t = src[0];
      m2_t = src[C];
    }
    chan_merge(n, mean, m2, n_t, mean_t, m2_t);
  }
  if (lane == 0) s_n[row] = n;
  s_mean[row][lane] = mean;
  s_m2[row][lane] = m2;
  __syncthreads();
  if (row != 0 || !ok) return;

  // The thread rows in row order (row 0's state is in registers).
  for (int r = 1; r < nrows; ++r) chan_merge(n, mean, m2, s_n[r], s_mean[r][lane], s_m2[r][lane]);
  const float var = m2 / static_cast<float>(p.rows);
  const float inv_std = 1.0f / sqrtf(var + p.eps);
  const float scale = p.gamma != nullptr ? mul_rn(p.gamma[c], inv_std) : inv_std;
  const float beta = p.beta != nullptr ? p.beta[c] : 0.0f;
  p.stats[RK_STAT_MEAN * C + c] = mean;
  p.stats[RK_STAT_INV_STD * C + c] = inv_std;
  p.stats[RK_STAT_SCALE * C + c] = scale;
  p.stats[RK_STAT_SHIFT * C + c] = beta - mul_rn(mean, scale);
  p.stats[RK_STAT_VAR * C + c] = var;
}

// ---------------------------------------------------------------------------
// BN backward
// ---------------------------------------------------------------------------
template <typename T>
struct BackwardSumsParams {
  const T* dv;            // (rows, C)
  const T* y;
  int64_t rows;
  int c;
  const float* mean;
  float* workspace;       // (chunks, 2, C)
  int64_t chunks;
  float* sums;            // (2, C)
};

// grid (row chunk, channel chunk): one partial per chunk of kSumsChunkRows rows.
template <typename T>
__global__ void __launch_bounds__(kSumsWarps * kLanes)
    bn_backward_partials_kernel(const BackwardSumsParams<T> p) {
  __shared__ float red0[kSumsWarps][kLanes];
  __shared__ float red1[kSumsWarps][kLanes];
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  const int c = blockIdx.y * kLanes + lane;
  const bool ok = c < p.c;
  const int64_t C = p.c;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSumsChunkRows;
  const int64_t r1 = r0 + kSumsChunkRows < p.rows ? r0 + kSumsChunkRows : p.rows;

  float s0 = 0.0f, s1 = 0.0f;
  if (ok) {
    const float m = p.mean[c];
    const int64_t off = (r0 + warp) * C + c, step = kSumsWarps * C;
    const T* g = p.dv + off;
    const T* v = p.y + off;
#pragma unroll 4
    for (int64_t r = r0 + warp; r < r1; r += kSumsWarps, g += step, v += step) {
      const float gf = to_f32(*g);
      s0 += gf;
      s1 = fmaf(gf, to_f32(*v) - m, s1);  // centered: no cancellation against mean * sum dv
    }
  }
  red0[warp][lane] = s0;
  red1[warp][lane] = s1;
  __syncthreads();
  if (warp != 0 || !ok) return;
  for (int w = 1; w < kSumsWarps; ++w) {
    s0 += red0[w][lane];
    s1 += red1[w][lane];
  }
  float* dst = p.workspace + static_cast<int64_t>(blockIdx.x) * 2 * C + c;
  dst[0] = s0;
  dst[C] = s1;
}

// CTA per 32-channel chunk: thread row r adds chunks r, r + R, ... in order, then
// warp 0 adds the rows in order. chunks == 0 writes zeros.
template <typename T>
__global__ void __launch_bounds__(kMaxRows * kLanes)
    bn_backward_reduce_kernel(const BackwardSumsParams<T> p) {
  __shared__ float red0[kMaxRows][kLanes];
  __shared__ float red1[kMaxRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int nrows = blockDim.x / kLanes;
  const int c = blockIdx.x * kLanes + lane;
  const bool ok = c < p.c;
  const int64_t C = p.c;

  float s0 = 0.0f, s1 = 0.0f;
  if (ok) {
    for (int64_t k = row; k < p.chunks; k += nrows) {
      const float* src = p.workspace + k * 2 * C + c;
      s0 += src[0];
      s1 += src[C];
    }
  }
  red0[row][lane] = s0;
  red1[row][lane] = s1;
  __syncthreads();
  if (row != 0 || !ok) return;
  for (int r = 1; r < nrows; ++r) {
    s0 += red0[r][lane];
    s1 += red1[r][lane];
  }
  p.sums[c] = s0;
  p.sums[C + c] = s1;
}

// dy = a * dv + b * (y - mean) + k, the per-channel a, b, k computed as the CPU
// does (conv_bn_train_backward), from the stats rows and the sums.
template <typename T, bool kFrozen>
struct BackwardDyOp {
  struct In {
    float g, y;
  };
  const T* dv;
  const T* y;
  const float* stats;     // (5, C)
  const float* sums;      // (2, C); unused when frozen
  int c;
  float inv_rows;
  T* dy;
  __device__ __forceinline__ In load(int64_t i, int) const {
    return In{to_f32(dv[i]), kFrozen ? 0.0f : to_f32(y[i])};
  }
  __device__ __forceinline__ void store(int64_t i, int ch, const In& in) const {
    const int64_t C = c;
    const float a = stats[RK_STAT_SCALE * C + ch];
    if (kFrozen) {  // running statistics are constants: b = k = 0
      dy[i] = from_f32<T>(mul_rn(a, in.g));
      return;
    }
    const float mean = stats[RK_STAT_MEAN * C + ch];
    const float inv_std = stats[RK_STAT_INV_STD * C + ch];
    const float d_gamma = mul_rn(sums[C + ch], inv_std);
    const float d_beta = sums[ch];
    const float b = mul_rn(mul_rn(mul_rn(-a, inv_std), d_gamma), inv_rows);
    const float k = mul_rn(mul_rn(-a, d_beta), inv_rows);
    dy[i] = from_f32<T>((mul_rn(a, in.g) + mul_rn(b, in.y - mean)) + k);
  }
};

template <typename T, bool kFrozen>
__global__ void __launch_bounds__(kElemThreads)
    bn_backward_dy_kernel(const BackwardDyOp<T, kFrozen> op, int64_t total) {
  grid_stride(op, total, op.c);
}

inline int64_t sums_chunks(int64_t rows) { return (rows + kSumsChunkRows - 1) / kSumsChunkRows; }

template <typename T>
cudaError_t launch_bn_backward_sums(const rk_bn_backward_sums_args& a, cudaStream_t stream) {
  const BackwardSumsParams<T> p{static_cast<const T*>(a.dv), static_cast<const T*>(a.y), a.rows,
                                static_cast<int>(a.c), a.mean, a.workspace,
                                sums_chunks(a.rows), a.sums};
  if (p.chunks > 0) {
    const dim3 grid(static_cast<unsigned>(p.chunks), channel_chunks(a.c));
    RK_LAUNCH(grid, kSumsWarps * kLanes, 0, stream, bn_backward_partials_kernel<T>)(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  RK_LAUNCH(channel_chunks(a.c), merge_threads(p.chunks), 0, stream,
            bn_backward_reduce_kernel<T>)(p);
  return cudaGetLastError();
}

template <typename T, bool kFrozen>
cudaError_t launch_bn_backward_dy_mode(const rk_bn_backward_dy_args& a, cudaStream_t stream) {
  const BackwardDyOp<T, kFrozen> op{static_cast<const T*>(a.dv), static_cast<const T*>(a.y),
                                    a.stats, a.sums, static_cast<int>(a.c),
                                    1.0f / static_cast<float>(a.rows), static_cast<T*>(a.dy)};
  const int64_t total = a.rows * a.c;
  RK_LAUNCH(elem_blocks(total), kElemThreads, 0, stream, bn_backward_dy_kernel<T, kFrozen>)(
      op, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bn_backward_dy(const rk_bn_backward_dy_args& a, cudaStream_t stream) {
  return a.frozen ? launch_bn_backward_dy_mode<T, true>(a, stream)
                  : launch_bn_backward_dy_mode<T, false>(a, stream);
}

}  // namespace
}  // namespace rk

extern "C" cudaError_t rk_bn_finalize(const rk_bn_finalize_args* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_bn_finalize_args& a = *args;
  if (a.rows < 2 || a.block_m < 1 || a.c < 0 || a.c > rk::kInt32Max || a.tiles < 1 ||
      a.tiles != (a.rows - 1) / a.block_m + 1 || !(a.eps >= 0.0))
    return cudaErrorInvalidValue;
  if (a.c == 0) return cudaSuccess;
  if (a.partials == nullptr || a.stats == nullptr) return cudaErrorInvalidValue;
  const rk::FinalizeParams p{a.partials, a.tiles, a.rows, a.block_m, static_cast<int>(a.c),
                             a.gamma, a.beta, static_cast<float>(a.eps), a.stats};
  RK_LAUNCH(rk::channel_chunks(a.c), rk::merge_threads(a.tiles), 0, stream,
            rk::bn_finalize_kernel)(p);
  return cudaGetLastError();
}

extern "C" int64_t rk_bn_backward_workspace(int64_t rows, int64_t c) {
  if (rows <= 0 || c <= 0 || rk::bad_matrix(rows, c)) return 0;
  return rk::sums_chunks(rows) * 2 * c;
}

extern "C" cudaError_t rk_bn_backward_sums(const rk_bn_backward_sums_args* args,
                                           cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_bn_backward_sums_args& a = *args;
  // grid.y holds the channel chunks, grid.x the row chunks.
  if (rk::bad_matrix(a.rows, a.c) || static_cast<int64_t>(rk::channel_chunks(a.c)) > rk::kMaxGridY ||
      rk::sums_chunks(a.rows) > rk::kInt32Max)
    return cudaErrorInvalidValue;
  if (a.c == 0) return cudaSuccess;  // rows == 0 still writes zero sums
  if (a.sums == nullptr || (a.rows > 0 && (a.dv == nullptr || a.y == nullptr ||
                                           a.mean == nullptr || a.workspace == nullptr)))
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    return rk::launch_bn_backward_sums<decltype(zero)>(a, stream);
  });
}

extern "C" cudaError_t rk_bn_backward_dy(const rk_bn_backward_dy_args* args,
                                         cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_bn_backward_dy_args& a = *args;
  if (rk::bad_matrix(a.rows, a.c)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  // Batch statistics need more than one value per channel (as the CPU op checks).
  if (!a.frozen && a.rows < 2) return cudaErrorInvalidValue;
  if (a.dv == nullptr || a.stats == nullptr || a.dy == nullptr ||
      (!a.frozen && (a.y == nullptr || a.sums == nullptr)))
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    return rk::launch_bn_backward_dy<decltype(zero)>(a, stream);
  });
}
