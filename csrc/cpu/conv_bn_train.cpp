// conv_bn_train, its backward and bn_update_running on the CPU: a training-mode
// conv + BatchNorm whose output stays lazy (see docs/ops.md, "Lazy BN outputs"):
// the raw conv output y plus per-channel batch statistics; the BN output
// v = y * scale + shift is applied by whichever op reads y, and in autograd the
// gradient that arrives for y is dL/dv.
//
// Forward
//   u = relu?(x * in_scale + in_shift) * gate      one vectorized pass, only with a prologue
//   y = conv(u, weight)                             ATen (oneDNN for channels_last); a 1x1
//                                                   stride-1 dense conv is one GEMM (at::mm)
//   mean, var of y per channel                      per-chunk mean and M2, Chan-merged
// Backward (M = N * Ho * Wo, everything per channel c)
//   d_beta = sum dv,  d_gamma = inv_std * sum dv * (y - mean)       one pass over (dv, y)
//   dy = scale * dv - scale * inv_std / M * d_gamma * (y - mean) - scale / M * d_beta
//                                                   one pass: BN's backward, written once
//   du, dw = conv_backward(dy, u, weight)           ATen (oneDNN), or two GEMMs for a 1x1;
//                                                   u recomputed from x
//   dv_prev = du * gate * relu'(x * in_scale + in_shift),  dgate = sum_hw du * relu?(...)
//                                                   one pass, in place over du
// Autograd saves the inputs, y and the statistics: no transformed or normalized tensor.
#include "common.h"

#include "bn_update_running.h"
#include "../rk_stats.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace regnet_kernels::cpu {
namespace {

// The conv input transform u = relu?(x * scale + shift) * gate[n], each part optional.
struct Prologue {
  at::Tensor scale, shift, gate;  // dense fp32, or undefined
  bool relu = false;

  Prologue(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
           const std::optional<at::Tensor>& in_shift, bool in_relu,
           const std::optional<at::Tensor>& in_gate)
      : relu(in_relu) {
    const int64_t n = x.size(0), c = x.size(1);
    RK_CHECK_CPU(op, in_scale.has_value() == in_shift.has_value(),
                 "pass both in_scale and in_shift, or neither");
    if (in_scale) {
      check_channel_vector(op, *in_scale, c, "in_scale");
      check_channel_vector(op, *in_shift, c, "in_shift");
      scale = f32(*in_scale);
      shift = f32(*in_shift);
    }
    if (in_gate) {
      check_cpu(op, *in_gate, "gate");
      RK_CHECK_CPU(op, in_gate->dim() == 2 && in_gate->size(0) == n && in_gate->size(1) == c &&
                       in_gate->scalar_type() == at::kFloat,
                   "gate must be float32 (", n, ", ", c, "), got ",
                   in_gate->scalar_type(), " ", in_gate->sizes());
      gate = in_gate->contiguous();
    }
  }

  bool active() const { return scale.defined() || gate.defined() || relu; }
  const float* s() const { return scale.defined() ? scale.data_ptr<float>() : nullptr; }
  const float* t() const { return shift.defined() ? shift.data_ptr<float>() : nullptr; }
  const float* g(int64_t img) const {
    return gate.defined() ? gate.data_ptr<float>() + img * gate.size(1) : nullptr;
  }
};

// u = relu?(x * s + t) * g over c channels (s with t, and g, may be null).
inline void prologue_row(const float* x, const float* s, const float* t, const float* g, bool relu,
                         int64_t c, float* u) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec v = Vec::loadu(x + i);
    if (s) v = v * Vec::loadu(s + i) + Vec::loadu(t + i);
    if (relu) v = at::vec::maximum(v, zero);
    if (g) v = v * Vec::loadu(g + i);
    v.store(u + i);
  }
  for (; i < c; ++i) {
    float v = x[i];
    if (s) v = v * s[i] + t[i];
    if (relu) v = std::max(v, 0.f);
    if (g) v *= g[i];
    u[i] = v;
  }
}

