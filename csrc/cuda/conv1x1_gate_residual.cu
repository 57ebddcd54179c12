// The end of a RegNet block in one kernel: 1x1 conv c with the SE gate applied as its
// input is loaded, folded BN, the shortcut and the final ReLU.
//   y = relu((x * gate[n, :]) @ w^T * scale + shift + shortcut')
//   shortcut' = res                                              (identity)
//             = (res[:, ::s, ::s, :] @ w_p^T) * scale_p + shift_p  (projection)
// The projection is a second implicit GEMM (rk::gemm, igemm.cuh, with stride s and a
// 1x1 kernel) into its own accumulator in the same CTA: its output never touches
// memory. Grid (1-D, cta_tile): tiles of BM output pixels x tiles of BN output
// channels, the channel tiles of a row tile adjacent (x is read from DRAM about once).
// fp16 / bf16 use tensor cores (mma.sync m16n8k16), fp32 uses FMAs.
#include "igemm.cuh"
#include "launchers.h"

namespace rk {
namespace {

template <typename T>
struct GateParams {
  AOperand<T, true> a;      // x (gated)
  BOperand<T> b;            // weight
  AOperand<T> ra;           // res through the projection's stride
  BOperand<T> rb;           // proj weight
  RowMap rows;
  int cout;
  FastDiv tiles_n;          // channel tiles (set by launch_tile)
  const float* scale;
  const float* shift;
  const float* pscale;
  const float* pshift;
  const T* res;             // identity shortcut
  int64_t srn, srh, srw, src;
  bool res_vec;             // res channels contiguous, chunks 16-byte aligned
  T* y;
  bool y_vec;               // y rows' channel chunks 16-byte aligned
};

// VEC: every operand of its GEMMs takes the pipelined main loop (only that loop is
// compiled in); else each GEMM picks its loop from its operands.
template <typename T, class TL, bool PROJECT, bool VEC>
__global__ void __launch_bounds__(TL::kThreads, TL::kMinCtas) conv1x1_gate_residual_kernel(
    const GateParams<T> p) {
  RK_DYNAMIC_SMEM(uint4, smem_raw);
  Smem<T, TL>& sm = *reinterpret_cast<Smem<T, TL>*>(smem_raw);
  constexpr Loads L = VEC ? Loads::kVector : Loads::kEither;
  const CtaTile t = cta_tile(p.tiles_n);
  RowMap rows = p.rows;
  rows.set_tile<TL::BM>(t.row);
  const int co0 = t.col * TL::BN;
  const int n_valid = min(TL::BN, p.cout - co0);

  BOperand<T> b = p.b;
  b.co0 = co0;
  b.n_valid = n_valid;
  const Frag<TL> f;
  // The folded BNs are applied to each accumulator right after its GEMM, so no
  // per-channel vectors are held across a GEMM (registers: two CTAs per SM).
  float acc[TL::MI][TL::NJ][4];
  zero<TL>(acc);
  gemm<T, TL, L>(acc, p.a, b, rows, sm);
  {
    const ChannelVec<TL> sc(p.scale, f, co0, n_valid), sh(p.shift, f, co0, n_valid);
    for_each_acc<TL>([&](int i, int j, int r) {
      acc[i][j][r] = fmaf(acc[i][j][r], sc.v[j][r & 1], sh.v[j][r & 1]);
    });
  }
  if constexpr (PROJECT) {
    BOperand<T> rb = p.rb;
    rb.co0 = co0;
    rb.n_valid = n_valid;
    float accp[TL::MI][TL::NJ][4];
    zero<TL>(accp);
    gemm<T, TL, L>(accp, p.ra, rb, rows, sm);
    const ChannelVec<TL> sc(p.pscale, f, co0, n_valid), sh(p.pshift, f, co0, n_valid);
    for_each_acc<TL>([&](int i, int j, int r) {
      acc[i][j][r] += fmaf(accp[i][j][r], sc.v[j][r & 1], sh.v[j][r & 1]);
    });
  }

  // Staged in fp32 (the residual is added before the one rounding to T).
  OutTile<float, TL>& out = *reinterpret_cast<OutTile<float, TL>*>(smem_raw);
  static_assert(sizeof(OutTile<float, TL>) <= sizeof(Smem<T, TL>), "the output tile reuses Smem");
  stage<float, TL>(out, acc, f);
  __syncthreads();
  constexpr int V = Layout<T>::kVec;
  for_each_out_chunk<T, TL>(rows.valid_rows<TL::BM>(), [&](int r, int c) {
    const int valid = n_valid - c;
    if (valid <= 0) return;
    int64_t m;
    int n, oh, ow;
    rows.decode(r, m, n, oh, ow);
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = out.v[r][c + j];
    if constexpr (!PROJECT) {
      alignas(16) T res[V];
      load_chunk(res, p.res + static_cast<int64_t>(n) * p.srn + oh * p.srh + ow * p.srw +
                          static_cast<int64_t>(co0 + c) * p.src,
                 p.src, valid, p.res_vec);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += Elem<T>::to_float(res[j]);
    }
    alignas(16) T y[V];
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] = Elem<T>::from_float(fmaxf(v[j], 0.0f));
    store_chunk(p.y + m * p.cout + co0 + c, y, valid, p.y_vec);
  });
}

// Tiles by output width: the 1x1 convs of RegNet blocks are dense (C_out >= 24).
using G128x32 = Tile<128, 32, 4, 1>;
using G128x64 = Tile<128, 64, 4, 2>;
using G64x128 = Tile<64, 128, 2, 4>;

template <typename T, class TL, bool PROJECT, bool VEC>
cudaError_t launch_tile(const GateParams<T>& p, int64_t m_total, cudaStream_t stream) {
  const int64_t row_tiles = (m_total + TL::BM - 1) / TL::BM;
  const int64_t tiles_n = (p.cout + TL::BN - 1) / TL::BN;
  if (row_tiles * tiles_n > kInt32Max) return cudaErrorInvalidValue;
  GateParams<T> q = p;
  q.tiles_n = FastDiv(static_cast<int>(tiles_n));
  const size_t smem = sizeof(Smem<T, TL>);
  const auto kernel = conv1x1_gate_residual_kernel<T, TL, PROJECT, VEC>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  RK_LAUNCH(static_cast<unsigned>(row_tiles * tiles_n), TL::kThreads, smem, stream, kernel)(q);
  return cudaGetLastError();
}

template <typename T, bool PROJECT, bool VEC>
cudaError_t launch_loads(const GateParams<T>& p, int64_t m_total, cudaStream_t stream) {
  if (p.cout <= 32) return launch_tile<T, G128x32, PROJECT, VEC>(p, m_total, stream);
  if (p.cout <= 64) return launch_tile<T, G128x64, PROJECT, VEC>(p, m_total, stream);
  return launch_tile<T, G64x128, PROJECT, VEC>(p, m_total, stream);
}

template <typename T, bool PROJECT>
cudaError_t launch_project(const GateParams<T>& p, int64_t m_total, cudaStream_t stream) {
  const bool vec = p.a.vec && p.b.vec && (!PROJECT || (p.ra.vec && p.rb.vec));
  return vec ? launch_loads<T, PROJECT, true>(p, m_total, stream)
             : launch_loads<T, PROJECT, false>(p, m_total, stream);
}

template <typename T>
cudaError_t launch(const rk_conv1x1_gate_residual_args& a, cudaStream_t stream) {
  GateParams<T> p;
  p.a = a_operand<T, true>(a.x, a.sx_n, a.sx_h, a.sx_w, a.sx_c, a.h, a.w, a.c_in, 1, 1);
  set_prologue(p.a, nullptr, nullptr, false, a.gate, a.s_gate_n);
  p.b = b_operand<T>(a.weight, a.sw_o, a.sw_i, 0, 0, a.c_in, 1);
  const bool project = a.proj_weight != nullptr;
  if (project) {
    p.ra = a_operand<T>(a.res, a.sr_n, a.sr_h, a.sr_w, a.sr_c, a.res_h, a.res_w, a.res_c, 1,
                        a.proj_stride);
    p.rb = b_operand<T>(a.proj_weight, a.sp_o, a.sp_i, 0, 0, a.res_c, 1);
  } else {  // unused: the identity shortcut is read in the epilogue
    p.ra = a_operand<T>(a.x, a.sx_n, a.sx_h, a.sx_w, a.sx_c, a.h, a.w, a.c_in, 1, 1);
    p.rb = p.b;
  }
  p.rows = RowMap::over(a.n * a.h * a.w, static_cast<int>(a.h * a.w), static_cast<int>(a.w), 0);
  p.cout = static_cast<int>(a.c_out);
  p.scale = a.scale;
  p.shift = a.shift;
  p.pscale = a.proj_scale;
  p.pshift = a.proj_shift;
  p.res = static_cast<const T*>(a.res);
  p.srn = a.sr_n;
  p.srh = a.sr_h;
  p.srw = a.sr_w;
  p.src = a.sr_c;
  p.y = static_cast<T*>(a.y);
  constexpr int V = Layout<T>::kVec;
  p.res_vec = !project && a.sr_c == 1 && a.sr_n % V == 0 && a.sr_h % V == 0 && a.sr_w % V == 0 &&
              a.c_out % V == 0 && aligned16(a.res);
  p.y_vec = a.c_out % V == 0 && aligned16(a.y);
  const int64_t m_total = p.rows.m_total;
  return project ? launch_project<T, true>(p, m_total, stream)
                 : launch_project<T, false>(p, m_total, stream);
}

}  // namespace
}  // namespace rk

