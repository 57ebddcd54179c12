// The CUDA implementations of the eval ops: tensors -> launcher argument structs.
//
// Everything torch-facing lives here; the kernels (csrc/cuda/*.cu) see only
// pointers, sizes and strides (launchers.h). Compiled only where torch has CUDA
// (regnet_kernels/ops/_extension.py), as its own library loaded after the CPU one,
// so a CUDA build problem never takes the CPU backend down with it.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> conv_bn_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& scale,
                                                    const at::Tensor& shift, int64_t stride,
                                                    int64_t groups, bool relu, bool squeeze) {
  check_conv(x, weight, stride, groups);
  const int64_t c_out = weight.size(0);
  const at::Tensor s = channel_vector(scale, c_out, x, "scale");
  const at::Tensor t = channel_vector(shift, c_out, x, "shift");
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv_bn_act_args args{};
  set_kxk_conv_input(args, x, weight);
  args.scale = s.data_ptr<float>(), args.shift = t.data_ptr<float>();
  args.stride = stride, args.groups = groups, args.relu = relu ? 1 : 0;

  rk_conv_plan plan{};
  check_launch(rk_conv_bn_act_plan(&args, squeeze ? 1 : 0, &plan), "conv_bn_act (plan)");
  at::Tensor y = new_activation(x, args.n, c_out, plan.out_h, plan.out_w);
  at::Tensor sums = at::empty({squeeze ? args.n : 0, squeeze ? plan.tiles_per_image : 0, c_out},
                              x.options().dtype(at::kFloat));
  args.y = y.data_ptr();
  args.sums = squeeze ? sums.data_ptr<float>() : nullptr;
  check_launch(rk_conv_bn_act(&args, c10::cuda::getCurrentCUDAStream()), "conv_bn_act");
  return {y, sums};
}

at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& shift, int64_t stride, int64_t groups, bool relu) {
  return std::get<0>(conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, false));
}

// The schema's sums are (N, 1, C_out) on every device, so that the one fake
// implementation (regnet_kernels/ops/cpp.py) is right for all: the kernel's per-row-tile
// partials are summed here, in tile order (one small extra launch).
std::tuple<at::Tensor, at::Tensor> conv_bn_act_squeeze(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& scale,
                                                       const at::Tensor& shift, int64_t stride,
                                                       int64_t groups, bool relu) {
  auto [y, tile_sums] = conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, true);
  return {y, tile_sums.sum(1, /*keepdim=*/true)};
}

at::Tensor se_excite(const at::Tensor& sums_in, int64_t hw, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK(sums_in.is_cuda() && sums_in.dim() == 3 && sums_in.scalar_type() == at::kFloat,
              "regnet_kernels (CUDA): sums must be a float32 CUDA tensor (N, T, C), got ",
              sums_in.scalar_type(), " ", sums_in.sizes(), " on ", sums_in.device());
  TORCH_CHECK(hw >= 1, "regnet_kernels (CUDA): hw must be >= 1, got ", hw);
  const at::Tensor sums = sums_in.contiguous();
  const int64_t c = sums.size(2), s = w1.size(0);
  for (const auto* t : {&w1, &b1, &w2, &b2}) {
    check_on(*t, sums, "an SE weight");
    TORCH_CHECK(t->scalar_type() == w1.scalar_type(),
                "regnet_kernels (CUDA): the SE weights and biases must share one dtype");
  }
  TORCH_CHECK(w1.size(1) == c && w2.size(0) == c && w2.size(1) == s && b1.numel() == s &&
                  b2.numel() == c,
              "regnet_kernels (CUDA): SE weights ", w1.sizes(), " / ", w2.sizes(),
              " do not fit ", c, " channels");
  const at::Tensor bias1 = b1.contiguous(), bias2 = b2.contiguous();
  const c10::cuda::CUDAGuard guard(sums.device());
  at::Tensor gate = at::empty({sums.size(0), c}, sums.options());

  rk_se_excite_args args{};
  args.sums = sums.data_ptr<float>();
  args.n = sums.size(0), args.t = sums.size(1), args.c = c, args.hw = hw;
  args.weight_dtype = to_rk(w1.scalar_type(), "w1");
  args.w1 = w1.data_ptr(), args.s = s, args.s1_o = w1.stride(0), args.s1_i = w1.stride(1);
  args.b1 = bias1.data_ptr();
  args.w2 = w2.data_ptr(), args.s2_o = w2.stride(0), args.s2_i = w2.stride(1);
  args.b2 = bias2.data_ptr();
  args.gate = gate.data_ptr<float>();
  check_launch(rk_se_excite(&args, c10::cuda::getCurrentCUDAStream()), "se_excite");
  return gate;
}

