// The CUDA implementations of the training ops (schemas in csrc/ops.cpp, semantics as
// the C++ CPU ones in csrc/cpu/conv_bn_train.cpp and the Triton ones): tensors ->
// train_launchers.h argument structs. Autograd is registered in C++ (csrc/autograd.cpp)
// over these functional pieces, for every device.
//
// conv_bn_train            rk_conv_train (y + per-tile statistics) -> rk_bn_finalize
// conv_bn_train_backward   rk_bn_backward_sums -> rk_bn_backward_dy -> rk_conv_wgrad and
//                          rk_conv_dgrad (the prologue's backward in its epilogue)
// bn_update_running        ATen ops on per-channel vectors (csrc/bn_update_running.h)
#include "binding.h"
#include "bn_update_running.h"
#include "train_launchers.h"

namespace regnet_kernels::cuda {
namespace {

at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor empty_like_vector(const at::Tensor& like) { return at::empty({0}, like.options()); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// The conv input prologue u = relu?(x * in_scale + in_shift) * gate, as fp32 tensors
// kept alive for the launch, and its launcher struct.
struct Prologue {
  at::Tensor scale, shift, gate;
  rk_prologue args{};

  Prologue(const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
           const std::optional<at::Tensor>& in_shift, bool in_relu,
           const std::optional<at::Tensor>& in_gate) {
    TORCH_CHECK(in_scale.has_value() == in_shift.has_value(),
                "regnet_kernels (CUDA): pass both in_scale and in_shift, or neither");
    const int64_t n = x.size(0), c = x.size(1);
    if (in_scale) {
      scale = channel_vector(*in_scale, c, x, "in_scale");
      shift = channel_vector(*in_shift, c, x, "in_shift");
      args.in_scale = scale.data_ptr<float>();
      args.in_shift = shift.data_ptr<float>();
    }
    args.in_relu = in_relu ? 1 : 0;
    if (in_gate) {
      check_on(*in_gate, x, "gate");
      TORCH_CHECK(in_gate->dim() == 2 && in_gate->size(0) == n && in_gate->size(1) == c &&
                      in_gate->scalar_type() == at::kFloat,
                  "regnet_kernels (CUDA): gate must be float32 (", n, ", ", c, "), got ",
                  in_gate->scalar_type(), " ", in_gate->sizes());
      gate = in_gate->contiguous();
      args.gate = gate.data_ptr<float>();
      args.s_gate_n = gate.stride(0);
    }
  }
};

void check_stats(const at::Tensor& stats, const at::Tensor& x, int64_t c, const char* name) {
  check_on(stats, x, name);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({RK_STAT_ROWS, c}) &&
                  stats.scalar_type() == at::kFloat,
              "regnet_kernels (CUDA): ", name, " must be float32 (5, ", c, "), got ",
              stats.scalar_type(), " ", stats.sizes());
}

std::tuple<at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps,
    const std::optional<at::Tensor>& frozen_stats) {
  check_conv(x, weight, stride, groups);
  const Prologue prologue(x, in_scale, in_shift, in_relu, gate);
  TORCH_CHECK(bn_weight.has_value() == bn_bias.has_value(),
              "regnet_kernels (CUDA): pass both BN weight and bias, or neither");
  const int64_t c_out = weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv_train_args args{};
  set_kxk_conv_input(args, x, weight);
  args.stride = stride, args.groups = groups;
  args.prologue = prologue.args;
  rk_conv_train_plan_t plan{};
  check_launch(rk_conv_train_plan(&args, &plan), "conv_bn_train (plan)");
  at::Tensor y = new_activation(x, args.n, c_out, plan.out_h, plan.out_w);
  args.y = y.data_ptr();

  if (frozen_stats) {  // an eval-mode BN: the running statistics, given as (5, C) rows
    check_stats(*frozen_stats, x, c_out, "frozen_stats");
    check_launch(rk_conv_train(&args, stream()), "conv_bn_train");
    return {y, frozen_stats->clone()};
  }
  const int64_t rows = args.n * plan.out_h * plan.out_w;
  TORCH_CHECK(rows > 1, "regnet_kernels: BatchNorm in training needs more than 1 value per "
              "channel, got ", rows);
  at::Tensor partials = at::empty({plan.tiles_m, 2, c_out}, x.options().dtype(at::kFloat));
  args.partials = partials.data_ptr<float>();
  check_launch(rk_conv_train(&args, stream()), "conv_bn_train");

  at::Tensor gamma, beta;
  if (bn_weight) {
    gamma = channel_vector(*bn_weight, c_out, x, "bn_weight");
    beta = channel_vector(*bn_bias, c_out, x, "bn_bias");
  }
  at::Tensor stats = at::empty({RK_STAT_ROWS, c_out}, x.options().dtype(at::kFloat));
  rk_bn_finalize_args fin{};
  fin.partials = partials.data_ptr<float>();
  fin.tiles = plan.tiles_m, fin.c = c_out, fin.rows = rows, fin.block_m = plan.block_m;
  fin.gamma = gamma.defined() ? gamma.data_ptr<float>() : nullptr;
  fin.beta = beta.defined() ? beta.data_ptr<float>() : nullptr;
  fin.eps = eps;
  fin.stats = stats.data_ptr<float>();
  check_launch(rk_bn_finalize(&fin, stream()), "bn_finalize");
  return {y, stats};
}

// Returns (grad_x, grad_weight, grad_gate, grad_gamma, grad_beta) as the CPU op does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& stats, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, bool frozen,
    std::array<bool, 2> output_mask, const std::optional<at::Tensor>& bn_grads) {
  check_conv(x, weight, stride, groups);
  const Prologue prologue(x, in_scale, in_shift, in_relu, gate);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t c_out = weight.size(0), k = weight.size(2);
  const int64_t pad = k / 2;
  const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  check_on(y, x, "y");
  check_on(grad_v, x, "grad");
  TORCH_CHECK(y.sizes() == at::IntArrayRef({n, c_out, ho, wo}) && y.scalar_type() == x.scalar_type(),
              "regnet_kernels (CUDA): y must be the conv output (", n, ", ", c_out, ", ", ho, ", ",
              wo, ") of x's dtype, got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(grad_v.sizes() == y.sizes() && grad_v.scalar_type() == y.scalar_type(),
              "regnet_kernels (CUDA): grad must have y's shape and dtype, got ",
              grad_v.scalar_type(), " ", grad_v.sizes());
  check_stats(stats, x, c_out, "stats");
  const int64_t rows = n * ho * wo;
  TORCH_CHECK(frozen || rows > 1,
              "regnet_kernels: BatchNorm statistics need more than 1 value per channel");
  const c10::cuda::CUDAGuard guard(x.device());
  const rk_dtype dtype = to_rk(x.scalar_type(), "x");
  const at::Tensor g = nhwc(grad_v), yc = nhwc(y), st = stats.contiguous();
  const auto f32 = stats.options();

  // BN's backward: d_beta = sum dv, d_gamma = inv_std * sum dv * (y - mean).
  at::Tensor sums, d_beta, d_gamma;
  if (bn_grads) {  // SyncBatchNorm: the reductions over every rank, given as (d_beta, d_gamma)
    check_on(*bn_grads, x, "bn_grads");
    TORCH_CHECK(bn_grads->sizes() == at::IntArrayRef({2, c_out}) &&
                    bn_grads->scalar_type() == at::kFloat,
                "regnet_kernels (CUDA): bn_grads must be float32 (2, ", c_out, "), got ",
                bn_grads->scalar_type(), " ", bn_grads->sizes());
    d_beta = (*bn_grads)[0].contiguous();
    d_gamma = (*bn_grads)[1].contiguous();
    sums = at::stack({d_beta, d_gamma / st[RK_STAT_INV_STD]});  // the dy kernel's raw sums
  } else {
    sums = at::empty({2, c_out}, f32);
    at::Tensor ws = at::empty({rk_bn_backward_workspace(rows, c_out)}, f32);
    rk_bn_backward_sums_args bs{};
    bs.dtype = dtype, bs.dv = g.data_ptr(), bs.y = yc.data_ptr(), bs.rows = rows, bs.c = c_out;
    bs.mean = st.data_ptr<float>() + RK_STAT_MEAN * c_out;
    bs.workspace = ws.data_ptr<float>(), bs.sums = sums.data_ptr<float>();
    check_launch(rk_bn_backward_sums(&bs, stream()), "bn_backward_sums");
    d_beta = sums[0].clone();
    d_gamma = sums[1] * st[RK_STAT_INV_STD];
  }
  if (!output_mask[0] && !output_mask[1]) {
    return {empty_like_vector(x), empty_like_vector(weight), empty_like_vector(stats), d_gamma,
            d_beta};
  }

  at::Tensor dy = at::empty_like(yc);
  rk_bn_backward_dy_args bd{};
  bd.dtype = dtype, bd.dv = g.data_ptr(), bd.y = yc.data_ptr(), bd.rows = rows, bd.c = c_out;
  bd.stats = st.data_ptr<float>(), bd.sums = sums.data_ptr<float>(), bd.frozen = frozen ? 1 : 0;
  bd.dy = dy.data_ptr();
  check_launch(rk_bn_backward_dy(&bd, stream()), "bn_backward_dy");

  at::Tensor grad_w = empty_like_vector(weight);
  if (output_mask[1]) {
    rk_conv_wgrad_args wa{};
    wa.dtype = dtype, wa.dy = dy.data_ptr();
    wa.n = n, wa.out_h = ho, wa.out_w = wo, wa.c_out = c_out;
    wa.x = x.data_ptr(), wa.h = h, wa.w = w, wa.c_in = c_in;
    wa.sx_n = x.stride(0), wa.sx_h = x.stride(2), wa.sx_w = x.stride(3), wa.sx_c = x.stride(1);
    wa.k = k, wa.stride = stride, wa.groups = groups;
    wa.prologue = prologue.args;
    const int64_t ws_size = rk_conv_wgrad_workspace(&wa);
    TORCH_CHECK(ws_size >= 0, "regnet_kernels (CUDA): conv_bn_train_backward: unsupported conv ",
                weight.sizes(), " on ", x.sizes());
    at::Tensor wws = at::empty({ws_size}, f32);
    at::Tensor dw = at::empty({c_out, k, k, c_in / groups}, weight.options());
    wa.workspace = wws.data_ptr<float>(), wa.dw = dw.data_ptr();
    check_launch(rk_conv_wgrad(&wa, stream()), "conv_wgrad");
    // In the weight's own strides (DDP's gradient layout contract; a 1x1 weight's
    // contiguous() would keep the permuted strides on its size-1 dims)
    grad_w = at::empty_like(weight).copy_(dw.permute({0, 3, 1, 2}));
  }
  if (!output_mask[0]) {
    return {empty_like_vector(x), grad_w, empty_like_vector(stats), d_gamma, d_beta};
  }

  const int64_t cin_g = c_in / groups, cout_g = c_out / groups;
  const at::Tensor weight_t =
      weight.reshape({groups, cout_g, cin_g, k, k}).permute({0, 2, 3, 4, 1}).contiguous();
  rk_conv_dgrad_args da{};
  da.dtype = dtype, da.dy = dy.data_ptr();
  da.n = n, da.out_h = ho, da.out_w = wo, da.c_out = c_out;
  da.weight_t = weight_t.data_ptr();
  da.c_in = c_in, da.k = k, da.stride = stride, da.groups = groups;
  da.x = x.data_ptr(), da.h = h, da.w = w;
  da.sx_n = x.stride(0), da.sx_h = x.stride(2), da.sx_w = x.stride(3), da.sx_c = x.stride(1);
  da.prologue = prologue.args;
  rk_conv_dgrad_plan_t dplan{};
  check_launch(rk_conv_dgrad_plan(&da, &dplan), "conv_dgrad (plan)");
  at::Tensor grad_x = new_activation(x, n, c_in, h, w);
  at::Tensor dgate_partials =
      at::empty({gate ? n : 0, gate ? dplan.tiles_per_image : 0, c_in}, f32);
  da.dx = grad_x.data_ptr();
  da.dgate_partials = gate ? dgate_partials.data_ptr<float>() : nullptr;
  check_launch(rk_conv_dgrad(&da, stream()), "conv_dgrad");
  at::Tensor grad_gate = gate ? dgate_partials.sum(1) : empty_like_vector(stats);
  return {grad_x, grad_w, grad_gate, d_gamma, d_beta};
}