extern "C" cudaError_t rk_conv1x1_gate_residual(const rk_conv1x1_gate_residual_args* args,
                                                cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const rk_conv1x1_gate_residual_args& a = *args;
  if (a.n < 0 || a.h < 0 || a.w < 0 || a.c_in < 1 || a.c_out < 1) return cudaErrorInvalidValue;
  if (a.n * a.h * a.w == 0) return cudaSuccess;
  constexpr int64_t kMax = rk::kInt32Max;
  if (a.n > kMax || a.h * a.w > kMax || a.c_in > kMax || a.c_out > kMax)
    return cudaErrorInvalidValue;
  if (a.x == nullptr || a.weight == nullptr || a.scale == nullptr || a.shift == nullptr ||
      a.res == nullptr || a.y == nullptr)
    return cudaErrorInvalidValue;
  if (a.proj_weight == nullptr) {  // identity: res is (N, Ho, Wo, C_out)
    if (a.res_h != a.h || a.res_w != a.w || a.res_c != a.c_out) return cudaErrorInvalidValue;
  } else {
    if (a.proj_scale == nullptr || a.proj_shift == nullptr || a.proj_stride < 1 ||
        a.res_c < 1 || a.res_c > kMax || a.res_h > kMax || a.res_w > kMax ||
        (a.res_h - 1) / a.proj_stride + 1 != a.h || (a.res_w - 1) / a.proj_stride + 1 != a.w)
      return cudaErrorInvalidValue;
  }
  return rk::with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (reinterpret_cast<uintptr_t>(a.y) % (2 * sizeof(T))) return cudaErrorInvalidValue;
    return rk::launch<T>(a, stream);
  });
}
