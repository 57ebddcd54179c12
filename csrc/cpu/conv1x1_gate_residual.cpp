// conv1x1_gate_residual on the CPU.
//
// A 1x1 conv of an NHWC tensor is a GEMM on its (N * H * W, C) matrix view,
// so the convs are ATen GEMMs (MKL / oneDNN) writing NHWC directly:
//   - the SE gate is applied either by folding it into per-image weights,
//     W_n = W * gate[n] (then one batched GEMM), when that touches fewer values
//     (C_out <= H * W), or else by one vectorized pass x * gate[n] over the input;
//   - the projection shortcut is a second GEMM over the (strided) block input;
//   - BN scale/shift of both branches, the residual add and the final ReLU are one
//     parallel, vectorized pass over the GEMM output, in place, in fp32.
//
// Its .folded overload (conv1x1_bias_gate_residual here): the same with each
// BN's scale folded into its (prepacked) weight, as the fused models' eval forward
// runs it. The gate is one pass over the input (per-image gated weights could not be prepacked); the
// projection is a oneDNN conv reading the block input at its stride (no gather);
// the main conv, its bias, the residual add and the ReLU are one oneDNN primitive
// (onednn.h): no pass over the output.
#include "common.h"
#include "onednn.h"

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

namespace regnet_kernels::cpu {
namespace {

// x (N, HW, C) * gate[n, c]: a new NHWC tensor in x's dtype.
at::Tensor gate_input(const at::Tensor& x3, const at::Tensor& gate) {
  at::Tensor out = at::empty_like(x3);
  const int64_t n = x3.size(0), hw = x3.size(1), c = x3.size(2);
  const at::Tensor g = f32(gate);
  const float* pg = g.data_ptr<float>();
  REGNET_DISPATCH(x3.scalar_type(), "gate_input", [&] {
    const scalar_t* px = x3.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * hw, rows_grain(c), [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t r = begin; r < end; ++r) {
        const float* v = row_as_float(px + r * c, c, buf);
        const float* gr = pg + (r / hw) * c;
        scalar_t* o = po + r * c;
        for (int64_t k = 0; k < c; ++k) o[k] = static_cast<scalar_t>(v[k] * gr[k]);  // auto-vectorized
      }
    });
  });
  return out;
}

