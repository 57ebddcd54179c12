// conv (k x k, odd k, padding k / 2, any stride, any groups) + folded BN + ReLU,
// with the optional SE squeeze in the epilogue. NHWC, fp32 accumulation.
//
// Grid (1-D, cta_tile): row tiles (per image when squeezing) x (groups x channel tiles
// of a group), the channel tiles of a row tile adjacent. The main loop is rk::gemm
// (igemm.cuh): cp.async pipeline, tensor cores for fp16/bf16. Epilogue:
// y = act(acc * scale[c] + shift[c]) stored in the input dtype; with squeeze, the
// tile's fp32 column sums of y go to sums[row tile, c] = sums[n, t, c]
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
  int cout, cout_g;
  FastDiv tiles_n, cols;    // channel tiles per group, cols = groups * tiles_n
  const float* scale;
  const float* shift;
  bool relu;
  T* y;
  bool y_vec;               // y rows' channel chunks 16-byte aligned (store_chunk)
  float* sums;              // nullptr, or (N, T, C_out)
};

// VEC: the instantiation with the pipelined main loop (p.a.vec && p.b.vec), else the
// element-wise one.
template <typename T, class TL, bool VEC>
__global__ void __launch_bounds__(TL::kThreads, TL::kMinCtas)
    conv_bn_act_kernel(const ConvParams<T> p) {
  RK_DYNAMIC_SMEM(uint4, smem_raw);
  __shared__ float red[TL::WARPS_M][TL::BN];
  __shared__ float tile_sums[TL::BN];
  Smem<T, TL>& sm = *reinterpret_cast<Smem<T, TL>*>(smem_raw);

  const CtaTile t = cta_tile(p.cols);
  RowMap rows = p.rows;
  rows.set_tile<TL::BM>(t.row);
  float acc[TL::MI][TL::NJ][4];
  const BOperand<T> b = grouped_gemm<T, TL, VEC ? Loads::kVector : Loads::kElement>(
      acc, p.a, p.b, p.cout_g, p.tiles_n, t.col, rows, sm);

  const Frag<TL> f;
  {  // the affine in place: no per-channel vectors held through the stores (registers)
    const ChannelVec<TL> sc(p.scale, f, b.co0, b.n_valid), sh(p.shift, f, b.co0, b.n_valid);
    for_each_acc<TL>([&](int i, int j, int r) {
      const float v = fmaf(acc[i][j][r], sc.v[j][r & 1], sh.v[j][r & 1]);
      acc[i][j][r] = p.relu ? fmaxf(v, 0.0f) : v;
    });
  }
  const int n_rows = rows.valid_rows<TL::BM>();
  OutTile<T, TL>& out = *reinterpret_cast<OutTile<T, TL>*>(smem_raw);
  static_assert(sizeof(OutTile<T, TL>) <= sizeof(Smem<T, TL>), "the output tile reuses Smem");
  stage<T, TL>(out, acc, f);
  __syncthreads();
  for_each_out_chunk<T, TL>(n_rows, [&](int r, int c) {
    if (c >= b.n_valid) return;
    store_chunk(p.y + rows.flat(r) * p.cout + b.co0 + c, &out.v[r][c], b.n_valid - c,
                p.y_vec);
  });

  if (p.sums == nullptr) return;  // uniform over the CTA
  // The squeeze sums the fp32 values (before rounding to T), rows that exist only.
  float colsum[TL::NJ][2] = {};
  for_each_acc<TL>([&](int i, int j, int r) {
    if (f.row(i, r >> 1) < n_rows && f.col(j, r & 1) < b.n_valid) colsum[j][r & 1] += acc[i][j][r];
  });
  sum_columns<TL>(colsum, f, red, tile_sums);
  for (int c = threadIdx.x; c < b.n_valid; c += TL::kThreads)
    p.sums[static_cast<int64_t>(t.row) * p.cout + b.co0 + c] = tile_sums[c];
}

template <typename T, class TL, bool VEC>
cudaError_t launch_tile(ConvParams<T> p, int64_t ctas, cudaStream_t stream) {
  const size_t smem = sizeof(Smem<T, TL>);
  const cudaError_t err = allow_dynamic_smem(conv_bn_act_kernel<T, TL, VEC>, smem);
  if (err != cudaSuccess) return err;
  RK_LAUNCH(static_cast<unsigned>(ctas), TL::kThreads, smem, stream,
            conv_bn_act_kernel<T, TL, VEC>)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const rk_conv_bn_act_args& args, const rk_conv_plan& plan,
                   cudaStream_t stream) {
  const int64_t cin_g = args.c_in / args.groups, cout_g = args.c_out / args.groups;
  const int64_t hwo = plan.out_h * plan.out_w;
  ConvParams<T> p;
  p.a = a_operand<T>(args.x, args.sx_n, args.sx_h, args.sx_w, args.sx_c, args.h, args.w, cin_g,
                     args.k, args.stride);
  p.b = b_operand<T>(args.weight, args.sw_o, args.sw_i, args.sw_h, args.sw_w, cin_g, args.k);
  p.rows = RowMap::over(args.n * hwo, static_cast<int>(hwo), static_cast<int>(plan.out_w),
                        static_cast<int>(plan.tiles_per_image));
  p.cout = static_cast<int>(args.c_out);
  p.cout_g = static_cast<int>(cout_g);
  const int64_t tiles_n = (cout_g + plan.block_n - 1) / plan.block_n;
  p.tiles_n = FastDiv(static_cast<int>(tiles_n));
  p.scale = args.scale;
  p.shift = args.shift;
  p.relu = args.relu != 0;
  p.y = static_cast<T*>(args.y);
  constexpr int V = Layout<T>::kVec;
  p.y_vec = args.c_out % V == 0 && cout_g % V == 0 && aligned16(args.y);
  p.sums = args.sums;

  const int64_t row_tiles = plan.tiles_per_image > 0
                               ? args.n * plan.tiles_per_image
                               : (args.n * hwo + plan.block_m - 1) / plan.block_m;
  const int64_t cols = args.groups * tiles_n;
  if (cols > kInt32Max || row_tiles * cols > kInt32Max) return cudaErrorInvalidValue;
  p.cols = FastDiv(static_cast<int>(cols));
  return with_tile<T>(plan.block_m, plan.block_n, [&](auto tile) {
    using TL = decltype(tile);
    return p.a.vec && p.b.vec ? launch_tile<T, TL, true>(p, row_tiles * cols, stream)
                              : launch_tile<T, TL, false>(p, row_tiles * cols, stream);
  });
}

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
  return rk::with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (reinterpret_cast<uintptr_t>(a.y) % (2 * sizeof(T))) return cudaErrorInvalidValue;
    return rk::launch<T>(a, plan, stream);
  });
}
