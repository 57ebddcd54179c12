// The regnet_kernels C++ extension: the op schemas, declared once.
//
// Eval ops first, then the training ops with their backward ops (autograd is
// registered from these functional pieces in C++: csrc/autograd.cpp).
//
// Same arguments and semantics as the Triton ops (regnet_triton::*), in their
// own namespace (see docs/backends.md, "One op namespace per backend"). Each device
// registers its kernels with TORCH_LIBRARY_IMPL(regnet_kernels, <Key>, m):
//   CPU   csrc/cpu/<op>.cpp   (C++; the conv itself through ATen/oneDNN)
//   CUDA  the binding .cpp beside the launchers in csrc/cuda/ (compiled only
//         where torch has CUDA; see regnet_kernels/backends/cpp/build.py)
// The fake (meta) implementations torch.compile traces with are registered in
// Python, in regnet_kernels/backends/cpp/fakes.py, which set_python_module names.
#include <torch/library.h>

TORCH_LIBRARY(regnet_kernels, m) {
  m.set_python_module("regnet_kernels.backends.cpp.fakes");
  // relu?(conv(x, weight, stride, padding k // 2, groups) * scale + shift); output channels_last.
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, SymInt stride, "
      "SymInt groups, bool relu) -> Tensor");
  // The same, plus fp32 per-image channel sums of the output, shape (N, T, C_out)
  // (T = 1 row tile per image on the CPU; se_excite takes any T).
  m.def(
      "conv_bn_act_squeeze(Tensor x, Tensor weight, Tensor scale, Tensor shift, SymInt stride, "
      "SymInt groups, bool relu) -> (Tensor, Tensor)");
  // sigmoid(W2 relu(W1 (sums.sum(1) / hw) + b1) + b2): (N, C) fp32 SE gate.
  m.def("se_excite(Tensor sums, SymInt hw, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  // relu(conv1x1(x * gate) * scale + shift + shortcut), shortcut = identity or
  // BN_p(conv1x1(shortcut, proj_weight, stride proj_stride)).
  m.def(
      "conv1x1_gate_residual(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? gate, "
      "Tensor shortcut, Tensor? proj_weight, Tensor? proj_scale, Tensor? proj_shift, "
      "SymInt proj_stride) -> Tensor");
  // Their .folded overloads: each BN's scale already folded into the conv weight,
  // which may be prepacked in oneDNN's layout (an MkldnnCPU tensor; CPU only), and
  // its shift as the bias, in x's dtype: relu?(conv(x, weight) + bias) (and its sums
  // as above); relu(conv1x1(x * gate, weight) + bias + shortcut), shortcut = identity
  // or conv1x1(shortcut, proj_weight, stride proj_stride) + proj_bias.
  m.def(
      "conv_bn_act.folded(Tensor x, Tensor weight, Tensor bias, SymInt stride, SymInt groups, "
      "bool relu) -> Tensor");
  m.def(
      "conv_bn_act_squeeze.folded(Tensor x, Tensor weight, Tensor bias, SymInt stride, "
      "SymInt groups, bool relu) -> (Tensor, Tensor)");
  m.def(
      "conv1x1_gate_residual.folded(Tensor x, Tensor weight, Tensor bias, Tensor? gate, "
      "Tensor shortcut, Tensor? proj_weight, Tensor? proj_bias, SymInt proj_stride) -> Tensor");

  // ---- Training (BN from batch statistics); see docs/ops.md ----
  // Lazy BN output: raw y = conv(relu?(x * in_scale + in_shift) * gate, weight), channels_last,
  // and the (5, C_out) fp32 statistics rows mean, inv_std, scale, shift, var (biased);
  // the BN output is v = y * scale + shift. Autograd treats y as v. With
  // frozen_stats (an eval-mode BN: those rows from its running statistics) they are returned
  // instead of the batch's, and the backward (frozen = true) treats them as constants.
  m.def(
      "conv_bn_train(Tensor x, Tensor weight, SymInt stride, SymInt groups, Tensor? in_scale, "
      "Tensor? in_shift, bool in_relu, Tensor? gate, Tensor? bn_weight, Tensor? bn_bias, "
      "float eps, Tensor? frozen_stats) -> (Tensor, Tensor)");
  // Its backward from grad = dL/dv: (grad_x, grad_weight, grad_gate, grad_gamma, grad_beta);
  // grad_x is dL/dv_prev when x is a lazy BN output. output_mask = (x and gate, weight);
  // masked-off gradients, and grad_gate without a gate, are empty (0,) tensors.
  // bn_grads: fp32 (2, C) rows (d_beta, d_gamma) that BN's backward uses for dy instead of
  // this batch's (SyncBatchNorm: every rank's, scaled to this batch's row count); the
  // returned grad_gamma / grad_beta are then those rows.
  m.def(
      "conv_bn_train_backward(Tensor grad, Tensor x, Tensor weight, Tensor y, Tensor stats, "
      "SymInt stride, SymInt groups, Tensor? in_scale, Tensor? in_shift, bool in_relu, "
      "Tensor? gate, bool frozen, bool[2] output_mask, Tensor? bn_grads=None) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
  // nn.BatchNorm2d's running-statistics update (momentum None: cumulative average), in place.
  m.def(
      "bn_update_running(Tensor stats, SymInt count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum) -> ()");
  // fp32 per-image channel sums of relu(y * scale + shift), (N, 1, C), and its backward.
  m.def("se_squeeze(Tensor y, Tensor scale, Tensor shift) -> Tensor");
  m.def("se_squeeze_backward(Tensor grad_sums, Tensor y, Tensor scale, Tensor shift) -> Tensor");
  // relu(y * scale + shift + shortcut'), shortcut' = shortcut, its BN (sc_scale, sc_shift),
  // or none; the backward grad * (out > 0) is the gradient of y and of the shortcut.
  m.def(
      "bn_add_relu(Tensor y, Tensor scale, Tensor shift, Tensor? shortcut, Tensor? sc_scale, "
      "Tensor? sc_shift) -> Tensor");
  m.def("bn_add_relu_backward(Tensor grad, Tensor out) -> Tensor");
}