at::Tensor conv1x1_gate_residual(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& scale, const at::Tensor& shift,
                                 const std::optional<at::Tensor>& gate, const at::Tensor& shortcut,
                                 const std::optional<at::Tensor>& proj_weight,
                                 const std::optional<at::Tensor>& proj_scale,
                                 const std::optional<at::Tensor>& proj_shift, int64_t proj_stride) {
  constexpr char op[] = "conv1x1_gate_residual";
  check_cpu(op, x, "x");
  check_cpu(op, weight, "weight");
  check_cpu(op, shortcut, "shortcut");
  RK_CHECK_CPU(op, x.dim() == 4 && shortcut.dim() == 4, "x and shortcut must be 4-D");
  const int64_t n = x.size(0), c_b = x.size(1), ho = x.size(2), wo = x.size(3), hw = ho * wo;
  RK_CHECK_CPU(op, weight.dim() == 4 && weight.size(1) == c_b && weight.size(2) == 1 &&
                   weight.size(3) == 1,
               "weight must be (C_out, ", c_b, ", 1, 1), got ", weight.sizes());
  RK_CHECK_CPU(op, weight.scalar_type() == x.scalar_type() &&
                   shortcut.scalar_type() == x.scalar_type(),
               "weight and shortcut must have x's dtype ", x.scalar_type());
  const int64_t c_out = weight.size(0);
  check_channel_vector(op, scale, c_out, "scale");
  check_channel_vector(op, shift, c_out, "shift");
  const bool project = proj_weight.has_value();
  if (gate) {
    check_cpu(op, *gate, "gate");
    RK_CHECK_CPU(op, gate->dim() == 2 && gate->size(0) == n && gate->size(1) == c_b &&
                     gate->scalar_type() == at::kFloat,
                 "gate must be float32 (", n, ", ", c_b, "), got ", gate->sizes());
  }
  at::Tensor pw2, ps, pt, sc;
  if (project) {
    RK_CHECK_CPU(op, proj_scale && proj_shift, "a projection needs proj_scale/proj_shift");
    RK_CHECK_CPU(op, proj_stride >= 1, "proj_stride must be >= 1, got ", proj_stride);
    check_cpu(op, *proj_weight, "proj_weight");
    const int64_t c_in = shortcut.size(1);
    RK_CHECK_CPU(op, proj_weight->dim() == 4 && proj_weight->size(0) == c_out &&
                     proj_weight->size(1) == c_in && proj_weight->size(2) == 1 &&
                     proj_weight->size(3) == 1 && proj_weight->scalar_type() == x.scalar_type(),
                 "proj_weight must be (", c_out, ", ", c_in, ", 1, 1) of x's dtype, got ",
                 proj_weight->sizes());
    check_channel_vector(op, *proj_scale, c_out, "proj_scale");
    check_channel_vector(op, *proj_shift, c_out, "proj_shift");
    const int64_t h = shortcut.size(2), w = shortcut.size(3);
    RK_CHECK_CPU(op, shortcut.size(0) == n && (h - 1) / proj_stride + 1 == ho &&
                     (w - 1) / proj_stride + 1 == wo,
                 "a stride-", proj_stride, " projection of shortcut ", shortcut.sizes(),
                 " does not match x ", x.sizes());
    at::Tensor s = shortcut;
    if (proj_stride > 1) s = s.slice(2, 0, h, proj_stride).slice(3, 0, w, proj_stride);
    sc = nhwc(s);  // the strided pixels, gathered once (a view for stride 1 NHWC)
    pw2 = weight_matrix(*proj_weight);
    ps = f32(*proj_scale);
    pt = f32(*proj_shift);
  } else {
    RK_CHECK_CPU(op, !proj_scale && !proj_shift, "proj_scale/proj_shift without proj_weight");
    RK_CHECK_CPU(op, shortcut.sizes() == at::IntArrayRef({n, c_out, ho, wo}),
                 "identity shortcut must be (", n, ", ", c_out, ", ", ho, ", ", wo,
                 "), got ", shortcut.sizes());
    sc = nhwc(shortcut);
  }

  // Main GEMM: acc (N * HW, C_out), row-major = the NHWC output.
  const at::Tensor x3 = nhwc(x).permute({0, 2, 3, 1}).reshape({n, hw, c_b});
  const at::Tensor w2 = weight_matrix(weight);
  at::Tensor acc;
  if (n * hw == 0 || c_out == 0) {
    acc = at::empty({n, hw, c_out}, x.options());
  } else if (!gate) {
    acc = at::mm(x3.reshape({n * hw, c_b}), w2.t());
  } else if (c_out <= hw) {
    const at::Tensor wg = at::mul(w2.to(at::kFloat).unsqueeze(0), gate->unsqueeze(1)).to(x.scalar_type());
    acc = at::bmm(x3, wg.transpose(1, 2));
  } else {
    acc = at::mm(gate_input(x3, *gate).reshape({n * hw, c_b}), w2.t());
  }
  acc = acc.reshape({n * hw, c_out});
  at::Tensor out = nhwc_of_rows(acc, x);
  if (acc.numel() == 0) return out;

  at::Tensor p;  // projection GEMM output (N * HW, C_out), or the identity shortcut's NHWC rows
  if (project) {
    p = at::mm(rows_of(sc), pw2.t());
  } else {
    p = rows_of(sc);
  }
  p = p.contiguous();  // a no-op: both are dense row-major (N * HW, C_out)
  TORCH_INTERNAL_ASSERT(acc.is_contiguous());
  const at::Tensor s = f32(scale), t = f32(shift);
  const float *ps_ = s.data_ptr<float>(), *pt_ = t.data_ptr<float>();
  const float* pps = project ? ps.data_ptr<float>() : nullptr;
  const float* ppt = project ? pt.data_ptr<float>() : nullptr;

  REGNET_DISPATCH(acc.scalar_type(), "conv1x1_gate_residual", [&] {
    scalar_t* pa = acc.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    at::parallel_for(0, n * hw, rows_grain(c_out), [&](int64_t begin, int64_t end) {
      std::vector<float> buf, rbuf;
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = pa + r * c_out;
        float* v = row_as_float(row, c_out, buf);
        const float* rv = row_as_float(pp + r * c_out, c_out, rbuf);
        if (project) {
          affine_add_affine_relu_row(v, ps_, pt_, rv, pps, ppt, c_out, v);
        } else {
          affine_add_relu_row(v, ps_, pt_, rv, c_out, v);
        }
        store_row(row, v, c_out);
      }
    });
  });
  return out;
}