// The prologue's backward for one row, in place: given du = dL/du,
//   dgate += du * relu?(v)   (the gate's input; only with g)
//   du    <- du * g * relu'(v)          v = x * s + t (or x)
inline void prologue_backward_row(const float* x, const float* s, const float* t, const float* g,
                                  bool relu, int64_t c, float* du, float* dgate) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    Vec v = Vec::loadu(x + i);
    if (s) v = v * Vec::loadu(s + i) + Vec::loadu(t + i);
    Vec d = Vec::loadu(du + i);
    if (g) {
      const Vec a = relu ? at::vec::maximum(v, zero) : v;
      at::vec::fmadd(d, a, Vec::loadu(dgate + i)).store(dgate + i);
      d = d * Vec::loadu(g + i);
    }
    if (relu) d = Vec::blendv(zero, d, v > zero);
    d.store(du + i);
  }
  for (; i < c; ++i) {
    float v = x[i];
    if (s) v = v * s[i] + t[i];
    float d = du[i];
    if (g) {
      dgate[i] += d * (relu ? std::max(v, 0.f) : v);
      d *= g[i];
    }
    if (relu && !(v > 0.f)) d = 0.f;
    du[i] = d;
  }
}

// u = prologue(x) as a new NHWC tensor in x's dtype (rounded once), or x itself
// (NHWC) without a prologue. The conv then zero-pads u: padding is zero after the
// transform, as the Triton prologue does it.
at::Tensor conv_input(const at::Tensor& x, const Prologue& p) {
  const at::Tensor xc = nhwc(x);
  if (!p.active() || x.numel() == 0) return xc;
  at::Tensor u = at::empty_like(xc);
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  REGNET_DISPATCH(x.scalar_type(), "conv_input", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    scalar_t* pu = u.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * hw, rows_grain(c), [&](int64_t begin, int64_t end) {
      std::vector<float> xbuf, ubuf;
      for (int64_t r = begin; r < end; ++r) {
        float* out = row_out(pu + r * c, c, ubuf);
        prologue_row(row_as_float(px + r * c, c, xbuf), p.s(), p.t(), p.g(r / hw), p.relu, c, out);
        store_row(pu + r * c, out, c);
      }
    });
  });
  return u;
}

// Per-channel batch mean and biased variance of the (rows, c) matrix y. Each chunk
// keeps its mean and M2 = sum (y - chunk mean)^2 (a second pass over the chunk while
// it is in cache), and the chunks are merged with Chan's formula in chunk order: no
// E[y^2] - E[y]^2 cancellation, fp32 only, deterministic.
template <typename scalar_t>
void batch_mean_var(const scalar_t* y, int64_t rows, int64_t c, float* mean, float* var) {
  const auto part = chunk_partials(1, rows, 2 * c, [&](int64_t r0, int64_t r1, float* acc) {
    float *cmean = acc, *m2 = acc + c;
    std::vector<float> buf;
    for (int64_t r = r0; r < r1; ++r) add_row(cmean, row_as_float(y + r * c, c, buf), c);
    const float inv_rows = 1.f / static_cast<float>(r1 - r0);
    for (int64_t i = 0; i < c; ++i) cmean[i] *= inv_rows;
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = row_as_float(y + r * c, c, buf);
      int64_t i = 0;
      for (; i + Vec::size() <= c; i += Vec::size()) {
        const Vec d = Vec::loadu(v + i) - Vec::loadu(cmean + i);
        at::vec::fmadd(d, d, Vec::loadu(m2 + i)).store(m2 + i);
      }
      for (; i < c; ++i) m2[i] += (v[i] - cmean[i]) * (v[i] - cmean[i]);
    }
  });
  std::vector<float> m2(c, 0.f);
  std::fill(mean, mean + c, 0.f);
  float n_a = 0.f;
  for (int64_t k = 0; k < chunks_of(rows); ++k) {
    const float n_b = static_cast<float>(std::min(kChunkRows, rows - k * kChunkRows));
    const float n = n_a + n_b, w_b = n_b / n, w_m2 = n_a * n_b / n;
    const float *cmean = part.data() + k * 2 * c, *cm2 = cmean + c;
    for (int64_t i = 0; i < c; ++i) {  // auto-vectorized
      const float delta = cmean[i] - mean[i];
      mean[i] += delta * w_b;
      m2[i] += cm2[i] + delta * delta * w_m2;
    }
    n_a = n;
  }
  for (int64_t i = 0; i < c; ++i) var[i] = m2[i] / static_cast<float>(rows);
}

