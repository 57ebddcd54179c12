// The CUDA implementation of se_squeeze and se_squeeze_backward (schemas in csrc/ops.cpp):
// tensors -> launchers.h argument structs -> se_squeeze.cu.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

at::Tensor se_squeeze(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr char op[] = "se_squeeze";
  check_y(op, y, scale, shift);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t n = y.size(0), c = y.size(1);
  at::Tensor sums = at::empty({n, 1, c}, y.options().dtype(at::kFloat));
  const at::Tensor yc = nhwc(y), s = scale.contiguous(), t = shift.contiguous();
  rk_se_squeeze_args a{};
  a.dtype = to_rk(op, y.scalar_type(), "y"), a.y = yc.data_ptr();
  a.n = n, a.hw = y.size(2) * y.size(3), a.c = c;
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>(), a.sums = sums.data_ptr<float>();
  check_launch(op, rk_se_squeeze(&a, stream()), "se_squeeze");
  return sums;
}

at::Tensor se_squeeze_backward(const at::Tensor& grad_sums, const at::Tensor& y,
                               const at::Tensor& scale, const at::Tensor& shift) {
  constexpr char op[] = "se_squeeze_backward";
  check_y(op, y, scale, shift);
  const int64_t n = y.size(0), c = y.size(1);
  check_on(op, grad_sums, y, "grad_sums");
  RK_CHECK_CUDA(op, grad_sums.sizes() == at::IntArrayRef({n, 1, c}) &&
                    grad_sums.scalar_type() == at::kFloat,
                "grad_sums must be float32 (", n, ", 1, ", c, "), got ",
                grad_sums.scalar_type(), " ", grad_sums.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = nhwc(y), gs = grad_sums.contiguous();
  const at::Tensor s = scale.contiguous(), t = shift.contiguous();
  at::Tensor dv = at::empty_like(yc);
  rk_se_squeeze_backward_args a{};
  a.dtype = to_rk(op, y.scalar_type(), "y"), a.grad_sums = gs.data_ptr<float>();
  a.y = yc.data_ptr();
  a.n = n, a.hw = y.size(2) * y.size(3), a.c = c;
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>(), a.dv = dv.data_ptr();
  check_launch(op, rk_se_squeeze_backward(&a, stream()), "se_squeeze_backward");
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("se_squeeze", &se_squeeze);
  m.impl("se_squeeze_backward", &se_squeeze_backward);
}

}  // namespace regnet_kernels::cuda
