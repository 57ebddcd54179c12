// se_squeeze and its backward (launchers.h): the SE squeeze of a training-mode block,
// sums[n, c] = sum over pixels of relu(y * scale + shift), and its gradient.
// Building blocks and conventions: elementwise.cuh.
//
//   se_squeeze           merge kernel, CTA per (32-channel chunk, image): thread row r
//                        sums pixels r, r + R, ... sequentially, warp 0 adds the rows.
//   se_squeeze_backward  elementwise; grid.y = image (launches of <= 65535 images),
//                        grid.x over the image's hw * C elements.
#include "elementwise.cuh"
#include "launchers.h"

namespace rk {
namespace {

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

}  // namespace
}  // namespace rk

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
