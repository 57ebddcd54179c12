// The convolutions of conv_bn_train (launchers.h, "Training ops"): the lazy-BN forward
// conv with its statistics in the epilogue, and the two backward convs (the BN pieces
// around them: bn_stats.cu).
//
// rk_conv_train   y = conv(u, w), u = relu?(x * in_scale + in_shift) * gate[n] applied
//                 as the A tile is loaded (rk::gemm, igemm.cuh). Epilogue: y stored raw,
//                 and per row tile and channel the tile's mean and M2 (centered sum of
//                 squares) of the fp32 accumulators, for rk_bn_finalize's Chan merge.
// rk_conv_dgrad   du = conv_transpose(dy, w) as an implicit GEMM over input pixels:
//                 du[n, ih, iw, ci] = sum over (kh, kw, co) of dy[n, oh, ow, co] *
//                 w[co, ci, kh, kw] with oh = (ih + pad - kh) / stride when that divides
//                 exactly; one CTA per stride phase (ih % s, iw % s) reduces over only
//                 the taps that divide. Epilogue: the prologue's backward, dx = du *
//                 gate * relu'(x * in_scale + in_shift), and per-image tiles' dgate
//                 partials.
// rk_conv_wgrad   dw[co, (kh, kw, ci)] = sum over pixels m of dy[m, co] * u[m @ tap, ci]:
//                 a GEMM with the pixels as its reduction, split over CTAs (grid x); each
//                 split writes an fp32 partial tile, summed in split order by a second
//                 kernel. u is recomputed from x through the same prologue.
// Every reduction runs in a fixed order: results are bit-reproducible run to run.
#include <algorithm>

#include "igemm.cuh"
#include "launchers.h"

namespace rk {
namespace {

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename T>
struct TrainParams {
  AOperand<T, true> a;      // ci0 set per CTA
  BOperand<T> b;            // co0 / n_valid set per CTA
  RowMap rows;
  int cout, cout_g;
  FastDiv tiles_n, cols;    // channel tiles per group, cols = groups * tiles_n (cta_tile)
  T* y;
  float* partials;          // nullptr, or (tiles_m, 2, C_out)
};

template <typename T, class TL>
__global__ void __launch_bounds__(TL::kThreads, TL::kMinCtas)
    conv_train_kernel(const TrainParams<T> p) {
  RK_DYNAMIC_SMEM(uint4, smem_raw);
  __shared__ float red[TL::WARPS_M][TL::BN];
  __shared__ float col[TL::BN];
  Smem<T, TL>& sm = *reinterpret_cast<Smem<T, TL>*>(smem_raw);

  const CtaTile t = cta_tile(p.cols);
  RowMap rows = p.rows;
  rows.set_tile<TL::BM>(t.row);
  float acc[TL::MI][TL::NJ][4];
  const BOperand<T> b = grouped_gemm<T, TL>(acc, p.a, p.b, p.cout_g, p.tiles_n, t.col, rows, sm);

  const Frag<TL> f;
  float colsum[TL::NJ][2] = {};
  for_each_row(f, rows, [&](int i, int h, int64_t m, int, int, int, bool rok) {
    if (!rok) return;
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (f.col(j, e) < b.n_valid) colsum[j][e] += acc[i][j][2 * h + e];
      store_pair(p.y, m * p.cout + b.co0 + f.col(j, 0), acc[i][j][2 * h], acc[i][j][2 * h + 1],
                 f.col(j, 0) < b.n_valid, f.col(j, 1) < b.n_valid);
    }
  });
  if (p.partials == nullptr) return;  // uniform over the CTA (a frozen BN)

  // The tile's mean per channel, then its centered sum of squares around that mean
  // (no E[y^2] - E[y]^2 cancellation), from the fp32 accumulators still in registers.
  const int64_t row0 = static_cast<int64_t>(t.row) * TL::BM;
  const float inv_rows =
      1.0f / static_cast<float>(min(static_cast<int64_t>(TL::BM), p.rows.m_total - row0));
  float* out = p.partials + static_cast<int64_t>(t.row) * 2 * p.cout + b.co0;
  sum_columns<TL>(colsum, f, red, col);
  float mean[TL::NJ][2], m2[TL::NJ][2] = {};
#pragma unroll
  for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) mean[j][e] = col[f.col(j, e)] * inv_rows;
  for (int c = threadIdx.x; c < b.n_valid; c += TL::kThreads) out[c] = col[c] * inv_rows;
  for_each_row(f, rows, [&](int i, int h, int64_t, int, int, int, bool rok) {
    if (!rok) return;
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float d = acc[i][j][2 * h + e] - mean[j][e];
        if (f.col(j, e) < b.n_valid) m2[j][e] = fmaf(d, d, m2[j][e]);
      }
  });
  sum_columns<TL>(m2, f, red, col);
  for (int c = threadIdx.x; c < b.n_valid; c += TL::kThreads) out[p.cout + c] = col[c];
}

