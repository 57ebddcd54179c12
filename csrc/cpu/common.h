// Shared helpers of the C++ CPU implementations (csrc/cpu/<op>.cpp).
//
// Activations are NHWC (channels_last): a channels_last tensor of logical shape
// (N, C, H, W) is a row-major (N * H * W, C) matrix, so every epilogue below is
// a parallel loop over pixel rows with a vectorized loop over channels. All
// per-channel arithmetic (BN scale/shift, gate, SE sums) is fp32; 16-bit
// activations are widened to fp32 row by row and rounded once when stored.
#pragma once

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

// Dispatches the activation dtypes the ops take: float32, float16, bfloat16.
#define REGNET_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), at::kFloat, at::kHalf, at::kBFloat16)

namespace regnet_kernels::cpu {

using Vec = at::vec::Vectorized<float>;

// Pixel rows per parallel work item: large enough to amortize the scheduling,
// small enough that every core gets work at small batch sizes.
inline int64_t rows_grain(int64_t channels) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(channels, 1));
}

// x as a dense NHWC tensor (a no-op when it already is one).
inline at::Tensor nhwc(const at::Tensor& x) {
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// A dense fp32 copy of a per-channel vector (a no-op for the usual contiguous fp32 one).
inline at::Tensor f32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "regnet_kernels (C++ CPU): ", name, " must be a CPU tensor, got ",
              t.device());
}

inline void check_channel_vector(const at::Tensor& t, int64_t c, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, "regnet_kernels: ", name, " must have shape (", c,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "regnet_kernels: ", name, " must be float32, got ",
              t.scalar_type());
}

// Loads a row of `c` activations as fp32: the row itself for fp32 (const as
// the row is), or `buf`, widened, for 16-bit types.
template <typename S>
inline auto row_as_float(S* row, int64_t c, std::vector<float>& buf) {
  if constexpr (std::is_same_v<std::remove_const_t<S>, float>) {
    return row;
  } else {
    buf.resize(c);
    for (int64_t i = 0; i < c; ++i) buf[i] = static_cast<float>(row[i]);
    return buf.data();
  }
}

// Stores a fp32 row back (rounding once for 16-bit types; nothing to do when
// `src` already is the fp32 row itself).
template <typename scalar_t>
inline void store_row(scalar_t* row, const float* src, int64_t c) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (row != src) std::copy(src, src + c, row);
  } else {
    for (int64_t i = 0; i < c; ++i) row[i] = static_cast<scalar_t>(src[i]);
  }
}

// v = v * scale + shift (+ relu), in place over c channels; optionally adds the
// result into sums[c] (the SE squeeze).
inline void affine_row(float* v, const float* scale, const float* shift, int64_t c, bool relu,
                       float* sums) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i);
    if (relu) y = at::vec::maximum(y, zero);
    y.store(v + i);
    if (sums) (Vec::loadu(sums + i) + y).store(sums + i);
  }
  for (; i < c; ++i) {
    float y = v[i] * scale[i] + shift[i];
    if (relu) y = std::max(y, 0.f);
    v[i] = y;
    if (sums) sums[i] += y;
  }
}

// v = relu(v * scale + shift + r), r a fp32 row.
inline void affine_add_relu_row(float* v, const float* scale, const float* shift, const float* r,
                                int64_t c) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i) + Vec::loadu(r + i);
    at::vec::maximum(y, zero).store(v + i);
  }
  for (; i < c; ++i) v[i] = std::max(v[i] * scale[i] + shift[i] + r[i], 0.f);
}

// v = relu(v * scale + shift + p * pscale + pshift): the projection shortcut's BN.
inline void affine_add_affine_relu_row(float* v, const float* scale, const float* shift,
                                       const float* p, const float* pscale, const float* pshift,
                                       int64_t c) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i) +
            Vec::loadu(p + i) * Vec::loadu(pscale + i) + Vec::loadu(pshift + i);
    at::vec::maximum(y, zero).store(v + i);
  }
  for (; i < c; ++i) {
    v[i] = std::max(v[i] * scale[i] + shift[i] + p[i] * pscale[i] + pshift[i], 0.f);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace regnet_kernels::cpu
