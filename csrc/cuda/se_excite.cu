// SE excitation: gate[n, c] = sigmoid(W2 relu(W1 mean[n] + b1) + b2), mean from the
// (N, T, C) fp32 squeeze partials of conv_bn_act. One CTA per image:
//   1. mean[c] = (sum over t of sums[n, t, c]) / hw   (t in order; thread per channel)
//   2. hidden[s] = relu(W1[s, :] . mean + b1[s])      (warp per s, lanes over c)
//   3. gate[c] = sigmoid(W2[c, :] . hidden + b2[c])    (warp per c, lanes over s)
// mean and hidden live in shared memory; every sum runs in a fixed order (lane
// partials, then a shuffle tree), so the gate is bit-reproducible.
#include "dtypes.cuh"

namespace rk {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row . vec over len elements (row read through a stride), summed over the warp:
// lane partials in index order, then a fixed shuffle tree. All lanes get the sum.
template <typename TW>
__device__ __forceinline__ float warp_dot(const TW* row, int64_t stride, const float* vec,
                                          int len, int lane) {
  float acc = 0.0f;
  for (int i = lane; i < len; i += 32) acc = fmaf(to_f32(row[i * stride]), vec[i], acc);
  return warp_sum(acc);
}

template <typename TW>
struct SeParams {
  const float* sums;
  int t, c, s;
  float inv_hw;
  const TW* w1;
  int64_t s1o, s1i;
  const TW* b1;
  const TW* w2;
  int64_t s2o, s2i;
  const TW* b2;
  float* gate;
};

template <typename TW>
__global__ void __launch_bounds__(kThreads) se_excite_kernel(const SeParams<TW> p) {
  RK_DYNAMIC_SMEM(float, smem);
  float* mean = smem;         // [C]
  float* hidden = smem + p.c; // [S]
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kThreads / 32;

  const float* sums = p.sums + n * p.t * p.c;
  for (int c = threadIdx.x; c < p.c; c += kThreads) {
    float total = 0.0f;
    for (int t = 0; t < p.t; ++t) total += sums[static_cast<int64_t>(t) * p.c + c];
    mean[c] = total * p.inv_hw;
  }
  __syncthreads();

  for (int s = warp; s < p.s; s += kWarps) {
    const float acc = warp_dot(p.w1 + s * p.s1o, p.s1i, mean, p.c, lane);
    if (lane == 0) hidden[s] = fmaxf(acc + to_f32(p.b1[s]), 0.0f);
  }
  __syncthreads();

  for (int c = warp; c < p.c; c += kWarps) {
    const float acc = warp_dot(p.w2 + c * p.s2o, p.s2i, hidden, p.s, lane);
    if (lane == 0) {
      const float z = acc + to_f32(p.b2[c]);
      p.gate[n * p.c + c] = 1.0f / (1.0f + expf(-z));
    }
  }
}

template <typename TW>
cudaError_t launch(const rk_se_excite_args& a, cudaStream_t stream) {
  SeParams<TW> p;
  p.sums = a.sums;
  p.t = static_cast<int>(a.t);
  p.c = static_cast<int>(a.c);
  p.s = static_cast<int>(a.s);
  p.inv_hw = 1.0f / static_cast<float>(a.hw);
  p.w1 = static_cast<const TW*>(a.w1);
  p.s1o = a.s1_o;
  p.s1i = a.s1_i;
  p.b1 = static_cast<const TW*>(a.b1);
  p.w2 = static_cast<const TW*>(a.w2);
  p.s2o = a.s2_o;
  p.s2i = a.s2_i;
  p.b2 = static_cast<const TW*>(a.b2);
  p.gate = a.gate;
  const size_t smem = static_cast<size_t>(a.c + a.s) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(se_excite_kernel<TW>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  RK_LAUNCH(static_cast<unsigned>(a.n), kThreads, smem, stream, se_excite_kernel<TW>)(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace rk

extern "C" cudaError_t rk_se_excite(const rk_se_excite_args* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_se_excite_args& a = *args;
  if (a.n < 0 || a.t < 0 || a.c < 0 || a.s < 1 || a.hw < 1) return cudaErrorInvalidValue;
  if (a.n == 0 || a.c == 0) return cudaSuccess;
  // (C + S) fp32 values of shared memory per CTA (up to 227 KiB on sm_90, 163 KiB on sm_80).
  if (a.c + a.s > 40000 || a.n > rk::kInt32Max || a.t > rk::kInt32Max) return cudaErrorInvalidValue;
  if (a.sums == nullptr || a.w1 == nullptr || a.b1 == nullptr || a.w2 == nullptr ||
      a.b2 == nullptr || a.gate == nullptr)
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.weight_dtype, [&](auto zero) {
    return rk::launch<decltype(zero)>(a, stream);
  });
}