// ---------------------------------------------------------------------------
// dgrad
// ---------------------------------------------------------------------------

// The dgrad's A operand: rows are input pixels (n, ih, iw), the reduction runs over
// k = (kh, kw, co) of one group, and A[(n, ih, iw), k] = dy[n, oh, ow, co0 + co] for
// oh = (ih + pad - kh) / stride when exact and inside the output, else 0. With a
// stride s the input pixels split into s * s phases (ih % s, iw % s); a phase's pixels
// meet only the taps kh = kh0 + s * j (and kw alike), so each CTA takes one phase
// (blockIdx.z) and reduces over that phase's taps only: no multiplications by the
// zeros of the other taps (4x fewer for a 3x3 stride-2 conv). Same interface as
// AOperand (igemm.cuh), with rows numbered on the phase's pixel grid.
template <typename T>
struct DgradA {
  const T* dy;              // (N, Ho, Wo, C_out) dense
  int64_t sn, sh;           // Ho * Wo * C_out, Wo * C_out (the pixel stride is C_out)
  int cout;
  int out_h, out_w;
  int cout_g, co0;          // the reduction's channels: this group's output channels
  int ks, stride, pad;
  int ph, pw;               // the phase: input pixels ih = ph + stride * i, iw = pw + stride * j
  int kh0, kw0, n_kh, n_kw; // its taps kh = kh0 + stride * t, t < n_kh (kw alike)
  bool vec;                 // 16-byte chunks: cout_g and C_out multiples of kVec, aligned

  __device__ __forceinline__ void set_group(int g) { co0 = g * cout_g; }
  __device__ __forceinline__ void set_phase(int phase) {
    ph = phase / stride;
    pw = phase - ph * stride;
    kh0 = (ph + pad) % stride;
    kw0 = (pw + pad) % stride;
    n_kh = kh0 < ks ? (ks - kh0 + stride - 1) / stride : 0;
    n_kw = kw0 < ks ? (ks - kw0 + stride - 1) / stride : 0;
  }
  __device__ __forceinline__ int k_total() const { return n_kh * n_kw * cout_g; }
  __device__ __forceinline__ KPos at(int k) const {
    KPos q;
    const int tap = k / cout_g;
    q.ci = k - tap * cout_g;
    const int th = n_kw > 0 ? tap / n_kw : 0;
    q.kh = kh0 + th * stride;
    q.kw = kw0 + (tap - th * n_kw) * stride;
    q.ok = k < k_total();
    return q;
  }
  // Row (i, j) of the phase grid: input pixel (ph + stride * i, pw + stride * j).
  __device__ __forceinline__ RowPos row(int n, int i, int j, bool ok) const {
    return RowPos{n, ph + stride * i + pad, pw + stride * j + pad, ok};
  }
  // The dy element a tap reads, if any: row offset of dy[n, oh, ow, :]. The phase's
  // taps divide exactly; only the output's bounds remain.
  __device__ __forceinline__ bool source(const RowPos& r, const KPos& q, int64_t& off) const {
    const int th = r.ih0 - q.kh, tw = r.iw0 - q.kw;
    if (!(r.ok && q.ok) || th < 0 || tw < 0) return false;
    const int oh = th / stride, ow = tw / stride;
    if (oh >= out_h || ow >= out_w) return false;
    off = static_cast<int64_t>(r.n) * sn + oh * sh + static_cast<int64_t>(ow) * cout + co0;
    return true;
  }
  __device__ __forceinline__ T load(const RowPos& r, const KPos& q) const {
    int64_t off;
    return source(r, q, off) ? dy[off + q.ci] : Elem<T>::from_float(0.0f);
  }
  __device__ __forceinline__ const T* vec_src(const RowPos& r, const KPos& q) const {
    int64_t off;
    return source(r, q, off) ? dy + off + q.ci : nullptr;
  }
  // dy is read as it is: no prologue (its backward runs in the epilogue).
  __device__ __forceinline__ bool transforms() const { return false; }
  __device__ __forceinline__ void transform_chunk(T*, const RowPos&, const KPos&) const {}
};

