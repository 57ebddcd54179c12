// The regnet_kernels C++ extension: the op schemas, declared once.
//
// Same arguments and semantics as the Triton ops (regnet_triton::*), in their
// own namespace (see the README's "one op namespace per backend"). Each device
// registers its kernels with TORCH_LIBRARY_IMPL(regnet_kernels, <Key>, m):
//   CPU   csrc/cpu/<op>.cpp   (C++; the conv itself through ATen/oneDNN)
//   CUDA  the binding .cpp beside the launchers in csrc/cuda/ (compiled only
//         where torch has CUDA; see regnet_kernels/ops/_extension.py)
// The fake (meta) implementations torch.compile traces with are registered in
// Python, in regnet_kernels/ops/cpp.py, which set_python_module names.
#include <torch/library.h>

TORCH_LIBRARY(regnet_kernels, m) {
  m.set_python_module("regnet_kernels.ops.cpp");
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
}
