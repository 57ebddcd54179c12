// The CUDA implementation of the training op conv_bn_train (schemas in csrc/ops.cpp,
// semantics as the C++ CPU op in csrc/cpu/conv_bn_train.cpp and the Triton one):
// tensors -> launchers.h argument structs. Autograd is registered in C++
// (csrc/autograd.cpp) over these functional pieces, for every device.
//
// conv_bn_train            rk_conv_train (y + per-tile statistics) -> rk_bn_finalize
// conv_bn_train_backward   rk_bn_backward_sums -> rk_bn_backward_dy -> rk_conv_wgrad and
//                          rk_conv_dgrad (the prologue's backward in its epilogue)
// bn_update_running        ATen ops on per-channel vectors (csrc/bn_update_running.h)
#include "binding.h"
#include "bn_update_running.h"

namespace regnet_kernels::cuda {
namespace {

// The conv input prologue u = relu?(x * in_scale + in_shift) * gate, as fp32 tensors
// kept alive for the launch, and its launcher struct.
struct Prologue {
  at::Tensor scale, shift, gate;
  rk_prologue args{};

  Prologue(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
           const std::optional<at::Tensor>& in_shift, bool in_relu,
           const std::optional<at::Tensor>& in_gate) {
    RK_CHECK_CUDA(op, in_scale.has_value() == in_shift.has_value(),
                  "pass both in_scale and in_shift, or neither");
    const int64_t n = x.size(0), c = x.size(1);
    if (in_scale) {
      scale = channel_vector(op, *in_scale, c, x, "in_scale");
      shift = channel_vector(op, *in_shift, c, x, "in_shift");
      args.in_scale = scale.data_ptr<float>();
      args.in_shift = shift.data_ptr<float>();
    }
    args.in_relu = in_relu ? 1 : 0;
    if (in_gate) {
      check_on(op, *in_gate, x, "gate");
      RK_CHECK_CUDA(op, in_gate->dim() == 2 && in_gate->size(0) == n && in_gate->size(1) == c &&
                        in_gate->scalar_type() == at::kFloat,
                    "gate must be float32 (", n, ", ", c, "), got ",
                    in_gate->scalar_type(), " ", in_gate->sizes());
      gate = in_gate->contiguous();
      args.gate = gate.data_ptr<float>();
      args.s_gate_n = gate.stride(0);
    }
  }
};

void check_stats(const char* op, const at::Tensor& stats, const at::Tensor& x, int64_t c,
                 const char* name) {
  check_on(op, stats, x, name);
  RK_CHECK_CUDA(op, stats.sizes() == at::IntArrayRef({RK_STAT_ROWS, c}) &&
                    stats.scalar_type() == at::kFloat,
                name, " must be float32 (5, ", c, "), got ",
                stats.scalar_type(), " ", stats.sizes());
}

std::tuple<at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps,
    const std::optional<at::Tensor>& frozen_stats) {
  constexpr char op[] = "conv_bn_train";
  check_conv(op, x, weight, stride, groups);
  const Prologue prologue(op, x, in_scale, in_shift, in_relu, gate);
  RK_CHECK_CUDA(op, bn_weight.has_value() == bn_bias.has_value(),
                "pass both BN weight and bias, or neither");
  const int64_t c_out = weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());

  rk_conv_train_args args{};
  set_kxk_conv_input(op, args, x, weight);
  args.stride = stride, args.groups = groups;
  args.prologue = prologue.args;
  rk_conv_train_plan_t plan{};
  check_launch(op, rk_conv_train_plan(&args, &plan), "conv_bn_train (plan)");
  at::Tensor y = new_activation(x, args.n, c_out, plan.out_h, plan.out_w);
  args.y = y.data_ptr();

  if (frozen_stats) {  // an eval-mode BN: the running statistics, given as (5, C) rows
    check_stats(op, *frozen_stats, x, c_out, "frozen_stats");
    check_launch(op, rk_conv_train(&args, stream()), "conv_bn_train");
    return {y, frozen_stats->clone()};
  }
  const int64_t rows = args.n * plan.out_h * plan.out_w;
  RK_CHECK_CUDA(op, rows > 1, "BatchNorm in training needs more than 1 value per "
                "channel, got ", rows);
  at::Tensor partials = at::empty({plan.tiles_m, 2, c_out}, x.options().dtype(at::kFloat));
  args.partials = partials.data_ptr<float>();
  check_launch(op, rk_conv_train(&args, stream()), "conv_bn_train");

