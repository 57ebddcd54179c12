// The implicit-GEMM main loop shared by conv_bn_act.cu and conv1x1_gate_residual.cu.
//
// A convolution with `groups` groups is, per group, a GEMM
//     out[m, co] = sum_k A[m, k] * B[k, co]
// with m = (n, oh, ow) over output pixels, co over the group's output channels and
// k = (kh, kw, ci) flattened, ci fastest, over K = k * k * C_in_g. A is gathered from
// the NHWC input as it is loaded (padding and out-of-range rows are zeros); B is read
// from the (C_out, C_in_g, k, k) weight through its strides. One CTA computes a
// BM x BN tile of one group (never a block-diagonal tile over several groups).
//
// Data movement: each K step of BK, every thread loads its 16-byte chunks of the A and
// B tiles into registers (one 16-byte load per chunk on the vector path, element loads
// otherwise), the CTA computes on the other shared-memory buffer meanwhile, then the
// registers are stored to shared memory (double buffer, one barrier per K step).
//
// Compute: a warp owns a WM x WN sub-tile made of MI x NJ m16n8 fragments.
// fp16 / bf16: mma.sync.m16n8k16 with fp32 accumulation (tensor cores, sm_80+).
// fp32: scalar FMAs on the same fragment layout, so the epilogues are shared.
// Fragment layout (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   acc[i][j][0..1]: row g,     cols 2t, 2t + 1 of fragment (i, j)
//   acc[i][j][2..3]: row g + 8, cols 2t, 2t + 1
#ifndef REGNET_KERNELS_CUDA_IGEMM_CUH_
#define REGNET_KERNELS_CUDA_IGEMM_CUH_

#include "dtypes.cuh"

namespace rk {

// Elements per 16-byte chunk, the K step and the shared-memory row padding
// (16 bytes: keeps 16-byte chunk stores aligned and fragment reads conflict-free).
template <typename T> struct Layout {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kBK = sizeof(T) == 2 ? 32 : 16;
  static constexpr int kLd = kBK + kVec;  // shared-memory row length in elements
};

// ---------------------------------------------------------------------------
// Tensor-core MMA (m16n8k16, fp32 accumulate)
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#ifdef RK_CUDA_EMULATION
  rk_emu::mma_m16n8k16<__half>(d, a, b);  // tests/cuda_emu/cuda_emulation.h
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#ifdef RK_CUDA_EMULATION
  rk_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------------------
// Tile configuration
// ---------------------------------------------------------------------------

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NJ = WN / 8;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of m16n8");
};

// ---------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------

// Output pixel of a row of the tile: image, top-left input corner, validity.
struct RowPos {
  int n, ih0, iw0;
  bool ok;
};

// Position k = (kh, kw, ci) of the flattened reduction. A thread's k offset inside a K
// step is the same for all its A and B chunks, so this runs once per element column
// per K step, not once per chunk.
struct KPos {
  int ci, kh, kw;
  bool ok;
};

__device__ __forceinline__ KPos decompose(int k, int K, int cin_g, int ks) {
  KPos q;
  const int tap = k / cin_g;
  q.ci = k - tap * cin_g;
  q.kh = tap / ks;
  q.kw = tap - q.kh * ks;
  q.ok = k < K;
  return q;
}

// A = im2col of the NHWC input transformed by the conv's prologue,
//   u = relu?(x * in_scale[c] + in_shift[c]) * gate[n, c]   (each part optional),
// computed in fp32 and rounded once to T; zero outside the image (padding is zero
// after the transform). The interface gemm() needs from an A operand: k_total(),
// at(k), row(n, oh, ow, ok), load(pos, q), load_vec(pos, q) and vec (grouped_gemm()
// also set_group(g)).
template <typename T>
struct AOperand {
  const T* x;
  int64_t sn, sh, sw, sc;   // element strides of x
  int h, w;                 // input size
  int cin_g, ci0;           // channels of this group, first channel of the group
  int ks, stride, pad;      // kernel size (odd), conv stride, padding
  const float* in_scale;    // nullptr, or (C,) with in_shift
  const float* in_shift;
  bool in_relu;
  const float* gate;        // nullptr, or (N, C) fp32 with row stride sg
  int64_t sg;
  bool vec;                 // 16-byte chunks: sc == 1, cin_g % kVec == 0, aligned

