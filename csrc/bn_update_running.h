// nn.BatchNorm2d's running-statistics update from the (5, C) batch statistics of
// conv_bn_train, shared by the CPU and the CUDA registrations (ATen ops on a few
// per-channel vectors: nothing here is worth a kernel):
//   f = momentum, or 1 / num_batches_tracked (after its increment) when momentum is None
//   running_mean = (1 - f) * running_mean + f * mean
//   running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
// computed in fp32 and rounded once into the buffers' dtype. `Check(op, t, name)` rejects
// a tensor on the wrong device.
#pragma once

#include "rk_stats.h"

#include "op_error.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace regnet_kernels {

template <void (*Check)(const char*, const at::Tensor&, const char*)>
void bn_update_running(const at::Tensor& stats, int64_t count, at::Tensor& running_mean,
                       at::Tensor& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked,
                       std::optional<double> momentum) {
  constexpr int64_t kMeanRow = RK_STAT_MEAN, kVarRow = RK_STAT_VAR, kRows = RK_STAT_ROWS;
  constexpr char op[] = "bn_update_running";
  Check(op, stats, "stats");
  Check(op, running_mean, "running_mean");
  Check(op, running_var, "running_var");
  const char* backend = stats.is_cuda() ? "cuda" : "cpu";
  const int64_t c = stats.size(-1);
  RK_CHECK(op, backend, stats.sizes() == at::IntArrayRef({kRows, c}) &&
               stats.scalar_type() == at::kFloat,
           "stats must be float32 (5, C), got ", stats.sizes());
  RK_CHECK(op, backend, running_mean.sizes() == at::IntArrayRef({c}) &&
               running_var.sizes() == at::IntArrayRef({c}),
           "running_mean and running_var must have shape (", c, ",)");
  RK_CHECK(op, backend, count > 1, "count must be > 1, got ", count);
  RK_CHECK(op, backend, momentum || num_batches_tracked,
           "momentum=None (cumulative average) needs num_batches_tracked");
  if (num_batches_tracked) {
    Check(op, *num_batches_tracked, "num_batches_tracked");
    num_batches_tracked->add_(1);
  }
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const at::ScalarType buffer_dtype = running_mean.scalar_type();
  if (momentum && !stats.is_cuda() && running_var.scalar_type() == buffer_dtype &&
      (buffer_dtype == at::kFloat || buffer_dtype == at::kDouble || buffer_dtype == at::kBFloat16 ||
       buffer_dtype == at::kHalf) &&
      running_mean.is_contiguous() && running_var.is_contiguous()) {
    // CPU buffers: one loop over the C values, the same fp32 arithmetic and one rounding
    // into the buffers' dtype as the ATen chain below, which costs ~70 us a call there
    // (~4% of a small training step).
    const at::Tensor st = stats.contiguous();
    const float* mean = st.const_data_ptr<float>() + kMeanRow * c;
    const float* var = st.const_data_ptr<float>() + kVarRow * c;
    const float keep = static_cast<float>(1.0 - *momentum), f = static_cast<float>(*momentum);
    const float f_unbiased = static_cast<float>(*momentum * unbias);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer_dtype, "bn_update_running",
                                    [&] {
      scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < c; ++i) {
        rm[i] = static_cast<scalar_t>(static_cast<float>(rm[i]) * keep + f * mean[i]);
        rv[i] = static_cast<scalar_t>(static_cast<float>(rv[i]) * keep + f_unbiased * var[i]);
      }
    });
    return;
  }
  if (momentum) {
    const double f = *momentum;
    running_mean.copy_(running_mean.to(at::kFloat).mul(1.0 - f).add_(stats[kMeanRow], f));
    running_var.copy_(running_var.to(at::kFloat).mul(1.0 - f).add_(stats[kVarRow], f * unbias));
    return;
  }
  // The cumulative average: f = 1 / num_batches_tracked as a tensor, so that a device
  // counter is never read back to the host (no synchronization).
  const at::Tensor f = num_batches_tracked->to(at::kDouble).reciprocal();
  const at::Tensor keep = f.neg().add(1.0);
  running_mean.copy_(running_mean.to(at::kDouble).mul(keep).add_(stats[kMeanRow].mul(f)));
  running_var.copy_(running_var.to(at::kDouble).mul(keep).add_(stats[kVarRow].mul(f.mul(unbias))));
}

}  // namespace regnet_kernels