template <typename T>
struct DgradParams {
  DgradA<T> a;              // co0 and the phase set per CTA
  BOperand<T> b;            // weight_t rows: co0 = the tile's first input channel
  int tiles_per_image;      // per phase, with a gate (per-image tiles), else 0
  int n, h, w;              // the input's size
  int cin, cin_g;
  FastDiv tiles_n;          // channel tiles per group
  const T* x;               // read only with a prologue
  int64_t sxn, sxh, sxw, sxc;
  rk_prologue pro;
  T* dx;
  float* dgate;             // (N, phases * tiles_per_image, C_in), with a gate
};

// This CTA's row of dgate partials, (image, phase, tile): an image's tiles phase by phase.
__device__ __forceinline__ int64_t dgate_slot(int tiles_per_image) {
  const int img = static_cast<int>(blockIdx.x) / tiles_per_image;
  return (static_cast<int64_t>(img) * gridDim.z + blockIdx.z) * tiles_per_image +
         (static_cast<int>(blockIdx.x) - img * tiles_per_image);
}

template <typename T, class TL>
__global__ void __launch_bounds__(TL::kThreads, TL::kMinCtas)
    conv_dgrad_kernel(const DgradParams<T> p) {
  RK_DYNAMIC_SMEM(uint4, smem_raw);
  __shared__ float red[TL::WARPS_M][TL::BN];
  __shared__ float col[TL::BN];
  Smem<T, TL>& sm = *reinterpret_cast<Smem<T, TL>*>(smem_raw);

  // This CTA's phase and the RowMap over its pixel grid (hp x wp per image).
  DgradA<T> a = p.a;
  a.set_phase(static_cast<int>(blockIdx.z));
  const int s = a.stride;
  const int hp = (p.h - a.ph + s - 1) / s, wp = (p.w - a.pw + s - 1) / s;
  if (hp <= 0 || wp <= 0) {  // a phase without pixels (stride > H or W): zero dgate sums
    const int group = p.tiles_n.div(static_cast<int>(blockIdx.y));
    const int n0 = (static_cast<int>(blockIdx.y) - group * p.tiles_n.d) * TL::BN;
    float* out = p.dgate == nullptr ? nullptr
                                    : p.dgate + dgate_slot(p.tiles_per_image) * p.cin +
                                          group * p.cin_g + n0;
    for (int c = threadIdx.x; out != nullptr && c < min(TL::BN, p.cin_g - n0); c += TL::kThreads)
      out[c] = 0.0f;
    return;
  }
  RowMap rows = RowMap::over(static_cast<int64_t>(p.n) * hp * wp, hp * wp, wp, p.tiles_per_image);
  rows.set_tile<TL::BM>(static_cast<int>(blockIdx.x));

  float acc[TL::MI][TL::NJ][4];
  const BOperand<T> b =
      grouped_gemm<T, TL>(acc, a, p.b, p.cin_g, p.tiles_n, static_cast<int>(blockIdx.y), rows, sm);

  // dx = du * gate * relu'(v) and dgate += du * relu?(v), v = x * in_scale + in_shift.
  const Frag<TL> f;
  const bool transform = p.pro.in_scale != nullptr || p.pro.in_relu || p.pro.gate != nullptr;
  float dgate[TL::NJ][2] = {};
  for_each_row(f, rows, [&](int i, int h, int64_t, int n, int gi, int gj, bool rok) {
    if (!rok) return;
    const int ih = a.ph + s * gi, iw = a.pw + s * gj;
    const int64_t m = (static_cast<int64_t>(n) * p.h + ih) * p.w + iw;
    const T* xrow =
        transform ? p.x + static_cast<int64_t>(n) * p.sxn + ih * p.sxh + iw * p.sxw : nullptr;
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j) {
      float d[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        d[e] = acc[i][j][2 * h + e];
        const int c = b.co0 + f.col(j, e);
        if (!transform || f.col(j, e) >= b.n_valid) continue;
        float v = Elem<T>::to_float(xrow[c * p.sxc]);
        if (p.pro.in_scale != nullptr) v = fmaf(v, __ldg(p.pro.in_scale + c), __ldg(p.pro.in_shift + c));
        if (p.pro.gate != nullptr) {
          dgate[j][e] = fmaf(d[e], p.pro.in_relu ? fmaxf(v, 0.0f) : v, dgate[j][e]);
          d[e] *= __ldg(p.pro.gate + static_cast<int64_t>(n) * p.pro.s_gate_n + c);
        }
        if (p.pro.in_relu && !(v > 0.0f)) d[e] = 0.0f;
      }
      store_pair(p.dx, m * p.cin + b.co0 + f.col(j, 0), d[0], d[1], f.col(j, 0) < b.n_valid,
                 f.col(j, 1) < b.n_valid);
    }
  });
  if (p.dgate == nullptr) return;  // uniform over the CTA
  sum_columns<TL>(dgate, f, red, col);
  float* out = p.dgate + dgate_slot(p.tiles_per_image) * p.cin + b.co0;
  for (int c = threadIdx.x; c < b.n_valid; c += TL::kThreads) out[c] = col[c];
}

