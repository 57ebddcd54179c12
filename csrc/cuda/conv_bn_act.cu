// conv (k x k, odd k, padding k / 2, any stride, any groups) + folded BN + ReLU,
// with the optional SE squeeze in the epilogue. NHWC, fp32 accumulation.
//
// Grid: x over row tiles (per image when squeezing), y over groups x channel tiles
// of a group. The main loop is rk::gemm (igemm.cuh): tensor cores for fp16/bf16.
// Epilogue: y = act(acc * scale[c] + shift[c]) stored in the input dtype; with
// squeeze, the tile's fp32 column sums of y go to sums[blockIdx.x, c] = sums[n, t, c]
// (warp shuffles, then the warps' rows in a fixed order: deterministic, no atomics).
#include "igemm.cuh"
#include "launchers.h"

namespace rk {
namespace {

template <typename T>
struct ConvParams {
  AOperand<T> a;            // ci0 set per CTA
  BOperand<T> b;            // co0 / n_valid set per CTA
  RowMap rows;
  int cout, cout_g, tiles_n;
  const float* scale;
  const float* shift;
  bool relu;
  T* y;
  float* sums;              // nullptr, or (N, T, C_out)
};

template <typename T, class TL>
__global__ void __launch_bounds__(TL::kThreads, 1) conv_bn_act_kernel(const ConvParams<T> p) {
  __shared__ __align__(16) unsigned char smem_raw[sizeof(Smem<T, TL>)];
  __shared__ float red[TL::WARPS_M][TL::BN];
  Smem<T, TL>& sm = *reinterpret_cast<Smem<T, TL>*>(smem_raw);

  const int group = static_cast<int>(blockIdx.y) / p.tiles_n;
  const int n0 = (static_cast<int>(blockIdx.y) - group * p.tiles_n) * TL::BN;
  AOperand<T> a = p.a;
  a.ci0 = group * a.cin_g;
  BOperand<T> b = p.b;
  b.co0 = group * p.cout_g + n0;
  b.n_valid = min(TL::BN, p.cout_g - n0);

  float acc[TL::MI][TL::NJ][4];
  zero<TL>(acc);
  gemm<T, TL>(acc, a, b, p.rows, sm);

  const Frag<TL> f;
  const ChannelVec<TL> sc(p.scale, f, b.co0, b.n_valid), sh(p.shift, f, b.co0, b.n_valid);
  float colsum[TL::NJ][2] = {};
  for_each_row(f, p.rows, [&](int i, int h, int64_t m, int, int, int, bool rok) {
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j) {
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        v[e] = fmaf(acc[i][j][2 * h + e], sc.v[j][e], sh.v[j][e]);
        if (p.relu) v[e] = fmaxf(v[e], 0.0f);
        if (rok && f.col(j, e) < b.n_valid) colsum[j][e] += v[e];
      }
      if (rok)
        store_pair(p.y, m * p.cout + b.co0 + f.col(j, 0), v[0], v[1], f.col(j, 0) < b.n_valid,
                   f.col(j, 1) < b.n_valid);
    }
  });

  if (p.sums == nullptr) return;  // uniform over the CTA
  // Sum over the 8 row groups of the warp (lanes with equal t), then over the warps.
#pragma unroll
  for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float s = colsum[j][e];
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      s += __shfl_xor_sync(0xffffffffu, s, 8);
      s += __shfl_xor_sync(0xffffffffu, s, 16);
      if (f.g == 0) red[f.wm0 / TL::WM][f.col(j, e)] = s;
    }
  __syncthreads();
  for (int c = threadIdx.x; c < b.n_valid; c += TL::kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < TL::WARPS_M; ++w) s += red[w][c];
    p.sums[static_cast<int64_t>(blockIdx.x) * p.cout + b.co0 + c] = s;
  }
}

// Tile shapes: BN follows the group width (one group per CTA); BM = 64 for small
// row counts (7x7 maps when tiling per image), for narrow groups (BN <= 16) and for
// fp32, else 128.
using T128x32 = Tile<128, 32, 4, 1>;
using T128x64 = Tile<128, 64, 2, 2>;
using T128x128 = Tile<128, 128, 2, 4>;
using T64x8 = Tile<64, 8, 4, 1>;
using T64x16 = Tile<64, 16, 4, 1>;
using T64x32 = Tile<64, 32, 4, 1>;
using T64x64 = Tile<64, 64, 2, 2>;
using T64x128 = Tile<64, 128, 2, 2>;

