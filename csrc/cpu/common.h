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
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../op_error.h"

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

// Dispatches the activation dtypes the ops take: float32, float16, bfloat16.
#define REGNET_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), at::kFloat, at::kHalf, at::kBFloat16)

// A check of the op `op` (its registered name) on this backend.
#define RK_CHECK_CPU(op, cond, ...) RK_CHECK(op, "cpu", cond, __VA_ARGS__)

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

// A 1x1 stride-1 dense conv of NHWC tensors is a GEMM over their (N * H * W, C) row
// matrices. MKL's GEMM (at::mm) ran RegNet's 1x1 shapes (M = 72..4608 rows, 32..440
// channels) 1.5-2.5x faster than oneDNN's conv forward and 1.6-3.5x faster backward
// (dgrad + wgrad) on a 2-core AVX-512 machine: oneDNN reorders the weights every call,
// and in training they change every step.
inline bool is_gemm_conv(const at::Tensor& weight, int64_t stride, int64_t groups) {
  return weight.size(2) == 1 && stride == 1 && groups == 1;
}

// The (N * H * W, C) row matrix of an NHWC-dense (N, C, H, W) tensor (a view).
inline at::Tensor rows_of(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// (N * H * W, C) rows as the NHWC-dense (N, C, H, W) tensor they are (a view); `like`
// gives N, H and W.
inline at::Tensor nhwc_of_rows(const at::Tensor& rows, const at::Tensor& like) {
  return rows.view({like.size(0), like.size(2), like.size(3), rows.size(1)})
      .permute({0, 3, 1, 2});
}

// A 1x1 conv weight (C_out, C_in, 1, 1) as its (C_out, C_in) matrix.
inline at::Tensor weight_matrix(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), weight.size(1)});
}

// A dense fp32 copy of a per-channel vector (a no-op for the usual contiguous fp32 one).
inline at::Tensor f32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

inline void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  RK_CHECK_CPU(op, t.device().is_cpu(), name, " must be a CPU tensor, got ",
               t.device());
}

inline void check_channel_vector(const char* op, const at::Tensor& t, int64_t c,
                                 const char* name) {
  check_cpu(op, t, name);
  RK_CHECK_CPU(op, t.dim() == 1 && t.size(0) == c, name, " must have shape (", c,
               ",), got ", t.sizes());
  RK_CHECK_CPU(op, t.scalar_type() == at::kFloat, name, " must be float32, got ",
               t.scalar_type());
}

// Loads a row of `c` activations as fp32: the row itself for fp32 (const as
// the row is), or `buf`, widened, for 16-bit types.
template <typename S>
inline auto row_as_float(S* row, int64_t c, std::vector<float>& buf) {
  if constexpr (std::is_same_v<std::remove_const_t<S>, float>) {
    return row;
  } else {  // a vector of 16-bit values a step, as two fp32 vectors (not a scalar loop)
    using V16 = at::vec::Vectorized<std::remove_const_t<S>>;
    buf.resize(c);
    int64_t i = 0;
    for (; i + V16::size() <= c; i += V16::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<std::remove_const_t<S>>(V16::loadu(row + i));
      lo.store(buf.data() + i);
      hi.store(buf.data() + i + Vec::size());
    }
    for (; i < c; ++i) buf[i] = static_cast<float>(row[i]);
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
    using V16 = at::vec::Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + V16::size() <= c; i += V16::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()))
          .store(row + i);
    }
    for (; i < c; ++i) row[i] = static_cast<scalar_t>(src[i]);
  }
}

// A writable fp32 row for results stored into `row`: the row itself for fp32,
// else `buf` (then store_row rounds it into the row).
template <typename scalar_t>
inline float* row_out(scalar_t* row, int64_t c, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buf.resize(c);
    return buf.data();
  }
}

// The row epilogues below read fp32 rows and write `out`, which may be the
// input row itself (in place).

// out = v * scale + shift (+ relu) over c channels; optionally adds the result
// into sums[c] (the SE squeeze).
inline void affine_row(const float* v, const float* scale, const float* shift, int64_t c, bool relu,
                       float* sums, float* out) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i);
    if (relu) y = at::vec::maximum(y, zero);
    y.store(out + i);
    if (sums) (Vec::loadu(sums + i) + y).store(sums + i);
  }
  for (; i < c; ++i) {
    float y = v[i] * scale[i] + shift[i];
    if (relu) y = std::max(y, 0.f);
    out[i] = y;
    if (sums) sums[i] += y;
  }
}