// ---------------------------------------------------------------------------
// wgrad
// ---------------------------------------------------------------------------

// GEMM rows: the group's output channels (tile of BM), columns: k = (kh, kw, ci) (tile
// of BN), reduction: the output pixels of this CTA's split. Both operands are gathered
// transposed into the [row][reduction] shared-memory layout compute_stage reads.
template <typename T>
struct WgradParams {
  AOperand<T, true> u;      // x through the prologue; ci0 set per CTA
  const T* dy;              // (M, C_out) dense
  bool dy_vec;              // 16-byte chunks of dy: C_out, cout_g multiples of kVec, aligned
  RowMap rows;              // over output pixels
  int cout, cout_g, kdim;   // kdim = k * k * cin_g
  int tiles_co, tiles_k;
  int64_t chunk;            // pixels per split (a multiple of BK)
  float* partials;          // (splits, C_out, kdim)
};

// kVec elements, loaded as one 16-byte chunk or one by one.
template <typename T>
union Chunk {
  uint4 u;
  T e[Layout<T>::kVec];
  __device__ Chunk() {}
};

// VEC: both gathers take 16-byte chunks (p.u.vec && p.dy_vec; only that code is compiled
// in), else each picks its path at run time.
template <typename T, class TL, bool VEC>
__global__ void __launch_bounds__(TL::kThreads, TL::kMinCtas)
    conv_wgrad_kernel(const WgradParams<T> p) {
  constexpr int BK = Layout<T>::kBK, V = Layout<T>::kVec;
  static_assert(TL::BM % V == 0 && TL::BN % V == 0, "tiles of whole chunks");
  __shared__ __align__(16) unsigned char smem_raw[sizeof(Smem<T, TL, 1>)];
  Smem<T, TL, 1>& sm = *reinterpret_cast<Smem<T, TL, 1>*>(smem_raw);

  const int tile = static_cast<int>(blockIdx.y);
  const int group = tile / (p.tiles_co * p.tiles_k);
  const int rest = tile - group * p.tiles_co * p.tiles_k;
  const int co_t = (rest / p.tiles_k) * TL::BM, k_t = (rest % p.tiles_k) * TL::BN;
  const int co0 = group * p.cout_g + co_t;
  const int co_valid = min(TL::BM, p.cout_g - co_t), k_valid = min(TL::BN, p.kdim - k_t);
  AOperand<T, true> u = p.u;
  u.set_group(group);
  const int64_t m_begin = static_cast<int64_t>(blockIdx.x) * p.chunk;
  const int64_t m_end = min(m_begin + p.chunk, p.rows.m_total);
  // Pixel m = m_begin + off of the split is pixel p_begin + off of image n_begin (the
  // plan keeps chunk + Ho * Wo under 2^31): one 64-bit division per CTA, FastDivs after.
  const int n_begin = static_cast<int>(m_begin / p.rows.hwo.d);
  const int p_begin = static_cast<int>(m_begin - static_cast<int64_t>(n_begin) * p.rows.hwo.d);

  float acc[TL::MI][TL::NJ][4];
  zero<TL>(acc);
  const Frag<TL> f;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BK) {
    // dy^T: chunks of V channels of one pixel, consecutive threads on consecutive chunks
    // (coalesced), scattered down a column of the [channel][pixel] tile.
    for (int idx = threadIdx.x; idx < (TL::BM / V) * BK; idx += TL::kThreads) {
      const int r = (idx % (TL::BM / V)) * V, kk = idx / (TL::BM / V);
      const int64_t m = m0 + kk;
      const T* src = p.dy + m * p.cout + co0 + r;
      Chunk<T> v;
      if (VEC || p.dy_vec) {
        v.u = (r < co_valid && m < m_end) ? __ldg(reinterpret_cast<const uint4*>(src))
                                          : make_uint4(0u, 0u, 0u, 0u);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j)
          v.e[j] = (r + j < co_valid && m < m_end) ? src[j] : Elem<T>::from_float(0.0f);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) sm.a[0][r + j][kk] = v.e[j];
    }
    // u^T at the tile's k positions: chunks of V channels of one tap of one pixel.
    for (int idx = threadIdx.x; idx < (TL::BN / V) * BK; idx += TL::kThreads) {
      const int c = (idx % (TL::BN / V)) * V, kk = idx / (TL::BN / V);
      const int64_t m = m0 + kk;
      Chunk<T> v;
      v.u = make_uint4(0u, 0u, 0u, 0u);
      if (c < k_valid && m < m_end) {
        const int q = p_begin + static_cast<int>(m - m_begin);
        const int dn = p.rows.hwo.div(q);
        const int px = q - dn * p.rows.hwo.d;
        const int oh = p.rows.wo.div(px);
        const RowPos pos = u.row(n_begin + dn, oh, px - oh * p.rows.wo.d, true);
        if (VEC || u.vec) {
          v.u = u.load_vec(pos, u.at(k_t + c));
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j)
            v.e[j] = c + j < k_valid ? u.load(pos, u.at(k_t + c + j)) : Elem<T>::from_float(0.0f);
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) sm.b[0][c + j][kk] = v.e[j];
    }
    __syncthreads();
    compute_stage<T, TL>(acc, sm, 0, f);
    __syncthreads();
  }

  float* out = p.partials + static_cast<int64_t>(blockIdx.x) * p.cout * p.kdim;
