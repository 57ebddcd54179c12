// bn_add_relu and its backward on the CPU: the end of a training-mode block.
//
//   out = relu(y * scale + shift + shortcut'),  shortcut' = shortcut (identity),
//         shortcut * sc_scale + sc_shift (a raw projection output and its BN), or 0
//
// One parallel, vectorized pass over the rows, in fp32, rounded once when stored.
// y and a projection shortcut are lazy BN outputs (see conv_bn_train.cpp), so
// the backward hands every input the same gradient, dL/d(sum) = grad * (out > 0).
#include "common.h"

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace regnet_kernels::cpu {
namespace {

void check_activation(const char* op, const at::Tensor& t, const char* name) {
  check_cpu(op, t, name);
  RK_CHECK_CPU(op, t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.sizes());
}

at::Tensor bn_add_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& shortcut,
                       const std::optional<at::Tensor>& sc_scale,
                       const std::optional<at::Tensor>& sc_shift) {
  constexpr char op[] = "bn_add_relu";
  check_activation(op, y, "y");
  const int64_t c = y.size(1);
  check_channel_vector(op, scale, c, "scale");
  check_channel_vector(op, shift, c, "shift");
  RK_CHECK_CPU(op, sc_scale.has_value() == sc_shift.has_value(),
               "pass both sc_scale and sc_shift, or neither");
  RK_CHECK_CPU(op, shortcut || !sc_scale, "sc_scale/sc_shift given without a shortcut");
  if (shortcut) {
    check_activation(op, *shortcut, "shortcut");
    RK_CHECK_CPU(op, shortcut->sizes() == y.sizes() && shortcut->scalar_type() == y.scalar_type(),
                 "shortcut must have y's shape ", y.sizes(), " and dtype ",
                 y.scalar_type(), ", got ", shortcut->scalar_type(), " ", shortcut->sizes());
  }
  if (sc_scale) {
    check_channel_vector(op, *sc_scale, c, "sc_scale");
    check_channel_vector(op, *sc_shift, c, "sc_shift");
  }
  const at::Tensor yc = nhwc(y);
  at::Tensor out = at::empty_like(yc);
  if (out.numel() == 0) return out;
  const at::Tensor r = shortcut ? nhwc(*shortcut) : at::Tensor();
  const at::Tensor s = f32(scale), t = f32(shift);
  const at::Tensor rs = sc_scale ? f32(*sc_scale) : at::Tensor();
  const at::Tensor rt = sc_shift ? f32(*sc_shift) : at::Tensor();
  const float *ps = s.data_ptr<float>(), *pt = t.data_ptr<float>();
  const float* prs = rs.defined() ? rs.data_ptr<float>() : nullptr;
  const float* prt = rt.defined() ? rt.data_ptr<float>() : nullptr;

  REGNET_DISPATCH(y.scalar_type(), "bn_add_relu", [&] {
    const scalar_t* py = yc.data_ptr<scalar_t>();
    const scalar_t* pr = r.defined() ? r.data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel() / c, rows_grain(c), [&](int64_t begin, int64_t end) {
      std::vector<float> ybuf, rbuf, obuf;
      for (int64_t row = begin; row < end; ++row) {
        const float* v = row_as_float(py + row * c, c, ybuf);
        float* o = row_out(po + row * c, c, obuf);
        const float* rv = pr ? row_as_float(pr + row * c, c, rbuf) : nullptr;
        if (!rv) {
          affine_row(v, ps, pt, c, /*relu=*/true, nullptr, o);
        } else if (prs) {
          affine_add_affine_relu_row(v, ps, pt, rv, prs, prt, c, o);
        } else {
          affine_add_relu_row(v, ps, pt, rv, c, o);
        }
        store_row(po + row * c, o, c);
      }
    });
  });
  return out;
}

// d = g * (o > 0) over n elements, in the activations' dtype (a select: no rounding).
// The pointers are restrict-qualified locals: read through the parallel lambda's
// captures, every store could alias them, and the loop stayed scalar, reloading them
// (20x slower than ATen's threshold_backward).
template <typename scalar_t>
void relu_mask(const scalar_t* __restrict g, const scalar_t* __restrict o,
               scalar_t* __restrict d, int64_t n) {
  using V = at::vec::Vectorized<scalar_t>;
  const V zero(scalar_t(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V::blendv(zero, V::loadu(g + i), V::loadu(o + i) > zero).store(d + i);
  }
  for (; i < n; ++i) d[i] = o[i] > scalar_t(0) ? g[i] : scalar_t(0);
}

// grad * (out > 0): the gradient of the pre-ReLU sum, for y and the shortcut alike.
at::Tensor bn_add_relu_backward(const at::Tensor& grad, const at::Tensor& out) {
  constexpr char op[] = "bn_add_relu_backward";
  check_activation(op, out, "out");
  check_cpu(op, grad, "grad");
  RK_CHECK_CPU(op, grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(),
               "grad must have out's shape ", out.sizes(), " and dtype ",
               out.scalar_type(), ", got ", grad.scalar_type(), " ", grad.sizes());
  const at::Tensor g = nhwc(grad), o = nhwc(out);
  at::Tensor dz = at::empty_like(o);
  if (dz.numel() == 0) return dz;
  const int64_t c = out.size(1);
  REGNET_DISPATCH(out.scalar_type(), "bn_add_relu_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *po = o.data_ptr<scalar_t>();
    scalar_t* pd = dz.data_ptr<scalar_t>();
    at::parallel_for(0, dz.numel(), rows_grain(c) * c, [&](int64_t begin, int64_t end) {
      relu_mask(pg + begin, po + begin, pd + begin, end - begin);
    });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("bn_add_relu", &bn_add_relu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward);
}

}  // namespace regnet_kernels::cpu