  __device__ __forceinline__ void set_group(int g) { ci0 = g * cin_g; }
  __device__ __forceinline__ int k_total() const { return ks * ks * cin_g; }
  __device__ __forceinline__ KPos at(int k) const { return decompose(k, k_total(), cin_g, ks); }
  __device__ __forceinline__ RowPos row(int n, int oh, int ow, bool ok) const {
    return RowPos{n, oh * stride - pad, ow * stride - pad, ok};
  }
  __device__ __forceinline__ bool transforms() const {
    return in_scale != nullptr || in_relu || gate != nullptr;
  }
  // u of one element of image n, channel c (global index).
  __device__ __forceinline__ float prologue(float v, int n, int c) const {
    if (in_scale != nullptr) v = fmaf(v, __ldg(in_scale + c), __ldg(in_shift + c));
    if (in_relu) v = fmaxf(v, 0.0f);
    if (gate != nullptr) v *= __ldg(gate + static_cast<int64_t>(n) * sg + c);
    return v;
  }
  __device__ __forceinline__ bool inside(const RowPos& r, const KPos& q, int& ih, int& iw) const {
    ih = r.ih0 + q.kh;
    iw = r.iw0 + q.kw;
    return r.ok && q.ok && ih >= 0 && ih < h && iw >= 0 && iw < w;
  }
  // One element u[n, ih0 + kh, iw0 + kw, ci0 + ci] of the im2col tile.
  __device__ __forceinline__ T load(const RowPos& r, const KPos& q) const {
    int ih, iw;
    if (!inside(r, q, ih, iw)) return Elem<T>::from_float(0.0f);
    const int c = ci0 + q.ci;
    const T v = x[static_cast<int64_t>(r.n) * sn + ih * sh + iw * sw + c * sc];
    return transforms() ? Elem<T>::from_float(prologue(Elem<T>::to_float(v), r.n, c)) : v;
  }
  // kVec consecutive elements along k (same tap, contiguous channels: the vector path).
  __device__ __forceinline__ uint4 load_vec(const RowPos& r, const KPos& q) const {
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    int ih, iw;
    if (!inside(r, q, ih, iw)) return out;
    const int c = ci0 + q.ci;
    out = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(r.n) * sn + ih * sh +
                                               iw * sw + c));
    if (transforms()) {
      T* e = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < Layout<T>::kVec; ++j)
        e[j] = Elem<T>::from_float(prologue(Elem<T>::to_float(e[j]), r.n, c + j));
    }
    return out;
  }
};

// B[k, co] = w[co0 + co, ci, kh, kw] for the flattened k = (kh, kw, ci).
template <typename T>
struct BOperand {
  const T* w;
  int64_t so, si, sh, sw;   // element strides of the weight
  int co0;                  // first output channel of this tile
  int n_valid;              // output channels of the tile that exist (<= BN)
  bool vec;                 // k contiguous in memory (channels_last weight), aligned
};

// Rows of the tile: per-image tiles (the SE squeeze; tiles_per_image > 0) cover
// pixels [t * BM, (t + 1) * BM) of image n, blockIdx.x = n * tiles_per_image + t, so a
// per-image column sum of the tile needs no segmentation; otherwise the tile covers
// rows m = blockIdx.x * BM + r of all N * Ho * Wo output pixels.
struct RowMap {
  int64_t m_total;          // N * Ho * Wo
  int hwo, wo;
  int tiles_per_image;

  template <int BM>
  __device__ __forceinline__ bool decode(int r, int64_t& m, int& n, int& oh, int& ow) const {
    int p;
    bool ok;
    if (tiles_per_image > 0) {
      n = static_cast<int>(blockIdx.x) / tiles_per_image;
      p = (static_cast<int>(blockIdx.x) - n * tiles_per_image) * BM + r;
      ok = p < hwo;
      m = static_cast<int64_t>(n) * hwo + p;
    } else {
      m = static_cast<int64_t>(blockIdx.x) * BM + r;
      ok = m < m_total;
      n = static_cast<int>(m / hwo);
      p = static_cast<int>(m - static_cast<int64_t>(n) * hwo);
    }
    oh = p / wo;
    ow = p - oh * wo;
    return ok;
  }
};