#pragma unroll
  for (int i = 0; i < TL::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = f.row(i, h);
      if (r >= co_valid) continue;
#pragma unroll
      for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (f.col(j, e) < k_valid)
            out[static_cast<int64_t>(co0 + r) * p.kdim + k_t + f.col(j, e)] = acc[i][j][2 * h + e];
    }
}

// dw[i] = sum over splits s (in order) of partials[s, i].
template <typename T>
__global__ void __launch_bounds__(256) wgrad_reduce_kernel(const float* partials, int64_t size,
                                                           int splits, T* dw) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += partials[k * size + i];
    dw[i] = Elem<T>::from_float(s);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int64_t conv_out(int64_t size, int64_t k, int64_t stride) {
  const int64_t pad = k / 2;
  return size + 2 * pad >= k ? (size + 2 * pad - k) / stride + 1 : 0;
}

bool bad_geometry(int64_t n, int64_t h, int64_t w, int64_t c_in, int64_t c_out, int64_t k,
                  int64_t stride, int64_t groups) {
  return n < 0 || h < 0 || w < 0 || c_in < 1 || c_out < 1 || k < 1 || k % 2 == 0 ||
         stride < 1 || groups < 1 || c_in % groups != 0 || c_out % groups != 0 || n > kInt32Max ||
         h > kInt32Max || w > kInt32Max || h * w > kInt32Max || c_in > kInt32Max ||
         c_out > kInt32Max || k * k * (c_in / groups) > kInt32Max ||
         k * k * (c_out / groups) > kInt32Max;
}

bool bad_prologue(const rk_prologue& pro) {
  return (pro.in_scale == nullptr) != (pro.in_shift == nullptr) ||
         (pro.gate != nullptr && pro.s_gate_n < 0);
}

template <typename T>
void set_prologue(AOperand<T, true>& a, const rk_prologue& pro) {
  rk::set_prologue(a, pro.in_scale, pro.in_shift, pro.in_relu != 0, pro.gate, pro.s_gate_n);
}

template <typename T>
cudaError_t launch_train(const rk_conv_train_args& args, const rk_conv_train_plan_t& plan,
                         cudaStream_t stream) {
  const int64_t cin_g = args.c_in / args.groups, cout_g = args.c_out / args.groups;
  const int64_t hwo = plan.out_h * plan.out_w;
  int64_t bm, bn;
  pick_tiles(args.dtype, cout_g, args.n * hwo, &bm, &bn);
  TrainParams<T> p;
  p.a = a_operand<T, true>(args.x, args.sx_n, args.sx_h, args.sx_w, args.sx_c, args.h, args.w,
                           cin_g, args.k, args.stride);
  set_prologue(p.a, args.prologue);
  p.b = b_operand<T>(args.weight, args.sw_o, args.sw_i, args.sw_h, args.sw_w, cin_g, args.k);
  p.rows = RowMap::over(args.n * hwo, static_cast<int>(hwo), static_cast<int>(plan.out_w), 0);
  p.cout = static_cast<int>(args.c_out);
  p.cout_g = static_cast<int>(cout_g);
  const int64_t tiles_n = (cout_g + bn - 1) / bn;
  p.tiles_n = FastDiv(static_cast<int>(tiles_n));
  p.y = static_cast<T*>(args.y);
  p.partials = args.partials;
  const int64_t cols = args.groups * tiles_n;
  if (cols > kInt32Max || plan.tiles_m * cols > kInt32Max) return cudaErrorInvalidValue;
  p.cols = FastDiv(static_cast<int>(cols));
  return with_tile<T>(bm, bn, [&](auto tile) {
    using TL = decltype(tile);
    const size_t smem = sizeof(Smem<T, TL>);
    const cudaError_t err = allow_dynamic_smem(conv_train_kernel<T, TL>, smem);
    if (err != cudaSuccess) return err;
    RK_LAUNCH(static_cast<unsigned>(plan.tiles_m * cols), TL::kThreads, smem, stream,
              conv_train_kernel<T, TL>)(p);
    return cudaGetLastError();
  });
}