// out = relu(v * scale + shift + r), r a fp32 row.
inline void affine_add_relu_row(const float* v, const float* scale, const float* shift,
                                const float* r, int64_t c, float* out) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i) + Vec::loadu(r + i);
    at::vec::maximum(y, zero).store(out + i);
  }
  for (; i < c; ++i) out[i] = std::max(v[i] * scale[i] + shift[i] + r[i], 0.f);
}

// out = relu(v * scale + shift + p * pscale + pshift): the projection shortcut's BN.
inline void affine_add_affine_relu_row(const float* v, const float* scale, const float* shift,
                                       const float* p, const float* pscale, const float* pshift,
                                       int64_t c, float* out) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec y = Vec::loadu(v + i) * Vec::loadu(scale + i) + Vec::loadu(shift + i) +
            Vec::loadu(p + i) * Vec::loadu(pscale + i) + Vec::loadu(pshift + i);
    at::vec::maximum(y, zero).store(out + i);
  }
  for (; i < c; ++i) {
    out[i] = std::max(v[i] * scale[i] + shift[i] + p[i] * pscale[i] + pshift[i], 0.f);
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

// The checks of a k x k conv (padding k // 2) of x by weight; returns C_out.
inline int64_t check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          int64_t stride, int64_t groups) {
  check_cpu(op, x, "x");
  check_cpu(op, weight, "weight");
  RK_CHECK_CPU(op, x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  RK_CHECK_CPU(op, weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
               "weight must be (C_out, C_in / groups, k, k) with odd k, got ",
               weight.sizes());
  RK_CHECK_CPU(op, x.scalar_type() == weight.scalar_type(), "weight has dtype ",
               weight.scalar_type(), " but x has ", x.scalar_type());
  RK_CHECK_CPU(op, stride >= 1, "stride must be >= 1, got ", stride);
  RK_CHECK_CPU(op, groups >= 1 && weight.size(0) % groups == 0 &&
                   weight.size(1) * groups == x.size(1),
               "weight ", weight.sizes(), " with groups=", groups, " does not fit ",
               x.size(1), " input channels");
  return weight.size(0);
}

// ---------------------------------------------------------------------------
// Deterministic reductions over pixel rows
//
// Every reduction over rows (BN statistics, SE squeeze sums, gradient sums) is
// cut into chunks of kChunkRows rows, fixed by the shape and never by the thread
// count. Each chunk writes its own partial (no atomics, no shared accumulator),
// and the partials are combined in chunk order: bit-identical results run to run
// whatever the scheduling. A chunk's rows are in cache while it is reduced.
// ---------------------------------------------------------------------------

constexpr int64_t kChunkRows = 64;

inline int64_t chunks_of(int64_t rows) { return (rows + kChunkRows - 1) / kChunkRows; }

// Calls fn(r0, r1, part) for every chunk [r0, r1) of the rows [0, segments * seg_rows),
// in parallel; chunks never straddle two segments (images, for per-image sums). Each
// call gets its own zeroed `width`-float partial. Returns the partials as a row-major
// (segments, chunks_of(seg_rows), width) array.
template <typename Fn>
std::vector<float> chunk_partials(int64_t segments, int64_t seg_rows, int64_t width, const Fn& fn) {
  const int64_t per_seg = chunks_of(seg_rows);
  std::vector<float> part(static_cast<size_t>(segments * per_seg * width), 0.f);
  at::parallel_for(0, segments * per_seg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / per_seg;
      const int64_t r0 = seg * seg_rows + (item % per_seg) * kChunkRows;
      fn(r0, std::min(r0 + kChunkRows, (seg + 1) * seg_rows), part.data() + item * width);
    }
  });
  return part;
}

// acc[i] += v[i], i < c.
inline void add_row(float* acc, const float* v, int64_t c) {
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    (Vec::loadu(acc + i) + Vec::loadu(v + i)).store(acc + i);
  }
  for (; i < c; ++i) acc[i] += v[i];
}

// out[s, :] = the sum, in chunk order, of segment s's `per_seg` partials of `width` floats.
inline void sum_partials(const std::vector<float>& part, int64_t segments, int64_t per_seg,
                         int64_t width, float* out) {
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seg = begin; seg < end; ++seg) {
      float* dst = out + seg * width;
      std::fill(dst, dst + width, 0.f);
      for (int64_t k = 0; k < per_seg; ++k) {
        add_row(dst, part.data() + (seg * per_seg + k) * width, width);
      }
    }
  });
}

}  // namespace regnet_kernels::cpu