template <typename T, class TL>
struct Smem {
  T a[2][TL::BM][Layout<T>::kLd];
  T b[2][TL::BN][Layout<T>::kLd];
};

// Fragment coordinates of this thread inside the CTA tile.
template <class TL>
struct Frag {
  int wm0, wn0, g, t;
  __device__ __forceinline__ Frag() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    wm0 = (warp % TL::WARPS_M) * TL::WM;
    wn0 = (warp / TL::WARPS_M) * TL::WN;
    g = lane >> 2;
    t = lane & 3;
  }
  // row of acc[i][*][2 * h + *], column of acc[*][j][2 * * + e]
  __device__ __forceinline__ int row(int i, int h) const { return wm0 + i * 16 + g + 8 * h; }
  __device__ __forceinline__ int col(int j, int e) const { return wn0 + j * 8 + 2 * t + e; }
};

// A per-output-channel fp32 vector (folded BN scale or shift) at this thread's
// accumulator columns co0 + col(j, e); 0 for channels past n_valid.
template <class TL>
struct ChannelVec {
  float v[TL::NJ][2];
  __device__ __forceinline__ ChannelVec(const float* p, const Frag<TL>& f, int co0, int n_valid) {
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = f.col(j, e);
        v[j][e] = (p != nullptr && c < n_valid) ? __ldg(p + co0 + c) : 0.0f;
      }
  }
};

// Calls fn(i, h, m, n, oh, ow, ok) for the accumulator rows acc[i][*][2h..2h+1] of this
// thread: flat output row m (image n, pixel oh, ow), ok when the row exists.
template <class TL, class Fn>
__device__ __forceinline__ void for_each_row(const Frag<TL>& f, const RowMap& rows, Fn&& fn) {
#pragma unroll
  for (int i = 0; i < TL::MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t m;
      int n, oh, ow;
      const bool ok = rows.decode<TL::BM>(f.row(i, h), m, n, oh, ow);
      fn(i, h, m, n, oh, ow, ok);
    }
}

template <typename T, class TL>
__device__ __forceinline__ void compute_stage(float (&acc)[TL::MI][TL::NJ][4],
                                              const Smem<T, TL>& sm, int buf, const Frag<TL>& f) {
  constexpr int LD = Layout<T>::kLd, BK = Layout<T>::kBK;
  if constexpr (Elem<T>::kTensorCores) {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[TL::MI][4], bf[TL::NJ][2];
#pragma unroll
      for (int i = 0; i < TL::MI; ++i) {
        const T* p = &sm.a[buf][f.wm0 + i * 16 + f.g][ks + 2 * f.t];
        af[i][0] = *reinterpret_cast<const uint32_t*>(p);
        af[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * LD);
        af[i][2] = *reinterpret_cast<const uint32_t*>(p + 8);
        af[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * LD + 8);
      }
#pragma unroll
      for (int j = 0; j < TL::NJ; ++j) {
        const T* q = &sm.b[buf][f.wn0 + j * 8 + f.g][ks + 2 * f.t];
        bf[j][0] = *reinterpret_cast<const uint32_t*>(q);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(q + 8);
      }
#pragma unroll
      for (int i = 0; i < TL::MI; ++i)
#pragma unroll
        for (int j = 0; j < TL::NJ; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
    }
  } else {
#pragma unroll 2
    for (int kk = 0; kk < BK; ++kk) {
      float av[TL::MI][2], bv[TL::NJ][2];
#pragma unroll
      for (int i = 0; i < TL::MI; ++i) {
        av[i][0] = Elem<T>::to_float(sm.a[buf][f.row(i, 0)][kk]);
        av[i][1] = Elem<T>::to_float(sm.a[buf][f.row(i, 1)][kk]);
      }
#pragma unroll
      for (int j = 0; j < TL::NJ; ++j) {
        bv[j][0] = Elem<T>::to_float(sm.b[buf][f.col(j, 0)][kk]);
        bv[j][1] = Elem<T>::to_float(sm.b[buf][f.col(j, 1)][kk]);
      }
#pragma unroll
      for (int i = 0; i < TL::MI; ++i)
#pragma unroll
        for (int j = 0; j < TL::NJ; ++j) {
          acc[i][j][0] = fmaf(av[i][0], bv[j][0], acc[i][j][0]);
          acc[i][j][1] = fmaf(av[i][0], bv[j][1], acc[i][j][1]);
          acc[i][j][2] = fmaf(av[i][1], bv[j][0], acc[i][j][2]);
          acc[i][j][3] = fmaf(av[i][1], bv[j][1], acc[i][j][3]);
        }
    }
  }
}

