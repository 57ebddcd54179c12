// The CUDA implementation of se_excite (schema in csrc/ops.cpp): tensors ->
// rk_se_excite_args (launchers.h) -> se_excite.cu.
#include "binding.h"

namespace regnet_kernels::cuda {
namespace {

at::Tensor se_excite(const at::Tensor& sums_in, int64_t hw, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  constexpr char op[] = "se_excite";
  RK_CHECK_CUDA(op, sums_in.is_cuda() && sums_in.dim() == 3 && sums_in.scalar_type() == at::kFloat,
                "sums must be a float32 CUDA tensor (N, T, C), got ",
                sums_in.scalar_type(), " ", sums_in.sizes(), " on ", sums_in.device());
  RK_CHECK_CUDA(op, hw >= 1, "hw must be >= 1, got ", hw);
  const at::Tensor sums = sums_in.contiguous();
  const int64_t c = sums.size(2), s = w1.size(0);
  for (const auto* t : {&w1, &b1, &w2, &b2}) {
    check_on(op, *t, sums, "an SE weight");
    RK_CHECK_CUDA(op, t->scalar_type() == w1.scalar_type(),
                  "the SE weights and biases must share one dtype");
  }
  RK_CHECK_CUDA(op, w1.size(1) == c && w2.size(0) == c && w2.size(1) == s && b1.numel() == s &&
                    b2.numel() == c,
                "SE weights ", w1.sizes(), " / ", w2.sizes(),
                " do not fit ", c, " channels");
  const at::Tensor bias1 = b1.contiguous(), bias2 = b2.contiguous();
  const c10::cuda::CUDAGuard guard(sums.device());
  at::Tensor gate = at::empty({sums.size(0), c}, sums.options());

  rk_se_excite_args args{};
  args.sums = sums.data_ptr<float>();
  args.n = sums.size(0), args.t = sums.size(1), args.c = c, args.hw = hw;
  args.weight_dtype = to_rk(op, w1.scalar_type(), "w1");
  args.w1 = w1.data_ptr(), args.s = s, args.s1_o = w1.stride(0), args.s1_i = w1.stride(1);
  args.b1 = bias1.data_ptr();
  args.w2 = w2.data_ptr(), args.s2_o = w2.stride(0), args.s2_i = w2.stride(1);
  args.b2 = bias2.data_ptr();
  args.gate = gate.data_ptr<float>();
  check_launch(op, rk_se_excite(&args, c10::cuda::getCurrentCUDAStream()), "se_excite");
  return gate;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("se_excite", &se_excite);
}

}  // namespace regnet_kernels::cuda
