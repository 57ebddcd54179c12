// conv_bn_act / conv_bn_act_squeeze on the CPU.
//
// The k x k grouped conv runs through ATen (oneDNN for channels_last input);
// BN scale/shift, ReLU and the SE squeeze are then one parallel, vectorized
// pass over the conv output, in place, while each row is in cache.
#include "common.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace regnet_kernels::cpu {
namespace {

// Pixel rows per SE-squeeze chunk: fixed by the shape (never by the thread
// count), so the chunk sums, reduced in chunk order, are the same run to run.
constexpr int64_t kSqueezeRows = 64;

std::tuple<at::Tensor, at::Tensor> conv_bn_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& scale, const at::Tensor& shift,
                                                    int64_t stride, int64_t groups, bool relu,
                                                    bool squeeze) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  TORCH_CHECK(x.dim() == 4, "regnet_kernels: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "regnet_kernels: weight must be (C_out, C_in / groups, k, k) with odd k, got ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "regnet_kernels: weight has dtype ",
              weight.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(stride >= 1, "regnet_kernels: stride must be >= 1, got ", stride);
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0 && weight.size(1) * groups == x.size(1),
              "regnet_kernels: weight ", weight.sizes(), " with groups=", groups, " does not fit ",
              x.size(1), " input channels");
  const int64_t c_out = weight.size(0);
  check_channel_vector(scale, c_out, "scale");
  check_channel_vector(shift, c_out, "shift");
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
    if (!squeeze) {
      at::parallel_for(0, n * hw, rows_grain(c_out), [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = yp + r * c_out;
          float* v = row_as_float(row, c_out, buf);
          affine_row(v, s, t, c_out, relu, nullptr);
          store_row(row, v, c_out);
        }
      });
      return;
    }
    // Squeeze: per-(image, chunk) partial sums, then a fixed-order reduction.
    const int64_t chunks = (hw + kSqueezeRows - 1) / kSqueezeRows;
    std::vector<float> partial(static_cast<size_t>(n * chunks * c_out), 0.f);
    at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t img = item / chunks, r0 = (item % chunks) * kSqueezeRows;
        const int64_t r1 = std::min(hw, r0 + kSqueezeRows);
        float* acc = partial.data() + item * c_out;
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = yp + (img * hw + r) * c_out;
          float* v = row_as_float(row, c_out, buf);
          affine_row(v, s, t, c_out, relu, acc);
          store_row(row, v, c_out);
        }
      }
    });
    float* out = sums.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t img = begin; img < end; ++img) {
        float* dst = out + img * c_out;
        for (int64_t k = 0; k < chunks; ++k) {
          const float* src = partial.data() + (img * chunks + k) * c_out;
          for (int64_t c = 0; c < c_out; ++c) dst[c] += src[c];
        }
      }
    });
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

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_act_squeeze", &conv_bn_act_squeeze);
}

}  // namespace regnet_kernels::cpu
