// The CUDA implementation of conv_bn_act and conv_bn_act_squeeze (schemas in csrc/ops.cpp):
// tensors -> rk_conv_bn_act_args (launchers.h) -> conv_bn_act.cu.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> conv_bn_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& scale,
                                                    const at::Tensor& shift, int64_t stride,
                                                    int64_t groups, bool relu, bool squeeze) {
  constexpr char op[] = "conv_bn_act";
  check_conv(op, x, weight, stride, groups);
  const int64_t c_out = weight.size(0);
  const at::Tensor s = channel_vector(op, scale, c_out, x, "scale");
  const at::Tensor t = channel_vector(op, shift, c_out, x, "shift");
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv_bn_act_args args{};
  set_kxk_conv_input(op, args, x, weight);
  args.scale = s.data_ptr<float>(), args.shift = t.data_ptr<float>();
  args.stride = stride, args.groups = groups, args.relu = relu ? 1 : 0;

  rk_conv_plan plan{};
  check_launch(op, rk_conv_bn_act_plan(&args, squeeze ? 1 : 0, &plan), "conv_bn_act (plan)");
  at::Tensor y = new_activation(x, args.n, c_out, plan.out_h, plan.out_w);
  at::Tensor sums = at::empty({squeeze ? args.n : 0, squeeze ? plan.tiles_per_image : 0, c_out},
                              x.options().dtype(at::kFloat));
  args.y = y.data_ptr();
  args.sums = squeeze ? sums.data_ptr<float>() : nullptr;
  check_launch(op, rk_conv_bn_act(&args, c10::cuda::getCurrentCUDAStream()), "conv_bn_act");
  return {y, sums};
}

at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& shift, int64_t stride, int64_t groups, bool relu) {
  return std::get<0>(conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, false));
}

// The SE sums are (N, T, C_out), one row per row tile of an image (se_excite adds them up);
// the fake (regnet_kernels/backends/cpp/fakes.py) gets T from the same tile choice.
std::tuple<at::Tensor, at::Tensor> conv_bn_act_squeeze(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& scale,
                                                       const at::Tensor& shift, int64_t stride,
                                                       int64_t groups, bool relu) {
  return conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_act_squeeze", &conv_bn_act_squeeze);
}

}  // namespace regnet_kernels::cuda
