// conv_bn_act / conv_bn_act_squeeze on the CPU.
//
// The k x k grouped conv runs through ATen (oneDNN for channels_last input);
// BN scale/shift, ReLU and the SE squeeze are then one parallel, vectorized
// pass over the conv output, in place, while each row is in cache.
//
// Their .folded overloads (conv_bias_act here): the same with the BN scale already
// folded into the (prepacked) weight, as the fused models' eval forward runs
// them: conv, bias (the BN shift) and ReLU are one oneDNN primitive (onednn.h);
// the squeeze, which oneDNN has no post-op for, is one read-only pass.
#include "common.h"
#include "onednn.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace regnet_kernels::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> conv_bn_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& scale, const at::Tensor& shift,
                                                    int64_t stride, int64_t groups, bool relu,
                                                    bool squeeze) {
  constexpr char op[] = "conv_bn_act";
  const int64_t c_out = check_conv(op, x, weight, stride, groups);
  check_channel_vector(op, scale, c_out, "scale");
  check_channel_vector(op, shift, c_out, "shift");
  const int64_t pad = weight.size(2) / 2;

  at::Tensor y = nhwc(at::convolution(nhwc(x), weight, std::nullopt, {stride, stride}, {pad, pad},
                                      {1, 1}, false, {0, 0}, groups));
  const int64_t n = y.size(0), hw = y.size(2) * y.size(3);
  at::Tensor sums = at::zeros({squeeze ? n : 0, 1, c_out}, x.options().dtype(at::kFloat));
  if (y.numel() == 0) return {y, sums};
  const at::Tensor sc = f32(scale), sh = f32(shift);
  const float* s = sc.data_ptr<float>();
  const float* t = sh.data_ptr<float>();

  REGNET_DISPATCH(y.scalar_type(), "conv_bn_act", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    // The epilogue over rows [r0, r1), in place; acc (the squeeze) gets their sums.
    const auto epilogue = [&](int64_t r0, int64_t r1, float* acc) {
      std::vector<float> buf;
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = yp + r * c_out;
        float* v = row_as_float(row, c_out, buf);
        affine_row(v, s, t, c_out, relu, acc, v);
        store_row(row, v, c_out);
      }
    };
    if (!squeeze) {
      at::parallel_for(0, n * hw, rows_grain(c_out),
                       [&](int64_t begin, int64_t end) { epilogue(begin, end, nullptr); });
      return;
    }
    // Squeeze: per-(image, chunk) partial sums, reduced in chunk order.
    const auto partial = chunk_partials(n, hw, c_out, epilogue);
    sum_partials(partial, n, chunks_of(hw), c_out, sums.data_ptr<float>());
  });
  return {y, sums};
}

at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& shift, int64_t stride, int64_t groups, bool relu) {
  return std::get<0>(conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, false));
}

std::tuple<at::Tensor, at::Tensor> conv_bn_act_squeeze(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& scale,
                                                       const at::Tensor& shift, int64_t stride,
                                                       int64_t groups, bool relu) {
  return conv_bn_act_impl(x, weight, scale, shift, stride, groups, relu, true);
}

// fp32 per-image channel sums (N, 1, C) of an NHWC tensor, in a fixed chunk order.
at::Tensor channel_sums(const at::Tensor& y) {
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  at::Tensor sums = at::zeros({n, 1, c}, y.options().dtype(at::kFloat));
  if (y.numel() == 0) return sums;
  REGNET_DISPATCH(y.scalar_type(), "channel_sums", [&] {
    const scalar_t* py = y.data_ptr<scalar_t>();
    const auto partial = chunk_partials(n, hw, c, [&](int64_t r0, int64_t r1, float* acc) {
      std::vector<float> buf;
      for (int64_t r = r0; r < r1; ++r) add_row(acc, row_as_float(py + r * c, c, buf), c);
    });
    sum_partials(partial, n, chunks_of(hw), c, sums.data_ptr<float>());
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor> conv_bias_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor& bias, int64_t stride,
                                                      int64_t groups, bool relu, bool squeeze) {
  constexpr char op[] = "conv_bn_act";
  const int64_t c_out = check_conv(op, x, weight, stride, groups);
  check_cpu(op, bias, "bias");
  RK_CHECK_CPU(op, bias.dim() == 1 && bias.size(0) == c_out &&
                   bias.scalar_type() == x.scalar_type(),
               "bias must be (", c_out, ",) of x's dtype, got ", bias.scalar_type(),
               " ", bias.sizes());
  at::Tensor y = nhwc(onednn_conv(nhwc(x), weight, bias.contiguous(), stride, groups, relu));
  if (!squeeze) return {y, at::zeros({0, 1, c_out}, x.options().dtype(at::kFloat))};
  return {y, channel_sums(y)};
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         int64_t stride, int64_t groups, bool relu) {
  return std::get<0>(conv_bias_act_impl(x, weight, bias, stride, groups, relu, false));
}

std::tuple<at::Tensor, at::Tensor> conv_bias_act_squeeze(const at::Tensor& x, const at::Tensor& weight,
                                                         const at::Tensor& bias, int64_t stride,
                                                         int64_t groups, bool relu) {
  return conv_bias_act_impl(x, weight, bias, stride, groups, relu, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_act_squeeze", &conv_bn_act_squeeze);
  m.impl("conv_bn_act.folded", &conv_bias_act);
  m.impl("conv_bn_act_squeeze.folded", &conv_bias_act_squeeze);
}

// A prepacked weight is an MkldnnCPU tensor, and the dispatcher picks the kernel by
// the highest key among the arguments: the same kernels serve that key.
TORCH_LIBRARY_IMPL(regnet_kernels, MkldnnCPU, m) {
  m.impl("conv_bn_act.folded", &conv_bias_act);
  m.impl("conv_bn_act_squeeze.folded", &conv_bias_act_squeeze);
}

}  // namespace regnet_kernels::cpu
