// Shared by the CUDA bindings (cuda/<op>_binding.cpp, one per op): argument checks and
// the tensor -> launcher-struct plumbing. Everything torch-facing lives in the bindings;
// the kernels (cuda/<op>.cu) see only pointers, sizes and strides (launchers.h). The
// bindings are compiled only where torch has CUDA (regnet_kernels/backends/cpp/build.py),
// as their own library loaded after the CPU one, so a CUDA build problem never takes
// the CPU backend down with it.
#pragma once

#include "launchers.h"
#include "../op_error.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

// A check of the op `op` (its registered name) on this backend.
#define RK_CHECK_CUDA(op, cond, ...) RK_CHECK(op, "cuda", cond, __VA_ARGS__)

namespace regnet_kernels::cuda {

inline rk_dtype to_rk(const char* op, at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return RK_FLOAT32;
    case at::kHalf: return RK_FLOAT16;
    case at::kBFloat16: return RK_BFLOAT16;
    default:
      RK_CHECK_CUDA(op, false, name, " has dtype ", t,
                    "; supported: float32, float16, bfloat16");
  }
}

inline void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  RK_CHECK_CUDA(op, t.is_cuda(), name, " must be a CUDA tensor, got ",
                t.device());
}

inline void check_on(const char* op, const at::Tensor& t, const at::Tensor& ref,
                     const char* name) {
  RK_CHECK_CUDA(op, t.is_cuda() && t.device() == ref.device(), name,
                " must be on ", ref.device(), ", got ", t.device());
}

// A dense fp32 per-channel vector on x's device.
inline at::Tensor channel_vector(const char* op, const at::Tensor& t, int64_t c,
                                 const at::Tensor& x, const char* name) {
  check_on(op, t, x, name);
  RK_CHECK_CUDA(op, t.dim() == 1 && t.size(0) == c, name,
                " must have shape (", c, ",), got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

inline void check_activation(const char* op, const at::Tensor& x, const char* name) {
  check_cuda(op, x, name);
  RK_CHECK_CUDA(op, x.dim() == 4, name, " must be 4-D (N, C, H, W), got ",
                x.sizes());
}

inline void check_launch(const char* op, cudaError_t err, const char* launcher) {
  RK_CHECK_CUDA(op, err == cudaSuccess, launcher, " failed: ",
                cudaGetErrorString(err));
}

// The fields every conv launcher shares: the input (logical N, C, H, W, read through
// its strides in NHWC order), its dtype and the weight.
template <typename Args>
inline void set_conv_input(const char* op, Args& args, const at::Tensor& x,
                           const at::Tensor& weight) {
  args.dtype = to_rk(op, x.scalar_type(), "x");
  args.x = x.data_ptr();
  args.n = x.size(0), args.h = x.size(2), args.w = x.size(3), args.c_in = x.size(1);
  args.sx_n = x.stride(0), args.sx_h = x.stride(2), args.sx_w = x.stride(3);
  args.sx_c = x.stride(1);
  args.weight = weight.data_ptr();
  args.c_out = weight.size(0);
}

// The same for a (C_out, C_in / groups, k, k) weight: its size k and four strides.
template <typename Args>
inline void set_kxk_conv_input(const char* op, Args& args, const at::Tensor& x,
                               const at::Tensor& weight) {
  set_conv_input(op, args, x, weight);
  args.k = weight.size(2);
  args.sw_o = weight.stride(0), args.sw_i = weight.stride(1);
  args.sw_h = weight.stride(2), args.sw_w = weight.stride(3);
}

// x (N, C_in, H, W) and a (C_out, C_in / groups, k, k) weight (odd k) of x's dtype.
inline void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       int64_t stride, int64_t groups) {
  check_activation(op, x, "x");
  check_on(op, weight, x, "weight");
  RK_CHECK_CUDA(op, weight.dim() == 4 && weight.size(2) == weight.size(3) &&
                    weight.size(2) % 2 == 1,
                "weight must be (C_out, C_in / groups, k, k) with odd k, got ",
                weight.sizes());
  RK_CHECK_CUDA(op, weight.scalar_type() == x.scalar_type(), "weight has dtype ",
                weight.scalar_type(), ", x has ", x.scalar_type());
  RK_CHECK_CUDA(op, stride >= 1 && groups >= 1 && x.size(1) % groups == 0 &&
                    weight.size(0) % groups == 0 && weight.size(1) * groups == x.size(1),
                "weight ", weight.sizes(), " does not fit x ", x.sizes(),
                " with groups=", groups, ", stride=", stride);
}

inline at::Tensor new_activation(const at::Tensor& like, int64_t n, int64_t c, int64_t h, int64_t w) {
  return at::empty({n, c, h, w}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// NHWC (channels_last) view of a 4-D tensor (a copy only when it is not one already).
inline at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// An empty tensor with like's options (a gradient that is not needed).
inline at::Tensor empty_like_vector(const at::Tensor& like) { return at::empty({0}, like.options()); }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// y (N, C, H, W) on a CUDA device and its lazy BN's fp32 (C,) scale and shift there.
inline void check_y(const char* op, const at::Tensor& y, const at::Tensor& scale,
                    const at::Tensor& shift) {
  check_activation(op, y, "y");
  check_on(op, scale, y, "scale");
  check_on(op, shift, y, "shift");
  for (const auto* t : {&scale, &shift}) {
    RK_CHECK_CUDA(op, t->dim() == 1 && t->size(0) == y.size(1) && t->scalar_type() == at::kFloat,
                  "scale and shift must be float32 (", y.size(1),
                  ",), got ", t->scalar_type(), " ", t->sizes());
  }
}

}  // namespace regnet_kernels::cuda