  at::Tensor gamma, beta;
  if (bn_weight) {
    gamma = channel_vector(op, *bn_weight, c_out, x, "bn_weight");
    beta = channel_vector(op, *bn_bias, c_out, x, "bn_bias");
  }
  at::Tensor stats = at::empty({RK_STAT_ROWS, c_out}, x.options().dtype(at::kFloat));
  rk_bn_finalize_args fin{};
  fin.partials = partials.data_ptr<float>();
  fin.tiles = plan.tiles_m, fin.c = c_out, fin.rows = rows, fin.block_m = plan.block_m;
  fin.gamma = gamma.defined() ? gamma.data_ptr<float>() : nullptr;
  fin.beta = beta.defined() ? beta.data_ptr<float>() : nullptr;
  fin.eps = eps;
  fin.stats = stats.data_ptr<float>();
  check_launch(op, rk_bn_finalize(&fin, stream()), "bn_finalize");
  return {y, stats};
}

// Returns (grad_x, grad_weight, grad_gate, grad_gamma, grad_beta) as the CPU op does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& stats, int64_t stride, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& gate, bool frozen,
    std::array<bool, 2> output_mask, const std::optional<at::Tensor>& bn_grads) {
  constexpr char op[] = "conv_bn_train_backward";
  check_conv(op, x, weight, stride, groups);
  const Prologue prologue(op, x, in_scale, in_shift, in_relu, gate);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t c_out = weight.size(0), k = weight.size(2);
  const int64_t pad = k / 2;
  const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  check_on(op, y, x, "y");
  check_on(op, grad_v, x, "grad");
  RK_CHECK_CUDA(op, y.sizes() == at::IntArrayRef({n, c_out, ho, wo}) &&
                    y.scalar_type() == x.scalar_type(),
                "y must be the conv output (", n, ", ", c_out, ", ", ho, ", ",
                wo, ") of x's dtype, got ", y.scalar_type(), " ", y.sizes());
  RK_CHECK_CUDA(op, grad_v.sizes() == y.sizes() && grad_v.scalar_type() == y.scalar_type(),
                "grad must have y's shape and dtype, got ",
                grad_v.scalar_type(), " ", grad_v.sizes());
  check_stats(op, stats, x, c_out, "stats");
  const int64_t rows = n * ho * wo;
  RK_CHECK_CUDA(op, frozen || rows > 1,
                "BatchNorm statistics need more than 1 value per channel");
  const c10::cuda::CUDAGuard guard(x.device());
  const rk_dtype dtype = to_rk(op, x.scalar_type(), "x");
  const at::Tensor g = nhwc(grad_v), yc = nhwc(y), st = stats.contiguous();
  const auto f32 = stats.options();

  // BN's backward: d_beta = sum dv, d_gamma = inv_std * sum dv * (y - mean).
  at::Tensor sums, d_beta, d_gamma;
  if (bn_grads) {  // SyncBatchNorm: the reductions over every rank, given as (d_beta, d_gamma)
    check_on(op, *bn_grads, x, "bn_grads");
    RK_CHECK_CUDA(op, bn_grads->sizes() == at::IntArrayRef({2, c_out}) &&
                      bn_grads->scalar_type() == at::kFloat,
                  "bn_grads must be float32 (2, ", c_out, "), got ",
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
    check_launch(op, rk_bn_backward_sums(&bs, stream()), "bn_backward_sums");
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
  check_launch(op, rk_bn_backward_dy(&bd, stream()), "bn_backward_dy");

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
    RK_CHECK_CUDA(op, ws_size >= 0, "unsupported conv ",
                  weight.sizes(), " on ", x.sizes());
    at::Tensor wws = at::empty({ws_size}, f32);
    at::Tensor dw = at::empty({c_out, k, k, c_in / groups}, weight.options());
    wa.workspace = wws.data_ptr<float>(), wa.dw = dw.data_ptr();
    check_launch(op, rk_conv_wgrad(&wa, stream()), "conv_wgrad");
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
  check_launch(op, rk_conv_dgrad_plan(&da, &dplan), "conv_dgrad (plan)");
  at::Tensor grad_x = new_activation(x, n, c_in, h, w);
  at::Tensor dgate_partials =
      at::empty({gate ? n : 0, gate ? dplan.tiles_per_image : 0, c_in}, f32);
  da.dx = grad_x.data_ptr();
  da.dgate_partials = gate ? dgate_partials.data_ptr<float>() : nullptr;
  check_launch(op, rk_conv_dgrad(&da, stream()), "conv_dgrad");
  at::Tensor grad_gate = gate ? dgate_partials.sum(1) : empty_like_vector(stats);
  return {grad_x, grad_w, grad_gate, d_gamma, d_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CUDA, m) {
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("bn_update_running", &bn_update_running<check_cuda>);
}

}  // namespace regnet_kernels::cuda