void pick_tiles(rk_dtype dtype, int64_t cout_g, int64_t rows, int64_t* bm, int64_t* bn) {
  *bn = cout_g <= 8 ? 8 : cout_g <= 16 ? 16 : cout_g <= 32 ? 32 : cout_g <= 64 ? 64 : 128;
  *bm = rows <= 64 || *bn <= 16 || dtype == RK_FLOAT32 ? 64 : 128;
}

template <typename T, class TL>
cudaError_t launch_tile(ConvParams<T> p, int64_t grid_x, int64_t grid_y, cudaStream_t stream) {
  conv_bn_act_kernel<T, TL><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)),
                              TL::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const rk_conv_bn_act_args& args, const rk_conv_plan& plan,
                   cudaStream_t stream) {
  constexpr int V = Layout<T>::kVec;
  const int64_t cin_g = args.c_in / args.groups, cout_g = args.c_out / args.groups;
  const int64_t hwo = plan.out_h * plan.out_w;
  const int64_t k_total = args.k * args.k * cin_g;
  ConvParams<T> p;
  p.a.x = static_cast<const T*>(args.x);
  p.a.sn = args.sx_n;
  p.a.sh = args.sx_h;
  p.a.sw = args.sx_w;
  p.a.sc = args.sx_c;
  p.a.h = static_cast<int>(args.h);
  p.a.w = static_cast<int>(args.w);
  p.a.cin_g = static_cast<int>(cin_g);
  p.a.ci0 = 0;
  p.a.ks = static_cast<int>(args.k);
  p.a.stride = static_cast<int>(args.stride);
  p.a.pad = static_cast<int>(args.k / 2);
  p.a.gate = nullptr;
  p.a.sg = 0;
  p.a.vec = args.sx_c == 1 && cin_g % V == 0 && args.sx_n % V == 0 && args.sx_h % V == 0 &&
            args.sx_w % V == 0 && aligned16(args.x);
  p.b.w = static_cast<const T*>(args.weight);
  p.b.so = args.sw_o;
  p.b.si = args.sw_i;
  p.b.sh = args.sw_h;
  p.b.sw = args.sw_w;
  p.b.co0 = 0;
  p.b.n_valid = 0;
  const bool k_contiguous =
      args.sw_i == 1 && (args.k == 1 || (args.sw_w == cin_g && args.sw_h == args.k * cin_g));
  p.b.vec = k_contiguous && k_total % V == 0 && args.sw_o % V == 0 && aligned16(args.weight);
  p.rows.m_total = args.n * hwo;
  p.rows.hwo = static_cast<int>(hwo);
  p.rows.wo = static_cast<int>(plan.out_w);
  p.rows.tiles_per_image = static_cast<int>(plan.tiles_per_image);
  p.cout = static_cast<int>(args.c_out);
  p.cout_g = static_cast<int>(cout_g);
  p.tiles_n = static_cast<int>((cout_g + plan.block_n - 1) / plan.block_n);
  p.scale = args.scale;
  p.shift = args.shift;
  p.relu = args.relu != 0;
  p.y = static_cast<T*>(args.y);
  p.sums = args.sums;

  const int64_t grid_x = plan.tiles_per_image > 0 ? args.n * plan.tiles_per_image
                                                  : (args.n * hwo + plan.block_m - 1) / plan.block_m;
  const int64_t grid_y = args.groups * p.tiles_n;
  if (grid_x > 0x7fffffffLL || grid_y > 65535) return cudaErrorInvalidValue;
  if constexpr (sizeof(T) == 4) {
    switch (plan.block_n) {
      case 8: return launch_tile<T, T64x8>(p, grid_x, grid_y, stream);
      case 16: return launch_tile<T, T64x16>(p, grid_x, grid_y, stream);
      case 32: return launch_tile<T, T64x32>(p, grid_x, grid_y, stream);
      case 64: return launch_tile<T, T64x64>(p, grid_x, grid_y, stream);
      case 128: return launch_tile<T, T64x128>(p, grid_x, grid_y, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    switch (plan.block_m * 1000 + plan.block_n) {
      case 128032: return launch_tile<T, T128x32>(p, grid_x, grid_y, stream);
      case 128064: return launch_tile<T, T128x64>(p, grid_x, grid_y, stream);
      case 128128: return launch_tile<T, T128x128>(p, grid_x, grid_y, stream);
      case 64008: return launch_tile<T, T64x8>(p, grid_x, grid_y, stream);
      case 64016: return launch_tile<T, T64x16>(p, grid_x, grid_y, stream);
      case 64032: return launch_tile<T, T64x32>(p, grid_x, grid_y, stream);
      case 64064: return launch_tile<T, T64x64>(p, grid_x, grid_y, stream);
      case 64128: return launch_tile<T, T64x128>(p, grid_x, grid_y, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

constexpr int64_t kInt32Max = 0x7fffffffLL;

}  // namespace
}  // namespace rk

extern "C" cudaError_t rk_conv_bn_act_plan(const rk_conv_bn_act_args* args, int squeeze,
                                           rk_conv_plan* plan) {
  if (args == nullptr || plan == nullptr) return cudaErrorInvalidValue;
  const rk_conv_bn_act_args& a = *args;
  if (a.n < 0 || a.h < 0 || a.w < 0 || a.c_in < 1 || a.c_out < 1 || a.k < 1 || a.k % 2 == 0 ||
      a.stride < 1 || a.groups < 1 || a.c_in % a.groups != 0 || a.c_out % a.groups != 0)
    return cudaErrorInvalidValue;
  const int64_t pad = a.k / 2;
  plan->out_h = a.h + 2 * pad >= a.k ? (a.h + 2 * pad - a.k) / a.stride + 1 : 0;
  plan->out_w = a.w + 2 * pad >= a.k ? (a.w + 2 * pad - a.k) / a.stride + 1 : 0;
  const int64_t hwo = plan->out_h * plan->out_w;
  rk::pick_tiles(a.dtype, a.c_out / a.groups, squeeze ? hwo : a.n * hwo, &plan->block_m, &plan->block_n);
  plan->tiles_per_image = squeeze ? (hwo + plan->block_m - 1) / plan->block_m : 0;
  return cudaSuccess;
}

extern "C" cudaError_t rk_conv_bn_act(const rk_conv_bn_act_args* args, cudaStream_t stream) {
  rk_conv_plan plan;
  cudaError_t err = rk_conv_bn_act_plan(args, args != nullptr && args->sums != nullptr, &plan);
  if (err != cudaSuccess) return err;
  const rk_conv_bn_act_args& a = *args;
  const int64_t hwo = plan.out_h * plan.out_w;
  if (a.n * hwo == 0) return cudaSuccess;  // empty output (and empty sums)
  // 32-bit indices inside an image / a row tile; int64 for everything scaled by C.
  if (a.h > rk::kInt32Max || a.w > rk::kInt32Max || hwo > rk::kInt32Max ||
      a.k * a.k * (a.c_in / a.groups) > rk::kInt32Max || a.c_out > rk::kInt32Max ||
      a.n > rk::kInt32Max)
    return cudaErrorInvalidValue;
  if (a.x == nullptr || a.weight == nullptr || a.scale == nullptr || a.shift == nullptr ||
      a.y == nullptr)
    return cudaErrorInvalidValue;
  switch (a.dtype) {
    case RK_FLOAT32:
      if (reinterpret_cast<uintptr_t>(a.y) % 8) return cudaErrorInvalidValue;
      return rk::launch<float>(a, plan, stream);
    case RK_FLOAT16:
      if (reinterpret_cast<uintptr_t>(a.y) % 4) return cudaErrorInvalidValue;
      return rk::launch<__half>(a, plan, stream);
    case RK_BFLOAT16:
      if (reinterpret_cast<uintptr_t>(a.y) % 4) return cudaErrorInvalidValue;
      return rk::launch<__nv_bfloat16>(a, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
