// The element types every kernel file shares: fp32 / fp16 / bf16 conversions (all math
// is fp32), the rk_dtype dispatch of the launchers, and the int32 index limit.
#ifndef REGNET_KERNELS_CUDA_DTYPES_CUH_
#define REGNET_KERNELS_CUDA_DTYPES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.cuh"
#include "launchers.h"

namespace rk {

template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr bool kTensorCores = false;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <> struct Elem<__half> {
  static constexpr bool kTensorCores = true;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <> struct Elem<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// v widened to fp32, and an fp32 value rounded (to nearest even) to T.
template <typename T>
__device__ __forceinline__ float to_f32(T v) { return Elem<T>::to_float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v) { return Elem<T>::from_float(v); }

constexpr int64_t kInt32Max = 0x7fffffffLL;

// fn(T{}) for the element type of an rk_dtype.
template <class Fn>
cudaError_t with_dtype(rk_dtype dtype, Fn&& fn) {
  switch (dtype) {
    case RK_FLOAT32: return fn(float{});
    case RK_FLOAT16: return fn(__half{});
    case RK_BFLOAT16: return fn(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rk

#endif  // REGNET_KERNELS_CUDA_DTYPES_CUH_
