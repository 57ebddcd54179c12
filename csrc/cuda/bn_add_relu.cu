// bn_add_relu and relu_backward (launchers.h): the end of a training-mode block,
// out = relu(y * scale + shift + shortcut'), shortcut' the identity or a projection's
// lazy BN, and the ReLU's backward. Elementwise (elementwise.cuh).
#include "elementwise.cuh"
#include "launchers.h"

namespace rk {
namespace {

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

}  // namespace
}  // namespace rk

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