template <class TL>
__device__ __forceinline__ void zero(float (&acc)[TL::MI][TL::NJ][4]) {
#pragma unroll
  for (int i = 0; i < TL::MI; ++i)
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
}

// acc += A B over the whole reduction K = a.k_total(). A is an AOperand<T> or any type
// with its interface (the dgrad's operand in conv_train.cu). Ends with a barrier, so
// the shared memory may be reused (a second GEMM, the epilogue) right after.
template <typename T, class TL, class A>
__device__ __forceinline__ void gemm(float (&acc)[TL::MI][TL::NJ][4], const A& a,
                                     const BOperand<T>& b, const RowMap& rows, Smem<T, TL>& sm) {
  constexpr int V = Layout<T>::kVec, BK = Layout<T>::kBK;
  constexpr int kChunksRow = BK / V;
  static_assert((TL::BM * kChunksRow) % TL::kThreads == 0, "A tile chunks per thread");
  static_assert(TL::kThreads % kChunksRow == 0, "a thread keeps its k offset");
  constexpr int kA = TL::BM * kChunksRow / TL::kThreads;
  constexpr int kBTotal = TL::BN * kChunksRow;
  constexpr int kB = (kBTotal + TL::kThreads - 1) / TL::kThreads;
  const int tid = threadIdx.x;
  const int K = a.k_total();
  const int kc = (tid % kChunksRow) * V;  // this thread's k offset inside a K step

  RowPos pos[kA];
#pragma unroll
  for (int i = 0; i < kA; ++i) {
    const int r = (tid + i * TL::kThreads) / kChunksRow;
    int64_t m;
    int n, oh, ow;
    const bool ok = rows.decode<TL::BM>(r, m, n, oh, ow);
    pos[i] = a.row(n, oh, ow, ok);
  }

  uint4 ra[kA], rb[kB];
  const T* wrow[kB];
#pragma unroll
  for (int i = 0; i < kB; ++i) {
    const int c = tid + i * TL::kThreads;
    const int nn = c / kChunksRow;
    wrow[i] = (c < kBTotal && nn < b.n_valid) ? b.w + static_cast<int64_t>(b.co0 + nn) * b.so
                                              : nullptr;
  }
  // Vector paths: 16-byte global loads into registers, issued before the MMAs of the
  // current stage and stored to shared memory after them.
  auto fetch = [&](int k0) {
    if (!a.vec && !b.vec) return;
    const KPos q = a.at(k0 + kc);
    if (a.vec) {
#pragma unroll
      for (int i = 0; i < kA; ++i) ra[i] = a.load_vec(pos[i], q);
    }
    if (b.vec) {  // a chunk is kVec channels of one tap, contiguous: all in or all out
      const int64_t off = q.kh * b.sh + q.kw * b.sw + q.ci;
#pragma unroll
      for (int i = 0; i < kB; ++i)
        rb[i] = (wrow[i] != nullptr && q.ok)
                    ? __ldg(reinterpret_cast<const uint4*>(wrow[i] + off))
                    : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // Element paths (channel strides != 1, group widths not a multiple of kVec such as
  // the 3-channel stem, weights not k-contiguous): loaded straight into shared memory,
  // one element column at a time, without overlap; a fallback, kept compact.
  auto stash = [&](int buf, int k0) {
    const int k = k0 + kc;
    if (a.vec) {
#pragma unroll
      for (int i = 0; i < kA; ++i) {
        const int r = (tid + i * TL::kThreads) / kChunksRow;
        *reinterpret_cast<uint4*>(&sm.a[buf][r][kc]) = ra[i];
      }
    } else {
#pragma unroll 1
      for (int j = 0; j < V; ++j) {
        const KPos q = a.at(k + j);
#pragma unroll
        for (int i = 0; i < kA; ++i) {
          const int r = (tid + i * TL::kThreads) / kChunksRow;
          sm.a[buf][r][kc + j] = a.load(pos[i], q);
        }
      }
    }
    if (b.vec) {
#pragma unroll
      for (int i = 0; i < kB; ++i) {
        const int c = tid + i * TL::kThreads;
        if (c < kBTotal) *reinterpret_cast<uint4*>(&sm.b[buf][c / kChunksRow][kc]) = rb[i];
      }
    } else {
#pragma unroll 1
      for (int j = 0; j < V; ++j) {
        const KPos q = a.at(k + j);
        const int64_t off = q.ci * b.si + q.kh * b.sh + q.kw * b.sw;
#pragma unroll
        for (int i = 0; i < kB; ++i) {
          const int c = tid + i * TL::kThreads;
          if (c < kBTotal)
            sm.b[buf][c / kChunksRow][kc + j] =
                (wrow[i] != nullptr && q.ok) ? wrow[i][off] : Elem<T>::from_float(0.0f);
        }
      }
    }
  };

  const Frag<TL> f;
  const int nk = (K + BK - 1) / BK;
  fetch(0);
  stash(0, 0);
  __syncthreads();
  for (int kt = 0; kt < nk; ++kt) {
    const bool more = kt + 1 < nk;
    if (more) fetch((kt + 1) * BK);  // global loads in flight during the MMAs
    compute_stage<T, TL>(acc, sm, kt & 1, f);
    if (more) stash((kt + 1) & 1, (kt + 1) * BK);
    __syncthreads();
  }
}

// Sums each column of the CTA tile over its rows, from per-thread partials colsum[j][e]
// (of column f.col(j, e)): over the warp's 8 row groups with shuffles, then over the
// WARPS_M warps in order (deterministic, no atomics). out[c] holds column c's sum after
// the call. Every thread of the CTA must call it; it starts and ends with a barrier-safe
// use of `red`, so it may be called again right away.
template <class TL>
__device__ __forceinline__ void sum_columns(const float (&colsum)[TL::NJ][2], const Frag<TL>& f,
                                            float (&red)[TL::WARPS_M][TL::BN],
                                            float (&out)[TL::BN]) {
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
  for (int c = threadIdx.x; c < TL::BN; c += TL::kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < TL::WARPS_M; ++w) s += red[w][c];
    out[c] = s;
  }
  __syncthreads();
}

// The main loop of a grouped conv's CTA: blockIdx.y = group * tiles_n + the N tile, so
// A moves to the group and B to the tile's first row group * n_per_group + tile * BN.
// Returns B as the CTA used it (co0, n_valid) for the epilogue.
template <typename T, class TL, class A>
__device__ __forceinline__ BOperand<T> grouped_gemm(float (&acc)[TL::MI][TL::NJ][4], A a,
                                                    BOperand<T> b, int n_per_group, int tiles_n,
                                                    const RowMap& rows, Smem<T, TL>& sm) {
  const int group = static_cast<int>(blockIdx.y) / tiles_n;
  const int n0 = (static_cast<int>(blockIdx.y) - group * tiles_n) * TL::BN;
  a.set_group(group);
  b.co0 = group * n_per_group + n0;
  b.n_valid = min(TL::BN, n_per_group - n0);
  zero<TL>(acc);
  gemm<T, TL>(acc, a, b, rows, sm);
  return b;
}

// Stores two adjacent output channels (one 4- or 8-byte store when aligned).
template <typename T>
__device__ __forceinline__ void store_pair(T* y, int64_t idx, float v0, float v1, bool ok0,
                                           bool ok1) {
  if (ok0 && ok1 && (idx & 1) == 0) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(y + idx) = make_float2(v0, v1);
    } else if constexpr (Elem<T>::kTensorCores && sizeof(T) == 2) {
      T pair[2] = {Elem<T>::from_float(v0), Elem<T>::from_float(v1)};
      *reinterpret_cast<uint32_t*>(y + idx) = *reinterpret_cast<const uint32_t*>(pair);
    }
    return;
  }
  if (ok0) y[idx] = Elem<T>::from_float(v0);
  if (ok1) y[idx + 1] = Elem<T>::from_float(v1);
}