// The dgrad's decomposition: stride * stride phases (grid z), each tiled over its pixel
// grid (at most ceil(H / s) x ceil(W / s) per image; per image when there is a gate).
struct DgradPlan {
  int64_t bm, bn, phases, phase_h, phase_w, tiles_per_image;  // tiles per phase and image
};

DgradPlan dgrad_plan(const rk_conv_dgrad_args& a) {
  DgradPlan d;
  d.phases = a.stride * a.stride;
  d.phase_h = (a.h + a.stride - 1) / a.stride;
  d.phase_w = (a.w + a.stride - 1) / a.stride;
  const int64_t per_image = d.phase_h * d.phase_w;
  const bool gated = a.prologue.gate != nullptr;
  pick_tiles(a.dtype, a.c_in / a.groups, gated ? per_image : a.n * per_image, &d.bm, &d.bn);
  d.tiles_per_image = gated ? (per_image + d.bm - 1) / d.bm : 0;
  return d;
}

template <typename T>
cudaError_t launch_dgrad(const rk_conv_dgrad_args& args, const DgradPlan& plan,
                         cudaStream_t stream) {
  constexpr int V = Layout<T>::kVec;
  const int64_t cin_g = args.c_in / args.groups, cout_g = args.c_out / args.groups;
  DgradParams<T> p;
  p.a = DgradA<T>{};
  p.a.dy = static_cast<const T*>(args.dy);
  p.a.sh = args.out_w * args.c_out;
  p.a.sn = args.out_h * p.a.sh;
  p.a.cout = static_cast<int>(args.c_out);
  p.a.out_h = static_cast<int>(args.out_h);
  p.a.out_w = static_cast<int>(args.out_w);
  p.a.cout_g = static_cast<int>(cout_g);
  p.a.ks = static_cast<int>(args.k);
  p.a.stride = static_cast<int>(args.stride);
  p.a.pad = static_cast<int>(args.k / 2);
  p.a.vec = cout_g % V == 0 && args.c_out % V == 0 && aligned16(args.dy);
  // weight_t (C_in, k, k, cout_g): row ci, reduction k = (kh, kw, co).
  p.b = b_operand<T>(args.weight_t, args.k * args.k * cout_g, 1, args.k * cout_g, cout_g, cout_g,
                     args.k);
  p.tiles_per_image = static_cast<int>(plan.tiles_per_image);
  p.n = static_cast<int>(args.n), p.h = static_cast<int>(args.h), p.w = static_cast<int>(args.w);
  p.cin = static_cast<int>(args.c_in);
  p.cin_g = static_cast<int>(cin_g);
  const int64_t tiles_n = (cin_g + plan.bn - 1) / plan.bn;
  p.tiles_n = FastDiv(static_cast<int>(tiles_n));
  p.x = static_cast<const T*>(args.x);
  p.sxn = args.sx_n, p.sxh = args.sx_h, p.sxw = args.sx_w, p.sxc = args.sx_c;
  p.pro = args.prologue;
  p.dx = static_cast<T*>(args.dx);
  p.dgate = args.prologue.gate != nullptr ? args.dgate_partials : nullptr;
  const int64_t grid_x = plan.tiles_per_image > 0
                             ? args.n * plan.tiles_per_image
                             : (args.n * plan.phase_h * plan.phase_w + plan.bm - 1) / plan.bm;
  const int64_t grid_y = args.groups * tiles_n;
  if (grid_x > kInt32Max || grid_y > 65535 || plan.phases > 65535) return cudaErrorInvalidValue;
  return with_tile<T>(plan.bm, plan.bn, [&](auto tile) {
    using TL = decltype(tile);
    const size_t smem = sizeof(Smem<T, TL>);
    const cudaError_t err = allow_dynamic_smem(conv_dgrad_kernel<T, TL>, smem);
    if (err != cudaSuccess) return err;
    RK_LAUNCH(dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y),
                   static_cast<unsigned>(plan.phases)),
              TL::kThreads, smem, stream, conv_dgrad_kernel<T, TL>)(p);
    return cudaGetLastError();
  });
}

// The wgrad's decomposition: BM output channels x BN k positions per CTA, the pixels
// split so that about 1024 CTAs run, within a 2^25-float (128 MiB) workspace.
struct WgradPlan {
  int64_t bm, bn, kdim, tiles_co, tiles_k, splits, chunk, m_total;
};