void check_bias(const char* op, const at::Tensor& bias, int64_t c, const at::Tensor& x,
                const char* name) {
  check_cpu(op, bias, name);
  RK_CHECK_CPU(op, bias.dim() == 1 && bias.size(0) == c && bias.scalar_type() == x.scalar_type(),
               name, " must be (", c, ",) of x's dtype, got ", bias.scalar_type(),
               " ", bias.sizes());
}

at::Tensor conv1x1_bias_gate_residual(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const std::optional<at::Tensor>& gate,
                                      const at::Tensor& shortcut,
                                      const std::optional<at::Tensor>& proj_weight,
                                      const std::optional<at::Tensor>& proj_bias,
                                      int64_t proj_stride) {
  constexpr char op[] = "conv1x1_gate_residual";
  const int64_t c_out = check_conv(op, x, weight, 1, 1);
  RK_CHECK_CPU(op, weight.size(2) == 1, "weight must be 1x1, got ", weight.sizes());
  check_bias(op, bias, c_out, x, "bias");
  check_cpu(op, shortcut, "shortcut");
  const int64_t n = x.size(0), c_b = x.size(1), ho = x.size(2), wo = x.size(3);
  at::Tensor input = nhwc(x);
  if (gate) {
    check_cpu(op, *gate, "gate");
    RK_CHECK_CPU(op, gate->dim() == 2 && gate->size(0) == n && gate->size(1) == c_b &&
                     gate->scalar_type() == at::kFloat,
                 "gate must be float32 (", n, ", ", c_b, "), got ", gate->sizes());
    const at::Tensor x3 = input.permute({0, 2, 3, 1}).reshape({n, ho * wo, c_b});
    input = gate_input(x3, *gate).view({n, ho, wo, c_b}).permute({0, 3, 1, 2});
  }
  at::Tensor residual;
  if (proj_weight) {
    RK_CHECK_CPU(op, proj_bias, "a projection needs proj_bias");
    RK_CHECK_CPU(op, check_conv(op, shortcut, *proj_weight, proj_stride, 1) == c_out &&
                     proj_weight->size(2) == 1,
                 "proj_weight must be (", c_out, ", C_in, 1, 1), got ",
                 proj_weight->sizes());
    check_bias(op, *proj_bias, c_out, x, "proj_bias");
    residual = onednn_conv(nhwc(shortcut), *proj_weight, proj_bias->contiguous(), proj_stride, 1,
                           /*relu=*/false);
  } else {
    RK_CHECK_CPU(op, !proj_bias, "proj_bias without proj_weight");
    residual = nhwc(shortcut);
  }
  RK_CHECK_CPU(op, residual.sizes() == at::IntArrayRef({n, c_out, ho, wo}) &&
                   residual.scalar_type() == x.scalar_type(),
               "the shortcut branch gives ", residual.sizes(), " ",
               residual.scalar_type(), ", the conv (", n, ", ", c_out, ", ", ho, ", ", wo, ") ",
               x.scalar_type());
  return nhwc(onednn_conv1x1_add_relu(input, weight, bias.contiguous(), residual));
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("conv1x1_gate_residual", &conv1x1_gate_residual);
  m.impl("conv1x1_gate_residual.folded", &conv1x1_bias_gate_residual);
}

// A prepacked weight is an MkldnnCPU tensor (see conv_bn_act.cpp).
TORCH_LIBRARY_IMPL(regnet_kernels, MkldnnCPU, m) {
  m.impl("conv1x1_gate_residual.folded", &conv1x1_bias_gate_residual);
}

}  // namespace regnet_kernels::cpu
