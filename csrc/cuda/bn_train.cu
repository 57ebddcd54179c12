// The BatchNorm / SE / residual pieces of a training-mode block around the lazy-BN
// conv (see train_launchers.h): the batch statistics from the conv's per-tile
// partials, the SE squeeze of relu(y * scale + shift), the block's residual end
// and the BN backward. Activations are dense NHWC viewed as (rows, C); per-channel
// vectors and every accumulation are fp32, each output is rounded once.
//
// Decomposition
//   bn_finalize          CTA per 32-channel chunk (lane = channel), up to 32 warps
//                        ("thread rows"); row r Chan-merges tiles r, r + R, ... in
//                        order, then warp 0 merges the rows' (n, mean, M2) in row order.
//   se_squeeze           CTA per (32-channel chunk, image); thread row r sums pixels
//                        r, r + R, ... sequentially, warp 0 adds the rows in order.
//   bn_backward_sums     1. CTA per (1024-row chunk, 32-channel chunk): 8 warps over
//                           the chunk's rows, rows of the warps added in warp order,
//                           one (sum dv, sum dv * (y - mean)) partial per chunk in the
//                           workspace; 2. the chunks reduced like bn_finalize's tiles.
//   elementwise ops      (se_squeeze_backward, bn_add_relu, relu_backward,
//                        bn_backward_dy) grid-stride over the dense (rows, C) elements,
//                        int64 indices, the channel advanced incrementally (no
//                        division per element), kUnroll elements loaded per thread
//                        before any is stored (memory-level parallelism);
//                        se_squeeze_backward: grid.y = image (launches of <= 65535
//                        images), grid.x over the image's hw * C elements.
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
#include "dtypes.cuh"
#include "train_launchers.h"

