// oneDNN convolutions with fused post-ops, through the ops torch registers for
// them (mkldnn::_convolution_pointwise and its .binary overload: what Inductor's
// freezing calls). One primitive computes the conv, its bias (a folded BN's
// shift, the scale being folded into the weight), the residual add and the
// ReLU: no separate pass over the output.
//
// The weight may be dense or prepacked: a tensor in oneDNN's own layout
// (mkldnn::_reorder_convolution_weight, done once per fold in Python,
// regnet_kernels/backends/cpp/ops.py), which spares the reorder oneDNN would
// otherwise do on every call. Inputs are NHWC; so are the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <string>
#include <vector>

namespace regnet_kernels::cpu {

namespace detail {

inline std::vector<int64_t> pair(int64_t v) { return {v, v}; }

// Runs an mkldnn op on a stack of arguments (boxed: the schema, not a C++ signature,
// is the contract) and returns its one output.
inline at::Tensor call_mkldnn(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

}  // namespace detail

// relu?(conv(x, weight, stride, padding k // 2, groups) + bias).
inline at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              int64_t stride, int64_t groups, bool relu) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  const int64_t pad = weight.size(2) / 2;
  return detail::call_mkldnn(
      op, {x, weight, bias, detail::pair(pad), detail::pair(stride), detail::pair(1), groups,
           std::string(relu ? "relu" : "none"), c10::List<std::optional<at::Scalar>>(),
           c10::IValue()});
}

// relu(conv1x1(x, weight) + bias + residual); residual has the output's shape, dtype and layout.
inline at::Tensor onednn_conv1x1_add_relu(const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& residual) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  return detail::call_mkldnn(
      op, {x, residual, weight, bias, detail::pair(0), detail::pair(1), detail::pair(1),
           int64_t{1}, std::string("add"), c10::IValue(), std::string("relu"),
           c10::List<std::optional<at::Scalar>>(), c10::IValue()});
}

}  // namespace regnet_kernels::cpu
