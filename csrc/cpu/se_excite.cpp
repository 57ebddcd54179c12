// se_excite on the CPU: gate = sigmoid(w2 relu(w1 mean + b1) + b2) per image, the two
// small layers computed for all images at once (each weight row read once per call).
#include "common.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace regnet_kernels::cpu {
namespace {

at::Tensor se_excite(const at::Tensor& sums, int64_t hw, const at::Tensor& w1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2) {
  constexpr char op[] = "se_excite";
  for (const auto& [t, name] : {std::pair{&sums, "sums"}, {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"},
                                {&b2, "b2"}}) {
    check_cpu(op, *t, name);
  }
  RK_CHECK_CPU(op, sums.dim() == 3 && sums.scalar_type() == at::kFloat,
               "sums must be float32 (N, T, C), got ", sums.scalar_type(), " ",
               sums.sizes());
  RK_CHECK_CPU(op, hw >= 1, "hw must be >= 1, got ", hw);
  const int64_t n = sums.size(0), tiles = sums.size(1), c = sums.size(2), s = w1.size(0);
  RK_CHECK_CPU(op, w1.numel() == s * c && w2.numel() == c * s && w2.size(0) == c &&
                   b1.numel() == s &&
                   b2.numel() == c,
               "SE weights do not fit ", c, " channels and SE width ", s);
  at::Tensor gate = at::empty({n, c}, sums.options());
  if (gate.numel() == 0) return gate;
  // fp32 copies of the (small) SE weights; no-ops for contiguous fp32 ones.
  const at::Tensor w1f = f32(w1.reshape({s, c})), w2f = f32(w2.reshape({c, s}));
  const at::Tensor b1f = f32(b1), b2f = f32(b2), sf = sums.contiguous();
  const float *pw1 = w1f.data_ptr<float>(), *pw2 = w2f.data_ptr<float>();
  const float *pb1 = b1f.data_ptr<float>(), *pb2 = b2f.data_ptr<float>();
  const float* ps = sf.data_ptr<float>();
  float* pg = gate.data_ptr<float>();
  const float inv_hw = 1.f / static_cast<float>(hw);

  // The squeeze means, then each layer with its output units split over the threads and
  // all images at once: every weight row is read once per call (not once per image),
  // and each output is one thread's dot product in a fixed order (deterministic).
  std::vector<float> mean(n * c, 0.f), hidden(n * s);
  for (int64_t img = 0; img < n; ++img) {
    const float* src = ps + img * tiles * c;
    float* m = mean.data() + img * c;
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t k = 0; k < c; ++k) m[k] += src[t * c + k];
    for (int64_t k = 0; k < c; ++k) m[k] *= inv_hw;
  }
  // Units per thread: a layer under ~64K multiply-adds runs on one thread (waking the
  // others costs more than it saves at batch 1).
  const auto grain = [&](int64_t inner) { return std::max<int64_t>(1, 65536 / (n * inner)); };
  at::parallel_for(0, s, grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t img = 0; img < n; ++img)
        hidden[img * s + j] = std::max(dot(pw1 + j * c, mean.data() + img * c, c) + pb1[j], 0.f);
  });
  at::parallel_for(0, c, grain(s), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t img = 0; img < n; ++img) {
        const float z = dot(pw2 + k * s, hidden.data() + img * s, s) + pb2[k];
        pg[img * c + k] = 1.f / (1.f + std::exp(-z));
      }
  });
  return gate;
}

}  // namespace

TORCH_LIBRARY_IMPL(regnet_kernels, CPU, m) { m.impl("se_excite", &se_excite); }

}  // namespace regnet_kernels::cpu