// ---- the pieces around the conv: SE squeeze, the block's residual end ----

void check_y(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation(y, "y");
  check_on(scale, y, "scale");
  check_on(shift, y, "shift");
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == y.size(1) && t->scalar_type() == at::kFloat,
                "regnet_kernels (CUDA): scale and shift must be float32 (", y.size(1),
                ",), got ", t->scalar_type(), " ", t->sizes());
  }
}

at::Tensor se_squeeze(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift) {
  check_y(y, scale, shift);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t n = y.size(0), c = y.size(1);
  at::Tensor sums = at::empty({n, 1, c}, y.options().dtype(at::kFloat));
  const at::Tensor yc = nhwc(y), s = scale.contiguous(), t = shift.contiguous();
  rk_se_squeeze_args a{};
  a.dtype = to_rk(y.scalar_type(), "y"), a.y = yc.data_ptr();
  a.n = n, a.hw = y.size(2) * y.size(3), a.c = c;
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>(), a.sums = sums.data_ptr<float>();
  check_launch(rk_se_squeeze(&a, stream()), "se_squeeze");
  return sums;
}

at::Tensor se_squeeze_backward(const at::Tensor& grad_sums, const at::Tensor& y,
                               const at::Tensor& scale, const at::Tensor& shift) {
  check_y(y, scale, shift);
  const int64_t n = y.size(0), c = y.size(1);
  check_on(grad_sums, y, "grad_sums");
  TORCH_CHECK(grad_sums.sizes() == at::IntArrayRef({n, 1, c}) &&
                  grad_sums.scalar_type() == at::kFloat,
              "regnet_kernels (CUDA): grad_sums must be float32 (", n, ", 1, ", c, "), got ",
              grad_sums.scalar_type(), " ", grad_sums.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = nhwc(y), gs = grad_sums.contiguous();
  const at::Tensor s = scale.contiguous(), t = shift.contiguous();
  at::Tensor dv = at::empty_like(yc);
  rk_se_squeeze_backward_args a{};
  a.dtype = to_rk(y.scalar_type(), "y"), a.grad_sums = gs.data_ptr<float>(), a.y = yc.data_ptr();
  a.n = n, a.hw = y.size(2) * y.size(3), a.c = c;
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>(), a.dv = dv.data_ptr();
  check_launch(rk_se_squeeze_backward(&a, stream()), "se_squeeze_backward");
  return dv;
}

at::Tensor bn_add_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& shortcut,
                       const std::optional<at::Tensor>& sc_scale,
                       const std::optional<at::Tensor>& sc_shift) {
  check_y(y, scale, shift);
  TORCH_CHECK(sc_scale.has_value() == sc_shift.has_value(),
              "regnet_kernels (CUDA): pass both sc_scale and sc_shift, or neither");
  TORCH_CHECK(shortcut || !sc_scale,
              "regnet_kernels (CUDA): sc_scale/sc_shift given without a shortcut");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = nhwc(y), s = scale.contiguous(), t = shift.contiguous();
  at::Tensor r, rs, rt;
  if (shortcut) {
    check_on(*shortcut, y, "shortcut");
    TORCH_CHECK(shortcut->sizes() == y.sizes() && shortcut->scalar_type() == y.scalar_type(),
                "regnet_kernels (CUDA): shortcut must have y's shape ", y.sizes(), " and dtype ",
                y.scalar_type(), ", got ", shortcut->scalar_type(), " ", shortcut->sizes());
    r = nhwc(*shortcut);
  }
  if (sc_scale) {
    check_y(y, *sc_scale, *sc_shift);
    rs = sc_scale->contiguous();
    rt = sc_shift->contiguous();
  }
  at::Tensor out = at::empty_like(yc);
  rk_bn_add_relu_args a{};
  a.dtype = to_rk(y.scalar_type(), "y"), a.y = yc.data_ptr();
  a.rows = y.numel() / std::max<int64_t>(y.size(1), 1), a.c = y.size(1);
  a.scale = s.data_ptr<float>(), a.shift = t.data_ptr<float>();
  a.shortcut = r.defined() ? r.data_ptr() : nullptr;
  a.sc_scale = rs.defined() ? rs.data_ptr<float>() : nullptr;
  a.sc_shift = rt.defined() ? rt.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  check_launch(rk_bn_add_relu(&a, stream()), "bn_add_relu");
  return out;
}

at::Tensor bn_add_relu_backward(const at::Tensor& grad, const at::Tensor& out) {
  check_activation(out, "out");
  check_on(grad, out, "grad");
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(),
              "regnet_kernels (CUDA): grad must have out's shape ", out.sizes(), " and dtype ",
              out.scalar_type(), ", got ", grad.scalar_type(), " ", grad.sizes());
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor g = nhwc(grad), o = nhwc(out);
  at::Tensor dz = at::empty_like(o);
  check_launch(rk_relu_backward(to_rk(out.scalar_type(), "out"), g.data_ptr(), o.data_ptr(),
                                o.numel(), dz.data_ptr(), stream()),
               "bn_add_relu_backward");
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("bn_update_running", &bn_update_running<check_cuda>);
  m.impl("se_squeeze", &se_squeeze);
  m.impl("se_squeeze_backward", &se_squeeze_backward);
  m.impl("bn_add_relu", &bn_add_relu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward);
}

}  // namespace regnet_kernels::cuda
