// Autograd for the training ops, in C++ (TORCH_LIBRARY_IMPL(regnet_kernels, Autograd, m)),
// for every device: each forward runs the device kernel below autograd, each backward
// calls the op's backward op. The lazy BN output convention of the Triton ops holds: the
// raw conv output y stands for v = y * scale + shift, its gradient is dL/dv, and the
// statistics rows are non-differentiable decoding parameters.
//
// In C++ rather than through torch.library.register_autograd because a training step
// runs ~100 of these ops, and the Python wrapper cost ~170 us per op (forward and
// backward) on the CPU: ~10% of a regnety_400mf step at batch 8, 96 px. se_excite's
// backward is a few small ATen matmuls here (in Python, as the Triton op has it, they
// cost ~5% of that step).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace regnet_kernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
Tensor or_undefined(const OptTensor& t) { return present(t) ? *t : Tensor(); }
OptTensor or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class ConvBnTrain : public torch::autograd::Function<ConvBnTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               int64_t stride, int64_t groups, const OptTensor& in_scale,
                               const OptTensor& in_shift, bool in_relu, const OptTensor& gate,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, double eps,
                               const OptTensor& frozen_stats) {
    static const auto op = find_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, c10::SymInt, c10::SymInt, const OptTensor&,
        const OptTensor&, bool, const OptTensor&, const OptTensor&, const OptTensor&, double,
        const OptTensor&)>("regnet_kernels::conv_bn_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, stats] = op.call(x, weight, stride, groups, in_scale, in_shift, in_relu, gate,
                              bn_weight, bn_bias, eps, frozen_stats);
    ctx->mark_non_differentiable({stats});
    ctx->save_for_backward({x, weight, or_undefined(in_scale), or_undefined(in_shift),
                            or_undefined(gate), y, stats});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["in_relu"] = in_relu;
    ctx->saved_data["frozen"] = present(frozen_stats);
    // needs_input_grad counts the tensor arguments given: x 0, weight 1, then the optionals
    ctx->saved_data["gate_index"] =
        present(gate) ? int64_t{2} + present(in_scale) + present(in_shift) : int64_t{-1};
    // BN's gamma/beta gradients are computed in fp32 and returned in the BN's dtype
    ctx->saved_data["bn_dtype"] =
        present(bn_weight) ? static_cast<int64_t>(bn_weight->scalar_type()) : int64_t{-1};
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
        c10::SymInt, const OptTensor&, const OptTensor&, bool, const OptTensor&, bool,
        std::array<bool, 2>, const OptTensor&)>("regnet_kernels::conv_bn_train_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &gate = saved[4], &y = saved[5];
    const int64_t gate_index = ctx->saved_data["gate_index"].toInt();
    const bool need_gate = gate_index >= 0 && ctx->needs_input_grad(gate_index);
    const bool need_x = ctx->needs_input_grad(0) || need_gate;
    const bool need_w = ctx->needs_input_grad(1);
    auto [grad_x, grad_w, grad_gate, grad_gamma, grad_beta] =
        op.call(grads[0], x, weight, y, saved[6], ctx->saved_data["stride"].toInt(),
                ctx->saved_data["groups"].toInt(), or_none(saved[2]), or_none(saved[3]),
                ctx->saved_data["in_relu"].toBool(), or_none(gate),
                ctx->saved_data["frozen"].toBool(), {need_x, need_w}, std::nullopt);
    variable_list out(12);  // one per forward argument
    if (ctx->needs_input_grad(0)) out[0] = grad_x;
    if (need_w) out[1] = grad_w;
    if (need_gate) out[7] = grad_gate;
    const int64_t bn_dtype = ctx->saved_data["bn_dtype"].toInt();
    if (bn_dtype >= 0) {
      out[8] = grad_gamma.to(static_cast<at::ScalarType>(bn_dtype));
      out[9] = grad_beta.to(static_cast<at::ScalarType>(bn_dtype));
    }
    return out;
  }
};

class SeSqueeze : public torch::autograd::Function<SeSqueeze> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& scale,
                        const Tensor& shift) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>(
        "regnet_kernels::se_squeeze");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({y, scale, shift});
    return op.call(y, scale, shift);
  }

  // y is a lazy BN output: dL/dv = grad_sums[n, 0, c] * relu'(v).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
            "regnet_kernels::se_squeeze_backward");
    const variable_list saved = ctx->get_saved_variables();
    return {op.call(grads[0].contiguous(), saved[0], saved[1], saved[2]), Tensor(), Tensor()};
  }
};

