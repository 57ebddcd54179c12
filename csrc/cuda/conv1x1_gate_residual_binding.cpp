// The CUDA implementation of conv1x1_gate_residual (schema in csrc/ops.cpp): tensors ->
// rk_conv1x1_gate_residual_args (launchers.h) -> conv1x1_gate_residual.cu.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

at::Tensor conv1x1_gate_residual(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& scale, const at::Tensor& shift,
                                 const std::optional<at::Tensor>& gate_in,
                                 const at::Tensor& shortcut,
                                 const std::optional<at::Tensor>& proj_weight,
                                 const std::optional<at::Tensor>& proj_scale,
                                 const std::optional<at::Tensor>& proj_shift,
                                 int64_t proj_stride) {
  constexpr char op[] = "conv1x1_gate_residual";
  check_activation(op, x, "x");
  check_activation(op, shortcut, "shortcut");
  check_on(op, weight, x, "weight");
  check_on(op, shortcut, x, "shortcut");
  RK_CHECK_CUDA(op, weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 &&
                    weight.size(3) == 1,
                "weight must be (C_out, ", x.size(1), ", 1, 1), got ",
                weight.sizes());
  for (const auto* t : {&weight, &shortcut}) {
    RK_CHECK_CUDA(op, t->scalar_type() == x.scalar_type(),
                  "weight and shortcut must have x's dtype ",
                  x.scalar_type());
  }
  const int64_t c_out = weight.size(0);
  const at::Tensor s = channel_vector(op, scale, c_out, x, "scale");
  const at::Tensor t = channel_vector(op, shift, c_out, x, "shift");
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv1x1_gate_residual_args args{};
  set_conv_input(op, args, x, weight);
  args.scale = s.data_ptr<float>(), args.shift = t.data_ptr<float>();
  args.sw_o = weight.stride(0), args.sw_i = weight.stride(1);

  at::Tensor gate;
  if (gate_in.has_value()) {
    check_on(op, *gate_in, x, "gate");
    RK_CHECK_CUDA(op, gate_in->dim() == 2 && gate_in->size(0) == args.n &&
                      gate_in->size(1) == args.c_in,
                  "gate must be (", args.n, ", ", args.c_in, "), got ",
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
    check_on(op, pw, x, "proj_weight");
    RK_CHECK_CUDA(op, proj_scale.has_value() && proj_shift.has_value(),
                  "proj_weight needs proj_scale and proj_shift");
    RK_CHECK_CUDA(op, pw.dim() == 4 && pw.size(0) == c_out && pw.size(1) == args.res_c &&
                      pw.size(2) == 1 && pw.size(3) == 1 && pw.scalar_type() == x.scalar_type(),
                  "proj_weight must be (", c_out, ", ", args.res_c,
                  ", 1, 1) in x's dtype, got ", pw.sizes(), " ", pw.scalar_type());
    RK_CHECK_CUDA(op, proj_stride >= 1 && (args.res_h - 1) / proj_stride + 1 == args.h &&
                      (args.res_w - 1) / proj_stride + 1 == args.w,
                  "shortcut ", shortcut.sizes(), " with proj_stride ",
                  proj_stride, " does not give x's ", args.h, "x", args.w, " pixels");
    ps = channel_vector(op, *proj_scale, c_out, x, "proj_scale");
    pt = channel_vector(op, *proj_shift, c_out, x, "proj_shift");
    args.proj_weight = pw.data_ptr();
    args.sp_o = pw.stride(0), args.sp_i = pw.stride(1);
    args.proj_scale = ps.data_ptr<float>(), args.proj_shift = pt.data_ptr<float>();
    args.proj_stride = proj_stride;
  } else {
    RK_CHECK_CUDA(op, args.res_c == c_out && args.res_h == args.h && args.res_w == args.w &&
                      shortcut.size(0) == args.n,
                  "the identity shortcut must be (", args.n, ", ", c_out,
                  ", ", args.h, ", ", args.w, "), got ", shortcut.sizes());
    args.proj_stride = 1;
  }
  at::Tensor y = new_activation(x, args.n, c_out, args.h, args.w);
  args.y = y.data_ptr();
  check_launch(op, rk_conv1x1_gate_residual(&args, c10::cuda::getCurrentCUDAStream()),
               "conv1x1_gate_residual");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("conv1x1_gate_residual", &conv1x1_gate_residual);
}

}  // namespace regnet_kernels::cuda
