// The CUDA implementation of bn_add_relu and bn_add_relu_backward (schemas in csrc/ops.cpp):
// tensors -> launchers.h argument structs -> bn_add_relu.cu.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

at::Tensor bn_add_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& shortcut,
                       const std::optional<at::Tensor>& sc_scale,
                       const std::optional<at::Tensor>& sc_shift) {
  constexpr char op[] = "bn_add_relu";
  check_y(op, y, scale, shift);
  RK_CHECK_CUDA(op, sc_scale.has_value() == sc_shift.has_value(),
                "pass both sc_scale and sc_shift, or neither");
  RK_CHECK_CUDA(op, shortcut || !sc_scale,
                "sc_scale/sc_shift given without a shortcut");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = nhwc(y), s = scale.contiguous(), t = shift.contiguous();
  at::Tensor r, rs, rt;
  if (shortcut) {
    check_on(op, *shortcut, y, "shortcut");
    RK_CHECK_CUDA(op, shortcut->sizes() == y.sizes() && shortcut->scalar_type() == y.scalar_type(),
                  "shortcut must have y's shape ", y.sizes(), " and dtype ",
                  y.scalar_type(), ", got ", shortcut->scalar_type(), " ", shortcut->sizes());
    r = nhwc(*shortcut);
  }
  if (sc_scale) {
    check_y(op, y, *sc_scale, *sc_shift);
    rs = sc_scale->contiguous();
    rt = sc_shift->contiguous();
  }
  at::Tensor out = at::empty_like(yc);
  rk_bn_add_relu_args a{};
  a.dtype = to_rk(op, y.scalar_type(), "y"), a.y = yc.data_ptr();
  a.rows = y.numel() / std::max<int64_t>(y.size(1), 1), a.c = y.size(1);
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>();
  a.shortcut = r.defined() ? r.data_ptr() : nullptr;
  a.sc_scale = rs.defined() ? rs.data_ptr<float>() : nullptr;
  a.sc_shift = rt.defined() ? rt.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  check_launch(op, rk_bn_add_relu(&a, stream()), "bn_add_relu");
  return out;
}

at::Tensor bn_add_relu_backward(const at::Tensor& grad, const at::Tensor& out) {
  constexpr char op[] = "bn_add_relu_backward";
  check_activation(op, out, "out");
  check_on(op, grad, out, "grad");
  RK_CHECK_CUDA(op, grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(),
                "grad must have out's shape ", out.sizes(), " and dtype ",
                out.scalar_type(), ", got ", grad.scalar_type(), " ", grad.sizes());
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor g = nhwc(grad), o = nhwc(out);
  at::Tensor dz = at::empty_like(o);
  check_launch(op, rk_relu_backward(to_rk(op, out.scalar_type(), "out"), g.data_ptr(), o.data_ptr(),
                                o.numel(), dz.data_ptr(), stream()),
               "bn_add_relu_backward");
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("bn_add_relu", &bn_add_relu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward);
}

}  // namespace regnet_kernels::cuda