namespace rk {
namespace {

constexpr int kLanes = 32;                 // channels per warp (one per lane)
constexpr int kMaxRows = 32;               // thread rows (warps) of the merge kernels
constexpr int kElemThreads = 256;          // elementwise kernels
constexpr int kUnroll = 4;                 // elements in flight per thread
constexpr int64_t kMaxElemBlocks = 16384;  // grid-stride beyond this
constexpr int kSumsWarps = 8;              // bn_backward_sums, first kernel
constexpr int64_t kSumsChunkRows = 1024;   // rows per workspace partial
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
// se_squeeze and its backward
// ---------------------------------------------------------------------------
template <typename T>
struct SqueezeParams {
  const T* y;             // (N, hw, C)
  int64_t n, hw;
  int c;
  const float* scale;
  const float* shift;
  float* sums;            // (N, C)
};

template <typename T>
__global__ void __launch_bounds__(kMaxRows * kLanes) se_squeeze_kernel(const SqueezeParams<T> p) {
  __shared__ float red[kMaxRows][kLanes];
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int nrows = blockDim.x / kLanes;
  const int c = blockIdx.x * kLanes + lane;
  const bool ok = c < p.c;
  const int64_t C = p.c;
  const float sc = ok ? p.scale[c] : 0.0f, sh = ok ? p.shift[c] : 0.0f;

  for (int64_t img = blockIdx.y; img < p.n; img += gridDim.y) {  // uniform over the CTA
    float s = 0.0f;
    if (ok) {
      // Warp = 32 consecutive channels of one pixel: coalesced.
      const T* src = p.y + (img * p.hw + row) * C + c;
      const int64_t step = static_cast<int64_t>(nrows) * C;
#pragma unroll 4
      for (int64_t px = row; px < p.hw; px += nrows, src += step)
        s += relu(mul_rn(to_f32(*src), sc) + sh);
    }
    red[row][lane] = s;
    __syncthreads();
    if (row == 0 && ok) {
      for (int r = 1; r < nrows; ++r) s += red[r][lane];
      p.sums[img * C + c] = s;
    }
    __syncthreads();  // red is reused by the next image
  }
}

template <typename T>
struct SqueezeBackwardOp {
  struct In {
    float y;
  };
  const float* grad;      // this image's (C,) row of grad_sums
  const T* y;             // this image's pixels
  const float* scale;
  const float* shift;
  T* dv;
  __device__ __forceinline__ In load(int64_t i, int) const { return In{to_f32(y[i])}; }
  __device__ __forceinline__ void store(int64_t i, int c, const In& in) const {
    const bool pos = mul_rn(in.y, scale[c]) + shift[c] > 0.0f;
    dv[i] = from_f32<T>(pos ? grad[c] : 0.0f);
  }
};

template <typename T>
struct SqueezeBackwardParams {
  const float* grad_sums; // (images, C), offset to this launch's first image
  const T* y;
  int64_t hw;
  int c;
  const float* scale;
  const float* shift;
  T* dv;
};

// grid.y = image (the launcher splits more than 65535 images into several launches),
// grid.x grid-strides over the image's hw * C elements.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
    se_squeeze_backward_kernel(const SqueezeBackwardParams<T> p) {
  const int64_t img = blockIdx.y, per_image = p.hw * p.c;
  const SqueezeBackwardOp<T> op{p.grad_sums + img * p.c, p.y + img * per_image, p.scale, p.shift,
                                p.dv + img * per_image};
  grid_stride(op, per_image, p.c);
}

// ---------------------------------------------------------------------------
// bn_add_relu and relu_backward
// ---------------------------------------------------------------------------
enum Shortcut { kNoShortcut = 0, kIdentity, kProjection };

template <typename T, int kShortcut>
struct AddReluOp {
  struct In {
    float y, r;
  };
  const T* y;
  const float* scale;
  const float* shift;
  const T* shortcut;
  const float* sc_scale;
  const float* sc_shift;
  T* out;
  __device__ __forceinline__ In load(int64_t i, int) const {
    return In{to_f32(y[i]), kShortcut != kNoShortcut ? to_f32(shortcut[i]) : 0.0f};
  }
  // The CPU's order: ((y * s + t) + r) or (((y * s + t) + r * rs) + rt).
  __device__ __forceinline__ void store(int64_t i, int c, const In& in) const {
    float v = mul_rn(in.y, scale[c]) + shift[c];
    if (kShortcut == kIdentity) v = v + in.r;
    if (kShortcut == kProjection) v = (v + mul_rn(in.r, sc_scale[c])) + sc_shift[c];
    out[i] = from_f32<T>(relu(v));
  }
};

template <typename T, int kShortcut>
__global__ void __launch_bounds__(kElemThreads)
    bn_add_relu_kernel(const AddReluOp<T, kShortcut> op, int64_t total, int c) {
  grid_stride(op, total, c);
}

template <typename T>
struct ReluBackwardOp {
  struct In {
    T g;
    float o;
  };
  const T* grad;
  const T* out;
  T* dz;
  __device__ __forceinline__ In load(int64_t i, int) const { return In{grad[i], to_f32(out[i])}; }
  __device__ __forceinline__ void store(int64_t i, int, const In& in) const {
    dz[i] = in.o > 0.0f ? in.g : from_f32<T>(0.0f);
  }
};

// Elementwise without channels: C = 1 (the channel is always 0).
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
    relu_backward_kernel(const ReluBackwardOp<T> op, int64_t total) {
  grid_stride(op, total, 1);
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

// ---------------------------------------------------------------------------
// Launchers (typed)
// ---------------------------------------------------------------------------
inline unsigned channel_chunks(int64_t c) { return static_cast<unsigned>((c + kLanes - 1) / kLanes); }

template <typename T>
cudaError_t launch_se_squeeze(const rk_se_squeeze_args& a, cudaStream_t stream) {
  SqueezeParams<T> p{static_cast<const T*>(a.y), a.n, a.hw, static_cast<int>(a.c),
                     a.scale, a.shift, a.sums};
  const dim3 grid(channel_chunks(a.c), static_cast<unsigned>(a.n < kMaxGridY ? a.n : kMaxGridY));
  RK_LAUNCH(grid, merge_threads(a.hw), 0, stream, se_squeeze_kernel<T>)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_se_squeeze_backward(const rk_se_squeeze_backward_args& a,
                                       cudaStream_t stream) {
  const int64_t per_image = a.hw * a.c;
  for (int64_t img0 = 0; img0 < a.n; img0 += kMaxGridY) {  // grid.y holds up to 65535 images
    const int64_t imgs = a.n - img0 < kMaxGridY ? a.n - img0 : kMaxGridY;
    const SqueezeBackwardParams<T> p{a.grad_sums + img0 * a.c,
                                     static_cast<const T*>(a.y) + img0 * per_image, a.hw,
                                     static_cast<int>(a.c), a.scale, a.shift,
                                     static_cast<T*>(a.dv) + img0 * per_image};
    const dim3 grid(elem_blocks(per_image), static_cast<unsigned>(imgs));
    RK_LAUNCH(grid, kElemThreads, 0, stream, se_squeeze_backward_kernel<T>)(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int kShortcut>
cudaError_t launch_add_relu_mode(const rk_bn_add_relu_args& a, cudaStream_t stream) {
  const AddReluOp<T, kShortcut> op{static_cast<const T*>(a.y), a.scale, a.shift,
                                   static_cast<const T*>(a.shortcut), a.sc_scale, a.sc_shift,
                                   static_cast<T*>(a.out)};
  const int64_t total = a.rows * a.c;
  RK_LAUNCH(elem_blocks(total), kElemThreads, 0, stream, bn_add_relu_kernel<T, kShortcut>)(
      op, total, static_cast<int>(a.c));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bn_add_relu(const rk_bn_add_relu_args& a, cudaStream_t stream) {
  if (a.shortcut == nullptr) return launch_add_relu_mode<T, kNoShortcut>(a, stream);
  if (a.sc_scale == nullptr) return launch_add_relu_mode<T, kIdentity>(a, stream);
  return launch_add_relu_mode<T, kProjection>(a, stream);
}

template <typename T>
cudaError_t launch_relu_backward(const void* grad, const void* out, int64_t numel, void* dz,
                                 cudaStream_t stream) {
  const ReluBackwardOp<T> op{static_cast<const T*>(grad), static_cast<const T*>(out),
                             static_cast<T*>(dz)};
  RK_LAUNCH(elem_blocks(numel), kElemThreads, 0, stream, relu_backward_kernel<T>)(op, numel);
  return cudaGetLastError();
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

// rows * c elements addressable with int64 and a channel count that fits an int.
inline bool bad_matrix(int64_t rows, int64_t c) {
  return rows < 0 || c < 0 || c > kInt32Max || (c > 0 && rows > INT64_MAX / c);
}

}  // namespace
}  // namespace rk

// The launcher's typed instantiation for an rk_dtype (the return of the switch).
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

extern "C" cudaError_t rk_se_squeeze(const rk_se_squeeze_args* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_se_squeeze_args& a = *args;
  if (a.n < 0 || a.hw < 0 || rk::bad_matrix(a.hw, a.c) || rk::bad_matrix(a.n, a.hw * a.c))
    return cudaErrorInvalidValue;
  if (a.n == 0 || a.c == 0) return cudaSuccess;  // hw == 0 still writes zero sums
  if ((a.hw > 0 && a.y == nullptr) || a.scale == nullptr || a.shift == nullptr ||
      a.sums == nullptr)
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    return rk::launch_se_squeeze<decltype(zero)>(a, stream);
  });
}

extern "C" cudaError_t rk_se_squeeze_backward(const rk_se_squeeze_backward_args* args,
                                              cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_se_squeeze_backward_args& a = *args;
  if (a.n < 0 || a.hw < 0 || rk::bad_matrix(a.hw, a.c) || rk::bad_matrix(a.n, a.hw * a.c))
    return cudaErrorInvalidValue;
  if (a.n == 0 || a.hw == 0 || a.c == 0) return cudaSuccess;
  if (a.grad_sums == nullptr || a.y == nullptr || a.scale == nullptr || a.shift == nullptr ||
      a.dv == nullptr)
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    return rk::launch_se_squeeze_backward<decltype(zero)>(a, stream);
  });
}

extern "C" cudaError_t rk_bn_add_relu(const rk_bn_add_relu_args* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_bn_add_relu_args& a = *args;
  if (rk::bad_matrix(a.rows, a.c)) return cudaErrorInvalidValue;
  // The projection's BN comes in pairs and needs a shortcut.
  if ((a.sc_scale == nullptr) != (a.sc_shift == nullptr) ||
      (a.sc_scale != nullptr && a.shortcut == nullptr))
    return cudaErrorInvalidValue;
  if (a.rows == 0 || a.c == 0) return cudaSuccess;
  if (a.y == nullptr || a.scale == nullptr || a.shift == nullptr || a.out == nullptr)
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    return rk::launch_bn_add_relu<decltype(zero)>(a, stream);
  });
}

extern "C" cudaError_t rk_relu_backward(rk_dtype dtype, const void* grad, const void* out,
                                        int64_t numel, void* dz, cudaStream_t stream) {
  if (numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  if (grad == nullptr || out == nullptr || dz == nullptr) return cudaErrorInvalidValue;
  return rk::with_dtype(dtype, [&](auto zero) {
    return rk::launch_relu_backward<decltype(zero)>(grad, out, numel, dz, stream);
  });
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