// Host-side: whether a pointer and strides allow 16-byte chunk loads.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// An A operand over x (N, H, W, C) read through its element strides, for a k x k conv
// with padding k / 2 and no prologue; the vector path when the layout allows.
template <typename T>
inline AOperand<T> a_operand(const void* x, int64_t sn, int64_t sh, int64_t sw, int64_t sc,
                             int64_t h, int64_t w, int64_t cin_g, int64_t ks, int64_t stride) {
  constexpr int V = Layout<T>::kVec;
  AOperand<T> a{};
  a.x = static_cast<const T*>(x);
  a.sn = sn, a.sh = sh, a.sw = sw, a.sc = sc;
  a.h = static_cast<int>(h), a.w = static_cast<int>(w);
  a.cin_g = static_cast<int>(cin_g), a.ci0 = 0;
  a.ks = static_cast<int>(ks), a.stride = static_cast<int>(stride), a.pad = a.ks / 2;
  a.vec = sc == 1 && cin_g % V == 0 && sn % V == 0 && sh % V == 0 && sw % V == 0 && aligned16(x);
  return a;
}

// A B operand over a (C_out, cin_g, k, k) weight read through its element strides; the
// vector path when the channels are contiguous and aligned (a channels_last weight).
template <typename T>
inline BOperand<T> b_operand(const void* w, int64_t so, int64_t si, int64_t sh, int64_t sw,
                             int64_t cin_g, int64_t ks) {
  constexpr int V = Layout<T>::kVec;
  BOperand<T> b{};
  b.w = static_cast<const T*>(w);
  b.so = so, b.si = si, b.sh = sh, b.sw = sw;
  // 16-byte chunks of kVec channels of one tap: channels contiguous, every tap's and
  // row's start aligned.
  b.vec = si == 1 && cin_g % V == 0 && (ks == 1 || (sh % V == 0 && sw % V == 0)) &&
          so % V == 0 && aligned16(w);
  return b;
}

