// se_squeeze and its backward on the CPU: the SE squeeze of a training-mode
// BN + ReLU output, read from the raw conv output y (a lazy BN output, see
// conv_bn_train.cpp):
//   sums[n, 0, c] = sum over (h, w) of relu(y * scale + shift)     fp32, one tile per image
//   dv = grad[n, 0, c] * (y * scale + shift > 0)                   the gradient for y (dL/dv)
// The sums are per-(image, chunk) partials reduced in chunk order: deterministic.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace regnet_kernels::cpu {
namespace {

void check_args(const char* op, const at::Tensor& y, const at::Tensor& scale,
                const at::Tensor& shift) {
  check_cpu(op, y, "y");
  RK_CHECK_CPU(op, y.dim() == 4, "y must be 4-D (N, C, H, W), got ", y.sizes());
  check_channel_vector(op, scale, y.size(1), "scale");
  check_channel_vector(op, shift, y.size(1), "shift");
}

at::Tensor se_squeeze(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr char op[] = "se_squeeze";
  check_args(op, y, scale, shift);
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  at::Tensor sums = at::empty({n, 1, c}, y.options().dtype(at::kFloat));
  if (sums.numel() == 0) return sums;
  const at::Tensor yc = nhwc(y), s = f32(scale), t = f32(shift);
  const float *ps = s.data_ptr<float>(), *pt = t.data_ptr<float>();
  REGNET_DISPATCH(y.scalar_type(), "se_squeeze", [&] {
    const scalar_t* py = yc.data_ptr<scalar_t>();
    const auto part = chunk_partials(n, hw, c, [&](int64_t r0, int64_t r1, float* acc) {
      std::vector<float> buf, act(c);
      for (int64_t r = r0; r < r1; ++r) {
        affine_row(row_as_float(py + r * c, c, buf), ps, pt, c, /*relu=*/true, acc, act.data());
      }
    });
    sum_partials(part, n, chunks_of(hw), c, sums.data_ptr<float>());
  });
  return sums;
}

// dv = grad[n, 0, c] * relu'(y * scale + shift) in y's dtype, channels_last.
inline void squeeze_backward_row(const float* y, const float* s, const float* t, const float* g,
                                 int64_t c, float* dv) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    const Vec v = Vec::loadu(y + i) * Vec::loadu(s + i) + Vec::loadu(t + i);
    Vec::blendv(zero, Vec::loadu(g + i), v > zero).store(dv + i);
  }
  for (; i < c; ++i) dv[i] = y[i] * s[i] + t[i] > 0.f ? g[i] : 0.f;
}

at::Tensor se_squeeze_backward(const at::Tensor& grad_sums, const at::Tensor& y,
                               const at::Tensor& scale, const at::Tensor& shift) {
  constexpr char op[] = "se_squeeze_backward";
  check_args(op, y, scale, shift);
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  check_cpu(op, grad_sums, "grad_sums");
  RK_CHECK_CPU(op, grad_sums.sizes() == at::IntArrayRef({n, 1, c}) &&
                   grad_sums.scalar_type() == at::kFloat,
               "grad_sums must be float32 (", n, ", 1, ", c, "), got ",
               grad_sums.scalar_type(), " ", grad_sums.sizes());
  const at::Tensor yc = nhwc(y);
  at::Tensor dv = at::empty_like(yc);
  if (dv.numel() == 0) return dv;
  const at::Tensor g = grad_sums.contiguous(), s = f32(scale), t = f32(shift);
  const float *pg = g.data_ptr<float>(), *ps = s.data_ptr<float>(), *pt = t.data_ptr<float>();
  REGNET_DISPATCH(y.scalar_type(), "se_squeeze_backward", [&] {
    const scalar_t* py = yc.data_ptr<scalar_t>();
    scalar_t* pd = dv.data_ptr<scalar_t>();
    at::parallel_for(0, n * hw, rows_grain(c), [&](int64_t begin, int64_t end) {
      std::vector<float> ybuf, dbuf;
      for (int64_t r = begin; r < end; ++r) {
        float* out = row_out(pd + r * c, c, dbuf);
        squeeze_backward_row(row_as_float(py + r * c, c, ybuf), ps, pt, pg + (r / hw) * c, c, out);
        store_row(pd + r * c, out, c);
      }
    });
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("se_squeeze", &se_squeeze);
  m.impl("se_squeeze_backward", &se_squeeze_backward);
}

}  // namespace regnet_kernels::cpu