class BnAddRelu : public torch::autograd::Function<BnAddRelu> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& scale,
                        const Tensor& shift, const OptTensor& shortcut, const OptTensor& sc_scale,
                        const OptTensor& sc_shift) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                       const OptTensor&, const OptTensor&)>("regnet_kernels::bn_add_relu");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = op.call(y, scale, shift, shortcut, sc_scale, sc_shift);
    ctx->save_for_backward({out});
    ctx->saved_data["has_shortcut"] = present(shortcut);
    return out;
  }

  // y and a projection shortcut are lazy BN outputs, an identity shortcut is added as
  // is: every input's gradient is dL/d(sum) = grad * (out > 0).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&)>(
        "regnet_kernels::bn_add_relu_backward");
    const Tensor dz = op.call(grads[0], ctx->get_saved_variables()[0]);
    const bool has_shortcut = ctx->saved_data["has_shortcut"].toBool();
    return {dz, Tensor(), Tensor(), has_shortcut ? dz : Tensor(), Tensor(), Tensor()};
  }
};

// gate = sigmoid(W2 relu(W1 mean + b1) + b2), mean = sums.sum(1) / hw: an MLP on (N, C)
// vectors, so its backward is a few ATen matmuls (the Triton op's Python formula, in C++).
class SeExcite : public torch::autograd::Function<SeExcite> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& sums, c10::SymInt hw,
                        const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    static const auto op =
        find_op<Tensor(const Tensor&, c10::SymInt, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&)>("regnet_kernels::se_excite");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor gate = op.call(sums, hw, w1, b1, w2, b2);
    ctx->save_for_backward({sums, w1, b1, w2, b2, gate});
    ctx->saved_data["hw"] = hw;
    return gate;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &sums = saved[0], &w1 = saved[1], &b1 = saved[2], &w2 = saved[3],
                 &b2 = saved[4], &gate = saved[5];
    const c10::Scalar hw(ctx->saved_data["hw"].toSymInt());
    const auto dtype = gate.scalar_type();
    const Tensor mean = sums.sum(1).div(hw);
    const Tensor w1m = w1.to(dtype).flatten(1), w2m = w2.to(dtype).flatten(1);
    const Tensor hidden_pre = b1.to(dtype).addmm(mean, w1m.t());
    const Tensor hidden = hidden_pre.clamp_min(0.0);
    const Tensor dz = grads[0].mul(gate).mul(gate.neg().add(1.0));
    const Tensor dhidden = dz.mm(w2m).mul(hidden_pre.gt(0.0));
    const Tensor dsums = dhidden.mm(w1m).div(hw).unsqueeze(1).expand_as(sums).contiguous();
    return {dsums, Tensor(), dhidden.t().mm(mean).reshape(w1.sizes()).to(w1.scalar_type()),
            dhidden.sum(0).to(b1.scalar_type()),
            dz.t().mm(hidden).reshape(w2.sizes()).to(w2.scalar_type()),
            dz.sum(0).to(b2.scalar_type())};
  }
};

std::tuple<Tensor, Tensor> conv_bn_train(const Tensor& x, const Tensor& weight, int64_t stride,
                                         int64_t groups, const OptTensor& in_scale,
                                         const OptTensor& in_shift, bool in_relu,
                                         const OptTensor& gate, const OptTensor& bn_weight,
                                         const OptTensor& bn_bias, double eps,
                                         const OptTensor& frozen_stats) {
  const variable_list out = ConvBnTrain::apply(x, weight, stride, groups, in_scale, in_shift,
                                               in_relu, gate, bn_weight, bn_bias, eps,
                                               frozen_stats);
  return {out[0], out[1]};
}

Tensor se_squeeze(const Tensor& y, const Tensor& scale, const Tensor& shift) {
  return SeSqueeze::apply(y, scale, shift);
}

Tensor se_excite(const Tensor& sums, c10::SymInt hw, const Tensor& w1, const Tensor& b1,
                 const Tensor& w2, const Tensor& b2) {
  return SeExcite::apply(sums, std::move(hw), w1, b1, w2, b2);
}

Tensor bn_add_relu(const Tensor& y, const Tensor& scale, const Tensor& shift,
                   const OptTensor& shortcut, const OptTensor& sc_scale,
                   const OptTensor& sc_shift) {
  return BnAddRelu::apply(y, scale, shift, shortcut, sc_scale, sc_shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, Autograd, m) {
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("se_squeeze", &se_squeeze);
  m.impl("se_excite", &se_excite);
  m.impl("bn_add_relu", &bn_add_relu);
}

}  // namespace regnet_kernels