// ---------------------------------------------------------------------------
// Host side: tile shapes and dispatch
// ---------------------------------------------------------------------------

// Tile shapes: BN follows the GEMM's N width per group (one group per CTA); BM = 64
// for small row counts (7x7 maps when tiling per image), for narrow groups (BN <= 16)
// and for fp32, else 128.
using T128x32 = Tile<128, 32, 4, 1>;
using T128x64 = Tile<128, 64, 2, 2>;
using T128x128 = Tile<128, 128, 2, 4>;
using T64x8 = Tile<64, 8, 4, 1>;
using T64x16 = Tile<64, 16, 4, 1>;
using T64x32 = Tile<64, 32, 4, 1>;
using T64x64 = Tile<64, 64, 2, 2>;
using T64x128 = Tile<64, 128, 2, 2>;

inline void pick_tiles(rk_dtype dtype, int64_t n_g, int64_t rows, int64_t* bm, int64_t* bn) {
  *bn = n_g <= 8 ? 8 : n_g <= 16 ? 16 : n_g <= 32 ? 32 : n_g <= 64 ? 64 : 128;
  *bm = rows <= 64 || *bn <= 16 || dtype == RK_FLOAT32 ? 64 : 128;
}

// fn(TL{}) for the tile shape (bm, bn) of pick_tiles (fp32 only has BM = 64).
template <typename T, class Fn>
cudaError_t with_tile(int64_t bm, int64_t bn, Fn&& fn) {
  if (sizeof(T) == 4 && bm != 64) return cudaErrorInvalidValue;
  switch (bm * 1000 + bn) {
    case 64008: return fn(T64x8{});
    case 64016: return fn(T64x16{});
    case 64032: return fn(T64x32{});
    case 64064: return fn(T64x64{});
    case 64128: return fn(T64x128{});
    default: break;
  }
  if constexpr (sizeof(T) == 2) {
    switch (bm * 1000 + bn) {
      case 128032: return fn(T128x32{});
      case 128064: return fn(T128x64{});
      case 128128: return fn(T128x128{});
      default: break;
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace rk

#endif  // REGNET_KERNELS_CUDA_IGEMM_CUH_