using W16x64 = Tile<16, 64, 1, 4>;
using W32x64 = Tile<32, 64, 2, 2>;
using W64x64 = Tile<64, 64, 2, 2>;

bool wgrad_plan(const rk_conv_wgrad_args& a, WgradPlan* plan) {
  if (bad_geometry(a.n, a.h, a.w, a.c_in, a.c_out, a.k, a.stride, a.groups) ||
      a.out_h != conv_out(a.h, a.k, a.stride) || a.out_w != conv_out(a.w, a.k, a.stride))
    return false;
  const int64_t cout_g = a.c_out / a.groups;
  const int64_t bk = a.dtype == RK_FLOAT32 ? Layout<float>::kBK : Layout<__half>::kBK;
  plan->bm = cout_g <= 16 ? 16 : cout_g <= 32 ? 32 : 64;
  plan->bn = 64;
  plan->kdim = a.k * a.k * (a.c_in / a.groups);
  plan->tiles_co = (cout_g + plan->bm - 1) / plan->bm;
  plan->tiles_k = (plan->kdim + plan->bn - 1) / plan->bn;
  plan->m_total = a.n * a.out_h * a.out_w;
  const int64_t ctas = a.groups * plan->tiles_co * plan->tiles_k;
  const int64_t steps = (plan->m_total + bk - 1) / bk;
  int64_t splits = std::min((1024 + ctas - 1) / ctas, (int64_t{1} << 25) / (a.c_out * plan->kdim));
  splits = std::max<int64_t>(1, std::min(splits, steps));
  // chunk + Ho * Wo < 2^31 (the kernel's 32-bit pixel offsets inside a split)
  const int64_t hwo = a.out_h * a.out_w, max_chunk = (int64_t{1} << 30) / bk * bk;
  if (hwo > (int64_t{1} << 30)) return false;
  splits = std::max(splits, (steps * bk + max_chunk - 1) / max_chunk);
  plan->chunk = std::min(max_chunk, std::max<int64_t>(1, (steps + splits - 1) / splits) * bk);
  plan->splits = plan->m_total > 0 ? (plan->m_total + plan->chunk - 1) / plan->chunk : 0;
  return ctas <= 65535 && plan->splits <= kInt32Max;
}

template <typename T>
cudaError_t launch_wgrad(const rk_conv_wgrad_args& args, const WgradPlan& plan,
                         cudaStream_t stream) {
  const int64_t cin_g = args.c_in / args.groups;
  const int64_t size = args.c_out * plan.kdim;
  if (plan.splits > 0) {
    WgradParams<T> p;
    p.u = a_operand<T, true>(args.x, args.sx_n, args.sx_h, args.sx_w, args.sx_c, args.h, args.w,
                             cin_g, args.k, args.stride);
    set_prologue(p.u, args.prologue);
    p.dy = static_cast<const T*>(args.dy);
    constexpr int V = Layout<T>::kVec;
    p.dy_vec = args.c_out % V == 0 && (args.c_out / args.groups) % V == 0 && aligned16(args.dy);
    const int64_t hwo = args.out_h * args.out_w;
    p.rows = RowMap::over(plan.m_total, static_cast<int>(hwo), static_cast<int>(args.out_w), 0);
    p.cout = static_cast<int>(args.c_out);
    p.cout_g = static_cast<int>(args.c_out / args.groups);
    p.kdim = static_cast<int>(plan.kdim);
    p.tiles_co = static_cast<int>(plan.tiles_co);
    p.tiles_k = static_cast<int>(plan.tiles_k);
    p.chunk = plan.chunk;
    p.partials = args.workspace;
    const dim3 grid(static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(args.groups * plan.tiles_co * plan.tiles_k));
    auto run = [&](auto tile) {
      using TL = decltype(tile);
      if (p.u.vec && p.dy_vec)
        RK_LAUNCH(grid, TL::kThreads, 0, stream, conv_wgrad_kernel<T, TL, true>)(p);
      else
        RK_LAUNCH(grid, TL::kThreads, 0, stream, conv_wgrad_kernel<T, TL, false>)(p);
      return cudaGetLastError();
    };
    const cudaError_t err = plan.bm == 16 ? run(W16x64{}) : plan.bm == 32 ? run(W32x64{})
                                                                          : run(W64x64{});
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = std::min<int64_t>((size + 255) / 256, 4096);
  RK_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, wgrad_reduce_kernel<T>)(
      args.workspace, size, static_cast<int>(plan.splits), static_cast<T*>(args.dw));
  return cudaGetLastError();
}

}  // namespace
}  // namespace rk