std::tuple<at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps,
    const std::optional<at::Tensor>& frozen_stats) {
  constexpr char op[] = "conv_bn_train";
  const int64_t c_out = check_conv(op, x, weight, stride, groups);
  const Prologue prologue(op, x, in_scale, in_shift, in_relu, gate);
  RK_CHECK_CPU(op, bn_weight.has_value() == bn_bias.has_value(),
               "pass both BN weight and bias, or neither");
  // gamma and beta are the BN module's parameters, in its dtype (read as fp32).
  for (const auto& [t, name] : {std::pair{&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"}}) {
    if (!t->has_value()) continue;
    check_cpu(op, **t, name);
    RK_CHECK_CPU(op, (*t)->dim() == 1 && (*t)->size(0) == c_out && (*t)->is_floating_point(),
                 name, " must be a floating-point (", c_out, ",) vector, got ",
                 (*t)->scalar_type(), " ", (*t)->sizes());
  }
  const int64_t pad = weight.size(2) / 2;
  const at::Tensor u = conv_input(x, prologue);
  at::Tensor y = is_gemm_conv(weight, stride, groups)
                     ? nhwc_of_rows(at::mm(rows_of(u), weight_matrix(weight).t()), u)
                     : nhwc(at::convolution(u, weight, std::nullopt, {stride, stride},
                                            {pad, pad}, {1, 1}, false, {0, 0}, groups));
  if (frozen_stats) {  // an eval-mode BN: the running statistics, given as (5, C) rows
    check_cpu(op, *frozen_stats, "frozen_stats");
    RK_CHECK_CPU(op, frozen_stats->sizes() == at::IntArrayRef({int64_t{RK_STAT_ROWS}, c_out}) &&
                     frozen_stats->scalar_type() == at::kFloat,
                 "frozen_stats must be float32 (5, ", c_out, "), got ",
                 frozen_stats->sizes());
    return {y, frozen_stats->clone()};
  }
  const int64_t rows = y.size(0) * y.size(2) * y.size(3);
  RK_CHECK_CPU(op, rows > 1, "BatchNorm in training needs more than 1 value per "
               "channel, got ", rows);

  at::Tensor stats = at::empty({int64_t{RK_STAT_ROWS}, c_out}, x.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  float *mean = st + RK_STAT_MEAN * c_out, *var = st + RK_STAT_VAR * c_out;
  REGNET_DISPATCH(y.scalar_type(), "conv_bn_train", [&] {
    batch_mean_var(y.data_ptr<scalar_t>(), rows, c_out, mean, var);
  });
  // The folded affine the next op applies as it loads y: v = y * scale + shift.
  const at::Tensor gamma = bn_weight ? f32(*bn_weight) : at::Tensor();
  const at::Tensor beta = bn_bias ? f32(*bn_bias) : at::Tensor();
  for (int64_t c = 0; c < c_out; ++c) {
    const float inv_std = 1.f / std::sqrt(var[c] + static_cast<float>(eps));
    const float scale = gamma.defined() ? gamma.data_ptr<float>()[c] * inv_std : inv_std;
    st[RK_STAT_INV_STD * c_out + c] = inv_std;
    st[RK_STAT_SCALE * c_out + c] = scale;
    st[RK_STAT_SHIFT * c_out + c] = (beta.defined() ? beta.data_ptr<float>()[c] : 0.f) - mean[c] * scale;
  }
  return {y, stats};
}

// The BN backward's per-channel sums over all rows: sums[0:c] = sum dv,
// sums[c:2c] = sum dv * (y - mean) (centered: no cancellation against mean * sum dv).
template <typename scalar_t>
void bn_backward_sums(const scalar_t* dv, const scalar_t* y, const float* mean, int64_t rows,
                      int64_t c, float* sums) {
  const auto part = chunk_partials(1, rows, 2 * c, [&](int64_t r0, int64_t r1, float* acc) {
    std::vector<float> gbuf, ybuf;
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = row_as_float(dv + r * c, c, gbuf);
      const float* v = row_as_float(y + r * c, c, ybuf);
      int64_t i = 0;
      for (; i + Vec::size() <= c; i += Vec::size()) {
        const Vec gv = Vec::loadu(g + i);
        (Vec::loadu(acc + i) + gv).store(acc + i);
        at::vec::fmadd(gv, Vec::loadu(v + i) - Vec::loadu(mean + i), Vec::loadu(acc + c + i))
            .store(acc + c + i);
      }
      for (; i < c; ++i) {
        acc[i] += g[i];
        acc[c + i] += g[i] * (v[i] - mean[i]);
      }
    }
  });
  sum_partials(part, 1, chunks_of(rows), 2 * c, sums);
}

// dy = a * dv + b * (y - mean) + k over c channels.
inline void bn_backward_row(const float* dv, const float* y, const float* mean, const float* a,
                            const float* b, const float* k, int64_t c, float* dy) {
  int64_t i = 0;
  for (; i + Vec::size() <= c; i += Vec::size()) {
    const Vec yc = Vec::loadu(y + i) - Vec::loadu(mean + i);
    (Vec::loadu(a + i) * Vec::loadu(dv + i) + Vec::loadu(b + i) * yc + Vec::loadu(k + i))
        .store(dy + i);
  }
  for (; i < c; ++i) dy[i] = a[i] * dv[i] + b[i] * (y[i] - mean[i]) + k[i];
}

// Returns (grad_x, grad_weight, grad_gate, grad_gamma, grad_beta). output_mask =
// (x and gate, weight): the masked-off gradients are empty (0,) tensors, as is
// grad_gate without a gate. grad_x is dL/dv_prev when x is a lazy BN output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& stats, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, bool frozen,
    std::array<bool, 2> output_mask, const std::optional<at::Tensor>& bn_grads) {
  constexpr char op[] = "conv_bn_train_backward";
  const int64_t c_out = check_conv(op, x, weight, stride, groups);
  const Prologue prologue(op, x, in_scale, in_shift, in_relu, gate);
  check_cpu(op, grad_v, "grad");
  check_cpu(op, y, "y");
  const int64_t pad = weight.size(2) / 2, k = weight.size(2);
  const int64_t ho = (x.size(2) + 2 * pad - k) / stride + 1;
  const int64_t wo = (x.size(3) + 2 * pad - k) / stride + 1;
  RK_CHECK_CPU(op, y.sizes() == at::IntArrayRef({x.size(0), c_out, ho, wo}) &&
                   y.scalar_type() == x.scalar_type(),
               "y must be the conv output (", x.size(0), ", ", c_out, ", ", ho, ", ",
               wo, ") of x's dtype, got ", y.scalar_type(), " ", y.sizes());
  RK_CHECK_CPU(op, grad_v.sizes() == y.sizes() && grad_v.scalar_type() == y.scalar_type(),
               "grad must have y's shape and dtype, got ", grad_v.scalar_type(), " ",
               grad_v.sizes());
  check_cpu(op, stats, "stats");
  RK_CHECK_CPU(op, stats.sizes() == at::IntArrayRef({int64_t{RK_STAT_ROWS}, c_out}) &&
                   stats.scalar_type() == at::kFloat,
               "stats must be float32 (5, ", c_out, "), got ", stats.sizes());
  const int64_t rows = y.size(0) * ho * wo;
  RK_CHECK_CPU(op, frozen || rows > 1,
               "BatchNorm statistics need more than 1 value per channel");

  const at::Tensor g = nhwc(grad_v), yc = nhwc(y), st = stats.contiguous();
  const float* mean = st.data_ptr<float>() + RK_STAT_MEAN * c_out;
  const float* inv_std = st.data_ptr<float>() + RK_STAT_INV_STD * c_out;
  const float* scale = st.data_ptr<float>() + RK_STAT_SCALE * c_out;

  at::Tensor d_beta, d_gamma;
  if (bn_grads) {  // SyncBatchNorm: the reductions over every rank, given
    check_cpu(op, *bn_grads, "bn_grads");
    RK_CHECK_CPU(op, bn_grads->sizes() == at::IntArrayRef({2, c_out}) &&
                     bn_grads->scalar_type() == at::kFloat,
                 "bn_grads must be float32 (2, ", c_out, "), got ",
                 bn_grads->scalar_type(), " ", bn_grads->sizes());
    d_beta = (*bn_grads)[0].contiguous();
    d_gamma = (*bn_grads)[1].contiguous();
  } else {
    at::Tensor sums = at::empty({2, c_out}, stats.options());
    REGNET_DISPATCH(y.scalar_type(), "conv_bn_train_backward", [&] {
      bn_backward_sums(g.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), mean, rows, c_out,
                       sums.data_ptr<float>());
    });
    d_beta = sums[0].clone();
    d_gamma = at::mul(sums[1], st[RK_STAT_INV_STD]);
  }
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  if (!output_mask[0] && !output_mask[1]) {
    return {empty(x), empty(weight), empty(stats), d_gamma, d_beta};
  }

  // BN's backward: dy = a * dv + b * (y - mean) + k, per channel; frozen (running)
  // statistics are constants: b = k = 0.
  std::vector<float> b(c_out, 0.f), kk(c_out, 0.f);
  const float* dg = d_gamma.data_ptr<float>();
  const float* db = d_beta.data_ptr<float>();
  const float inv_rows = 1.f / static_cast<float>(rows);
  for (int64_t c = 0; c < c_out && !frozen; ++c) {
    b[c] = -scale[c] * inv_std[c] * dg[c] * inv_rows;
    kk[c] = -scale[c] * db[c] * inv_rows;
  }
  at::Tensor dy = at::empty_like(yc);
  REGNET_DISPATCH(y.scalar_type(), "bn_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *py = yc.data_ptr<scalar_t>();
    scalar_t* pd = dy.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(c_out), [&](int64_t begin, int64_t end) {
      std::vector<float> gbuf, ybuf, dbuf;
      for (int64_t r = begin; r < end; ++r) {
        float* out = row_out(pd + r * c_out, c_out, dbuf);
        bn_backward_row(row_as_float(pg + r * c_out, c_out, gbuf),
                        row_as_float(py + r * c_out, c_out, ybuf), mean, scale, b.data(),
                        kk.data(), c_out, out);
        store_row(pd + r * c_out, out, c_out);
      }
    });
  });

  // dgrad and wgrad: two GEMMs for a 1x1 conv, else oneDNN; wgrad reads the recomputed
  // conv input u.
  const at::Tensor u = output_mask[1] ? conv_input(x, prologue) : nhwc(x);
  at::Tensor du, dw;
  if (is_gemm_conv(weight, stride, groups)) {
    const at::Tensor dy_rows = rows_of(dy);
    if (output_mask[0]) du = nhwc_of_rows(at::mm(dy_rows, weight_matrix(weight)), x);
    if (output_mask[1]) dw = at::mm(dy_rows.t(), rows_of(u)).view(weight.sizes());
  } else {
    std::tie(du, dw, std::ignore) = at::convolution_backward(
        dy, u, weight, std::nullopt, {stride, stride}, {pad, pad}, {1, 1}, false, {0, 0},
        groups, {output_mask[0], output_mask[1], false});
  }
  // In the weight's own strides: the layout contract DDP's gradient buckets expect (a 1x1
  // weight's contiguous() keeps oneDNN's strides on its size-1 dims).
  at::Tensor grad_w = empty(weight);
  if (output_mask[1]) grad_w = at::empty_like(weight).copy_(dw);
  if (!output_mask[0]) return {empty(x), grad_w, empty(stats), d_gamma, d_beta};

  at::Tensor grad_x = nhwc(du);
  at::Tensor grad_gate = prologue.gate.defined()
                             ? at::empty({x.size(0), x.size(1)}, stats.options())
                             : empty(stats);
  if (prologue.active() && x.numel() > 0) {
    // dL/dv_prev in place over du, and the gate's gradient as per-image sums.
    const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
    const at::Tensor xc = nhwc(x);
    const bool gated = prologue.gate.defined();
    REGNET_DISPATCH(x.scalar_type(), "conv_bn_train_prologue_backward", [&] {
      const scalar_t* px = xc.data_ptr<scalar_t>();
      scalar_t* pd = grad_x.data_ptr<scalar_t>();
      const auto part = chunk_partials(n, hw, gated ? c : 0, [&](int64_t r0, int64_t r1,
                                                                 float* dgate) {
        std::vector<float> xbuf, dbuf;
        for (int64_t r = r0; r < r1; ++r) {
          float* d = row_as_float(pd + r * c, c, dbuf);
          prologue_backward_row(row_as_float(px + r * c, c, xbuf), prologue.s(), prologue.t(),
                                prologue.g(r / hw), prologue.relu, c, d, dgate);
          store_row(pd + r * c, d, c);
        }
      });
      if (gated) sum_partials(part, n, chunks_of(hw), c, grad_gate.data_ptr<float>());
    });
  }
  return {grad_x, grad_w, grad_gate, d_gamma, d_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) {
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("bn_update_running", &bn_update_running<check_cpu>);
}

}  // namespace regnet_kernels::cpu