at::Tensor conv1x1_gate_residual(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& scale, const at::Tensor& shift,
                                 const std::optional<at::Tensor>& gate_in,
                                 const at::Tensor& shortcut,
                                 const std::optional<at::Tensor>& proj_weight,
                                 const std::optional<at::Tensor>& proj_scale,
                                 const std::optional<at::Tensor>& proj_shift,
                                 int64_t proj_stride) {
  check_activation(x, "x");
  check_activation(shortcut, "shortcut");
  check_on(weight, x, "weight");
  check_on(shortcut, x, "shortcut");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 &&
                  weight.size(3) == 1,
              "regnet_kernels (CUDA): weight must be (C_out, ", x.size(1), ", 1, 1), got ",
              weight.sizes());
  for (const auto* t : {&weight, &shortcut}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(),
                "regnet_kernels (CUDA): weight and shortcut must have x's dtype ",
                x.scalar_type());
  }
  const int64_t c_out = weight.size(0);
  const at::Tensor s = channel_vector(scale, c_out, x, "scale");
  const at::Tensor t = channel_vector(shift, c_out, x, "shift");
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv1x1_gate_residual_args args{};
  set_conv_input(args, x, weight);
  args.scale = s.data_ptr<float>(), args.shift = t.data_ptr<float>();
  args.sw_o = weight.stride(0), args.sw_i = weight.stride(1);

  at::Tensor gate;
  if (gate_in.has_value()) {
    check_on(*gate_in, x, "gate");
    TORCH_CHECK(gate_in->dim() == 2 && gate_in->size(0) == args.n && gate_in->size(1) == args.c_in,
                "regnet_kernels (CUDA): gate must be (", args.n, ", ", args.c_in, "), got ",
                gate_in->sizes());
    gate = gate_in->to(at::kFloat).contiguous();
    args.gate = gate.data_ptr<float>();
    args.s_gate_n = gate.stride(0);
  }

  args.res = shortcut.data_ptr();
  args.res_h = shortcut.size(2), args.res_w = shortcut.size(3), args.res_c = shortcut.size(1);
  args.sr_n = shortcut.stride(0), args.sr_h = shortcut.stride(2);
  args.sr_w = shortcut.stride(3), args.sr_c = shortcut.stride(1);
  at::Tensor ps, pt;
  if (proj_weight.has_value()) {
    const at::Tensor& pw = *proj_weight;
    check_on(pw, x, "proj_weight");
    TORCH_CHECK(proj_scale.has_value() && proj_shift.has_value(),
                "regnet_kernels (CUDA): proj_weight needs proj_scale and proj_shift");
    TORCH_CHECK(pw.dim() == 4 && pw.size(0) == c_out && pw.size(1) == args.res_c &&
                    pw.size(2) == 1 && pw.size(3) == 1 && pw.scalar_type() == x.scalar_type(),
                "regnet_kernels (CUDA): proj_weight must be (", c_out, ", ", args.res_c,
                ", 1, 1) in x's dtype, got ", pw.sizes(), " ", pw.scalar_type());
    TORCH_CHECK(proj_stride >= 1 && (args.res_h - 1) / proj_stride + 1 == args.h &&
                    (args.res_w - 1) / proj_stride + 1 == args.w,
                "regnet_kernels (CUDA): shortcut ", shortcut.sizes(), " with proj_stride ",
                proj_stride, " does not give x's ", args.h, "x", args.w, " pixels");
    ps = channel_vector(*proj_scale, c_out, x, "proj_scale");
    pt = channel_vector(*proj_shift, c_out, x, "proj_shift");
    args.proj_weight = pw.data_ptr();
    args.sp_o = pw.stride(0), args.sp_i = pw.stride(1);
    args.proj_scale = ps.data_ptr<float>(), args.proj_shift = pt.data_ptr<float>();
    args.proj_stride = proj_stride;
  } else {
    TORCH_CHECK(args.res_c == c_out && args.res_h == args.h && args.res_w == args.w &&
                    shortcut.size(0) == args.n,
                "regnet_kernels (CUDA): the identity shortcut must be (", args.n, ", ", c_out,
                ", ", args.h, ", ", args.w, "), got ", shortcut.sizes());
    args.proj_stride = 1;
  }
  at::Tensor y = new_activation(x, args.n, c_out, args.h, args.w);
  args.y = y.data_ptr();
  check_launch(rk_conv1x1_gate_residual(&args, c10::cuda::getCurrentCUDAStream()),
               "conv1x1_gate_residual");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_act_squeeze", &conv_bn_act_squeeze);
  m.impl("se_excite", &se_excite);
  m.impl("conv1x1_gate_residual", &conv1x1_gate_residual);
}

}  // namespace regnet_kernels::cuda