extern "C" cudaError_t rk_conv_train_plan(const rk_conv_train_args* args,
                                          rk_conv_train_plan_t* plan) {
  if (args == nullptr || plan == nullptr) return cudaErrorInvalidValue;
  const rk_conv_train_args& a = *args;
  if (rk::bad_geometry(a.n, a.h, a.w, a.c_in, a.c_out, a.k, a.stride, a.groups))
    return cudaErrorInvalidValue;
  plan->out_h = rk::conv_out(a.h, a.k, a.stride);
  plan->out_w = rk::conv_out(a.w, a.k, a.stride);
  const int64_t rows = a.n * plan->out_h * plan->out_w;
  int64_t bn;
  rk::pick_tiles(a.dtype, a.c_out / a.groups, rows, &plan->block_m, &bn);
  plan->tiles_m = (rows + plan->block_m - 1) / plan->block_m;
  return cudaSuccess;
}

extern "C" cudaError_t rk_conv_train(const rk_conv_train_args* args, cudaStream_t stream) {
  rk_conv_train_plan_t plan;
  const cudaError_t err = rk_conv_train_plan(args, &plan);
  if (err != cudaSuccess) return err;
  const rk_conv_train_args& a = *args;
  if (rk::bad_prologue(a.prologue)) return cudaErrorInvalidValue;
  if (a.n * plan.out_h * plan.out_w == 0) return cudaSuccess;
  if (a.x == nullptr || a.weight == nullptr || a.y == nullptr) return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (reinterpret_cast<uintptr_t>(a.y) % (2 * sizeof(T))) return cudaErrorInvalidValue;
    return rk::launch_train<T>(a, plan, stream);
  });
}

extern "C" cudaError_t rk_conv_dgrad_plan(const rk_conv_dgrad_args* args,
                                          rk_conv_dgrad_plan_t* plan) {
  if (args == nullptr || plan == nullptr) return cudaErrorInvalidValue;
  const rk_conv_dgrad_args& a = *args;
  if (rk::bad_geometry(a.n, a.h, a.w, a.c_in, a.c_out, a.k, a.stride, a.groups) ||
      a.out_h != rk::conv_out(a.h, a.k, a.stride) || a.out_w != rk::conv_out(a.w, a.k, a.stride))
    return cudaErrorInvalidValue;
  const rk::DgradPlan d = rk::dgrad_plan(a);
  plan->block_m = d.bm;
  plan->tiles_per_image = d.phases * d.tiles_per_image;
  return cudaSuccess;
}

extern "C" cudaError_t rk_conv_dgrad(const rk_conv_dgrad_args* args, cudaStream_t stream) {
  rk_conv_dgrad_plan_t plan;
  const cudaError_t err = rk_conv_dgrad_plan(args, &plan);
  if (err != cudaSuccess) return err;
  const rk_conv_dgrad_args& a = *args;
  if (rk::bad_prologue(a.prologue)) return cudaErrorInvalidValue;
  if (a.n * a.h * a.w == 0) return cudaSuccess;
  const bool transform = a.prologue.in_scale != nullptr || a.prologue.in_relu ||
                         a.prologue.gate != nullptr;
  if (a.dy == nullptr || a.weight_t == nullptr || a.dx == nullptr ||
      (transform && a.x == nullptr) || (a.prologue.gate != nullptr && a.dgate_partials == nullptr))
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (reinterpret_cast<uintptr_t>(a.dx) % (2 * sizeof(T))) return cudaErrorInvalidValue;
    return rk::launch_dgrad<T>(a, rk::dgrad_plan(a), stream);
  });
}

extern "C" int64_t rk_conv_wgrad_workspace(const rk_conv_wgrad_args* args) {
  rk::WgradPlan plan;
  if (args == nullptr || !rk::wgrad_plan(*args, &plan)) return -1;
  return plan.splits * args->c_out * plan.kdim;
}

extern "C" cudaError_t rk_conv_wgrad(const rk_conv_wgrad_args* args, cudaStream_t stream) {
  rk::WgradPlan plan;
  if (args == nullptr || !rk::wgrad_plan(*args, &plan)) return cudaErrorInvalidValue;
  const rk_conv_wgrad_args& a = *args;
  if (rk::bad_prologue(a.prologue)) return cudaErrorInvalidValue;
  if (a.dw == nullptr || (plan.splits > 0 && (a.dy == nullptr || a.x == nullptr ||
                                              a.workspace == nullptr)))
    return cudaErrorInvalidValue;
  return rk::with_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    return rk::launch_wgrad<T>(a, plan, stream);
  });
}
