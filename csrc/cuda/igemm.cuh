// The implicit-GEMM main loop shared by conv_bn_act.cu, conv1x1_gate_residual.cu and
// conv_bn_train.cu.
//
// A convolution with `groups` groups is, per group, a GEMM
//     out[m, co] = sum_k A[m, k] * B[k, co]
// with m = (n, oh, ow) over output pixels, co over the group's output channels and
// k = (kh, kw, ci) flattened, ci fastest, over K = k * k * C_in_g. A is gathered from
// the NHWC input as it is loaded (padding and out-of-range rows are zeros); B is read
// from the (C_out, C_in_g, k, k) weight through its strides. One CTA computes a
// BM x BN tile of one group (never a block-diagonal tile over several groups).
//
// Data movement (the vector path: unit channel stride, group width a multiple of 8
// elements, 16-byte aligned rows, a channels_last weight): a kStages-deep ring of
// shared-memory buffers filled by 16-byte cp.async copies (zero-filled outside the image
// and past K), so kStages - 1 K steps are in flight while the tensor cores work on the
// oldest; one barrier per K step. A prologue transform (folded BN of the previous layer,
// ReLU, SE gate) is applied in shared memory by the thread that copied the chunk, after
// its copies landed and before the barrier that publishes them. Any other layout (the
// 3-channel stem, odd group widths, strided weights) takes a compact element-wise path
// through one buffer.
//
// Compute: a warp owns a WM x WN sub-tile made of MI x NJ m16n8 fragments.
// fp16 / bf16: fragments read with ldmatrix, mma.sync.m16n8k16 with fp32 accumulation
// (tensor cores, sm_80+). fp32: scalar FMAs on the same fragment layout, so the
// epilogues are shared.
// Fragment layout (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   acc[i][j][0..1]: row g,     cols 2t, 2t + 1 of fragment (i, j)
//   acc[i][j][2..3]: row g + 8, cols 2t, 2t + 1
#ifndef REGNET_KERNELS_CUDA_IGEMM_CUH_
#define REGNET_KERNELS_CUDA_IGEMM_CUH_

#include "dtypes.cuh"

namespace rk {

// Elements per 16-byte chunk, the K step, the shared-memory row padding (16 bytes: rows
// of 80 bytes keep 16-byte copies aligned and put the 8 rows an ldmatrix reads in 8
// different bank quads) and the depth of the copy pipeline.
template <typename T> struct Layout {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kBK = sizeof(T) == 2 ? 32 : 16;
  static constexpr int kLd = kBK + kVec;  // shared-memory row length in elements
  static constexpr int kStages = 3;
};

// ---------------------------------------------------------------------------
// Asynchronous copies and ldmatrix (sm_80+; emulated under RK_CUDA_EMULATION)
// ---------------------------------------------------------------------------

// 16 bytes from global to shared memory, or 16 zero bytes when !fill (src is then not
// read, but must be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#ifdef RK_CUDA_EMULATION
  rk_emu::cp_async_16(dst, src, fill);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(fill ? 16 : 0));
#endif
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef RK_CUDA_EMULATION
  rk_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef RK_CUDA_EMULATION
  rk_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ldmatrix .x4 / .x2 (b16, not transposed): lane l of the warp supplies the 16-byte row
// address of row l % 8 of matrix l / 8; register j of lane l receives elements
// 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef RK_CUDA_EMULATION
  rk_emu::ldmatrix(r, 4, row);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#ifdef RK_CUDA_EMULATION
  rk_emu::ldmatrix(r, 2, row);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
#endif
}

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
// Division by a divisor fixed per launch
// ---------------------------------------------------------------------------

// n / d for 0 <= n < 2^31 and a divisor d >= 1 known before the kernel runs, as a
// multiply-high, an add and a shift (the round-up method of Granlund and Montgomery,
// 1994: with l = ceil(log2 d), n / d = (n * (2^32 + mul)) >> (32 + l) where
// mul = floor(2^32 (2^l - d) / d) + 1; exact for every n < 2^32, and the add cannot
// overflow for n < 2^31). A 32-bit integer division is ~20 instructions; the row and
// k decompositions of the main loop and epilogue run several per K step and per row.
struct FastDiv {
  int d;
  uint32_t mul;
  int shift;
  __host__ __device__ FastDiv() : d(1), mul(1), shift(0) {}
  __host__ __device__ explicit FastDiv(int divisor) : d(divisor), shift(0) {
    while ((int64_t{1} << shift) < divisor) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) /
                                    static_cast<uint64_t>(divisor) + 1);
  }
  __device__ __forceinline__ int div(int n) const {
#ifdef RK_CUDA_EMULATION
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
#else
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), mul);
#endif
    return static_cast<int>((hi + static_cast<uint32_t>(n)) >> shift);
  }
};

// ---------------------------------------------------------------------------
// Tile configuration
// ---------------------------------------------------------------------------

// kMinCtas: the CTAs per SM every kernel's __launch_bounds__ asks for (the register cap
// that leaves room for a second CTA's warps while the first one waits at its barrier).
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMinCtas = 2;
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

__device__ __forceinline__ KPos decompose(int k, int K, const FastDiv& cin_g, const FastDiv& ks) {
  KPos q;
  const int tap = cin_g.div(k);
  q.ci = k - tap * cin_g.d;
  q.kh = ks.div(tap);
  q.kw = tap - q.kh * ks.d;
  q.ok = k < K;
  return q;
}

// N floats from a 16-byte aligned address, 16 bytes at a time.
template <int N>
__device__ __forceinline__ void load_floats(float (&out)[N], const float* p) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int j = 0; j < N; j += 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p + j));
    out[j] = v.x, out[j + 1] = v.y, out[j + 2] = v.z, out[j + 3] = v.w;
  }
}

// A = im2col of the NHWC input transformed by the conv's prologue,
//   u = relu?(x * in_scale[c] + in_shift[c]) * gate[n, c]   (each part optional),
// computed in fp32 and rounded once to T; zero outside the image (padding is zero
// after the transform). The interface gemm() needs from an A operand: k_total(),
// at(k), row(n, oh, ow, ok), load(pos, q) (one element, transformed), vec_src(pos, q)
// (the kVec-element chunk's address, nullptr for zeros), transforms(),
// transform_chunk(chunk, pos, q) and vec (grouped_gemm() also set_group(g)).
// PROLOGUE: whether the operand may carry a prologue at all (a compile-time switch, so
// the kernels without one have no transform code in their main loop).
template <typename T, bool PROLOGUE = false>
struct AOperand {
  const T* x;
  int64_t sn, sh, sw, sc;   // element strides of x
  int h, w;                 // input size
  int cin_g, ci0;           // channels of this group, first channel of the group
  int ks, stride, pad;      // kernel size (odd), conv stride, padding
  FastDiv cin_div, ks_div;  // by cin_g and ks (at())
  const float* in_scale;    // nullptr, or (C,) with in_shift
  const float* in_shift;
  bool in_relu;
  const float* gate;        // nullptr, or (N, C) fp32 with row stride sg
  int64_t sg;
  bool vec;                 // 16-byte chunks: sc == 1, cin_g % kVec == 0, aligned (and
                            // the prologue's vectors 16-byte aligned)

  __device__ __forceinline__ void set_group(int g) { ci0 = g * cin_g; }
  __device__ __forceinline__ int k_total() const { return ks * ks * cin_g; }
  __device__ __forceinline__ KPos at(int k) const {
    return decompose(k, k_total(), cin_div, ks_div);
  }
  __device__ __forceinline__ RowPos row(int n, int oh, int ow, bool ok) const {
    return RowPos{n, oh * stride - pad, ow * stride - pad, ok};
  }
  __device__ __forceinline__ bool transforms() const {
    return PROLOGUE && (in_scale != nullptr || in_relu || gate != nullptr);
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
  __device__ __forceinline__ const T* vec_src(const RowPos& r, const KPos& q) const {
    int ih, iw;
    if (!inside(r, q, ih, iw)) return nullptr;
    return x + static_cast<int64_t>(r.n) * sn + ih * sh + iw * sw + ci0 + q.ci;
  }
  // The prologue on a chunk of raw x (where vec_src is not nullptr; zeros stay zeros),
  // its per-channel vectors read 16 bytes at a time (c is a multiple of kVec).
  __device__ __forceinline__ void transform_chunk(T* e, const RowPos& r, const KPos& q) const {
    constexpr int V = Layout<T>::kVec;
    int ih, iw;
    if (!inside(r, q, ih, iw)) return;
    const int c = ci0 + q.ci;
    float v[V], s[V], t[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = Elem<T>::to_float(e[j]);
    if (in_scale != nullptr) {
      load_floats<V>(s, in_scale + c);
      load_floats<V>(t, in_shift + c);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = fmaf(v[j], s[j], t[j]);
    }
    if (in_relu) {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = fmaxf(v[j], 0.0f);
    }
    if (gate != nullptr) {
      load_floats<V>(s, gate + static_cast<int64_t>(r.n) * sg + c);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] *= s[j];
    }
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = Elem<T>::from_float(v[j]);
  }
  // A transformed chunk in registers (the wgrad's gather).
  __device__ __forceinline__ uint4 load_vec(const RowPos& r, const KPos& q) const {
    const T* src = vec_src(r, q);
    if (src == nullptr) return make_uint4(0u, 0u, 0u, 0u);
    uint4 out = __ldg(reinterpret_cast<const uint4*>(src));
    if (transforms()) transform_chunk(reinterpret_cast<T*>(&out), r, q);
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
// pixels [t * BM, (t + 1) * BM) of image n, tile = n * tiles_per_image + t, so a
// per-image column sum of the tile needs no segmentation; otherwise the tile covers
// rows m = tile * BM + r of all N * Ho * Wo output pixels. Built on the host by
// RowMap::over(); the kernel then places it on its row tile with set_tile<BM>(), which
// does the tile's divisions once, so a row's decode is two FastDivs.
struct RowMap {
  int64_t m_total;          // N * Ho * Wo
  int tiles_per_image;
  FastDiv hwo, wo, per_image;  // by Ho * Wo, Wo and tiles_per_image (1 when 0)
  // set_tile(): row 0 of the tile is flat row m0 = image n0, pixel p0; rows m < m_end exist
  int64_t m0, m_end;
  int n0, p0;

  __host__ __device__ static RowMap over(int64_t m_total, int hwo, int wo, int tiles_per_image) {
    RowMap r{};
    r.m_total = m_total;
    r.tiles_per_image = tiles_per_image;
    r.hwo = FastDiv(hwo), r.wo = FastDiv(wo), r.per_image = FastDiv(max(tiles_per_image, 1));
    return r;
  }
  template <int BM>
  __device__ __forceinline__ void set_tile(int tile) {
    if (tiles_per_image > 0) {
      n0 = per_image.div(tile);
      p0 = (tile - n0 * tiles_per_image) * BM;
      m_end = static_cast<int64_t>(n0 + 1) * hwo.d;
    } else {
      const int64_t first = static_cast<int64_t>(tile) * BM;
      n0 = static_cast<int>(first / hwo.d);  // 64-bit: once per CTA
      p0 = static_cast<int>(first - static_cast<int64_t>(n0) * hwo.d);
      m_end = m_total;
    }
    m0 = static_cast<int64_t>(n0) * hwo.d + p0;
  }
  // Row r of the tile: flat row m, image n, output pixel (oh, ow); whether it exists.
  __device__ __forceinline__ bool decode(int r, int64_t& m, int& n, int& oh, int& ow) const {
    const int q = p0 + r;  // < Ho * Wo + BM: 32 bits
    const int dn = hwo.div(q);
    const int p = q - dn * hwo.d;
    n = n0 + dn;
    m = m0 + r;
    oh = wo.div(p);
    ow = p - oh * wo.d;
    return m < m_end;
  }
  // The number of rows of this tile that exist (rows 0 .. valid_rows() - 1).
  template <int BM>
  __device__ __forceinline__ int valid_rows() const {
    return static_cast<int>(min(static_cast<int64_t>(BM), m_end - m0));
  }
  // The flat output row of tile row r.
  __device__ __forceinline__ int64_t flat(int r) const { return m0 + r; }
};

// This CTA's row tile and column tile (a group's channel tile, over all groups) in a
// 1-D grid of rows x cols CTAs in which the column tiles of one row tile are adjacent:
// CTAs running at the same time share their rows, so the activations are read from
// DRAM about once while the (small) weights stay in L2.
struct CtaTile {
  int row, col;
};
__device__ __forceinline__ CtaTile cta_tile(const FastDiv& cols) {
  const int row = cols.div(static_cast<int>(blockIdx.x));
  return CtaTile{row, static_cast<int>(blockIdx.x) - row * cols.d};
}

// The A and B tiles of S K steps (S = kStages for the pipelined main loop). Kernels keep
// it in dynamic shared memory (dynamic_smem_bytes()).
template <typename T, class TL, int S = Layout<T>::kStages>
struct Smem {
  T a[S][TL::BM][Layout<T>::kLd];
  T b[S][TL::BN][Layout<T>::kLd];
};

// Raises the kernel's dynamic shared memory limit when it needs more than the default
// 48 KB (a per-function attribute; cheap, and allowed during graph capture).
template <class Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Fragment coordinates of this thread inside the CTA tile.
template <class TL>
struct Frag {
  int wm0, wn0, g, t, lane;
  __device__ __forceinline__ Frag() {
    const int warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
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

// Calls fn(i, j, r) for every accumulator acc[i][j][r] of this thread (column
// f.col(j, r & 1)).
template <class TL, class Fn>
__device__ __forceinline__ void for_each_acc(Fn&& fn) {
#pragma unroll
  for (int i = 0; i < TL::MI; ++i)
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) fn(i, j, r);
}

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
      const bool ok = rows.decode(f.row(i, h), m, n, oh, ow);
      fn(i, h, m, n, oh, ow, ok);
    }
}

// acc += the A B product of one K step held in buffer `buf` of the shared memory.
template <typename T, class TL, int S>
__device__ __forceinline__ void compute_stage(float (&acc)[TL::MI][TL::NJ][4],
                                              const Smem<T, TL, S>& sm, int buf,
                                              const Frag<TL>& f) {
  constexpr int BK = Layout<T>::kBK;
  if constexpr (Elem<T>::kTensorCores) {
    // ldmatrix rows: A's four 8x8 matrices (rows 0-7 / 8-15) x (k 0-7 / 8-15) are the
    // m16n8k16 A fragment's registers 0..3; B (stored [n][k]) gives (n 0-7) x (k 0-7 /
    // 8-15) per fragment j, two fragments per .x4.
    const int a_row = f.lane & 15, a_col = (f.lane >> 4) * 8;
    const int b_row = f.lane & 7, b_col = ((f.lane >> 3) & 1) * 8, b_frag = f.lane >> 4;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[TL::MI][4], bf[TL::NJ][2];
#pragma unroll
      for (int i = 0; i < TL::MI; ++i)
        ldmatrix_x4(af[i], &sm.a[buf][f.wm0 + i * 16 + a_row][ks + a_col]);
#pragma unroll
      for (int j = 0; j + 1 < TL::NJ; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, &sm.b[buf][f.wn0 + (j + b_frag) * 8 + b_row][ks + b_col]);
        bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
      }
      if constexpr (TL::NJ % 2 == 1)
        ldmatrix_x2(bf[TL::NJ - 1], &sm.b[buf][f.wn0 + (TL::NJ - 1) * 8 + b_row][ks + b_col]);
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

// Which 16-byte chunks of a K step's tiles a thread moves: chunk column kc (the same for
// all its chunks, so one k decomposition per K step), A rows a_row(i), B rows b_row(i).
template <typename T, class TL>
struct ChunkMap {
  static constexpr int V = Layout<T>::kVec, kPerRow = Layout<T>::kBK / V;
  static_assert((TL::BM * kPerRow) % TL::kThreads == 0, "A tile chunks per thread");
  static_assert(TL::kThreads % kPerRow == 0, "a thread keeps its k offset");
  static constexpr int kA = TL::BM * kPerRow / TL::kThreads;
  static constexpr int kBTotal = TL::BN * kPerRow;
  static constexpr int kB = (kBTotal + TL::kThreads - 1) / TL::kThreads;
  static __device__ __forceinline__ int kc() { return (threadIdx.x % kPerRow) * V; }
  static __device__ __forceinline__ int a_row(int i) {
    return (threadIdx.x + i * TL::kThreads) / kPerRow;
  }
  static __device__ __forceinline__ int b_chunk(int i) { return threadIdx.x + i * TL::kThreads; }
};

// The pipelined main loop (vector path): cp.async into a ring of S buffers. Iteration kt
// waits for its own copies of step kt, applies the prologue to them, and after the
// barrier (everyone's step kt visible, everyone done with step kt - 1) refills step
// kt - 1's buffer with step kt + S - 1 before computing step kt.
template <typename T, class TL, int S, class A>
__device__ __forceinline__ void gemm_pipelined(float (&acc)[TL::MI][TL::NJ][4], const A& a,
                                               const BOperand<T>& b,
                                               const RowPos (&pos)[ChunkMap<T, TL>::kA],
                                               Smem<T, TL, S>& sm) {
  using CM = ChunkMap<T, TL>;
  constexpr int BK = Layout<T>::kBK;
  const int kc = CM::kc();
  const T* wrow[CM::kB];
#pragma unroll
  for (int i = 0; i < CM::kB; ++i) {
    const int nn = CM::b_chunk(i) / CM::kPerRow;
    wrow[i] = (CM::b_chunk(i) < CM::kBTotal && nn < b.n_valid)
                  ? b.w + static_cast<int64_t>(b.co0 + nn) * b.so
                  : nullptr;
  }
  const int nk = (a.k_total() + BK - 1) / BK;
  auto issue = [&](int kt) {
    const int buf = kt % S;
    const KPos q = a.at(kt * BK + kc);
#pragma unroll
    for (int i = 0; i < CM::kA; ++i) {
      const T* src = a.vec_src(pos[i], q);
      cp_async_16(&sm.a[buf][CM::a_row(i)][kc], src != nullptr ? src : b.w, src != nullptr);
    }
    // a chunk is kVec channels of one tap, contiguous: all in or all out
    const int64_t off = q.kh * b.sh + q.kw * b.sw + q.ci;
#pragma unroll
    for (int i = 0; i < CM::kB; ++i) {
      if (CM::b_chunk(i) >= CM::kBTotal) continue;
      const bool ok = wrow[i] != nullptr && q.ok;
      cp_async_16(&sm.b[buf][CM::b_chunk(i) / CM::kPerRow][kc], ok ? wrow[i] + off : b.w, ok);
    }
  };

  const Frag<TL> f;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nk) issue(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<S - 2>();
    if (a.transforms()) {
      const KPos q = a.at(kt * BK + kc);
#pragma unroll
      for (int i = 0; i < CM::kA; ++i)
        a.transform_chunk(&sm.a[kt % S][CM::a_row(i)][kc], pos[i], q);
    }
    __syncthreads();
    if (kt + S - 1 < nk) issue(kt + S - 1);
    cp_async_commit();
    compute_stage<T, TL>(acc, sm, kt % S, f);
  }
  cp_async_wait<0>();
}

// The element-wise main loop (channel strides != 1, group widths not a multiple of
// kVec such as the 3-channel stem, weights not k-contiguous): each K step loaded into
// buffer 0 element by element, without overlap; a fallback, kept compact.
template <typename T, class TL, int S, class A>
__device__ __forceinline__ void gemm_elementwise(float (&acc)[TL::MI][TL::NJ][4], const A& a,
                                                 const BOperand<T>& b,
                                                 const RowPos (&pos)[ChunkMap<T, TL>::kA],
                                                 Smem<T, TL, S>& sm) {
  using CM = ChunkMap<T, TL>;
  constexpr int BK = Layout<T>::kBK, V = Layout<T>::kVec;
  const int kc = CM::kc();
  const Frag<TL> f;
  const int nk = (a.k_total() + BK - 1) / BK;
  for (int kt = 0; kt < nk; ++kt) {
#pragma unroll 1
    for (int j = 0; j < V; ++j) {
      const KPos q = a.at(kt * BK + kc + j);
#pragma unroll
      for (int i = 0; i < CM::kA; ++i) sm.a[0][CM::a_row(i)][kc + j] = a.load(pos[i], q);
      const int64_t off = q.ci * b.si + q.kh * b.sh + q.kw * b.sw;
#pragma unroll
      for (int i = 0; i < CM::kB; ++i) {
        const int c = CM::b_chunk(i);
        if (c >= CM::kBTotal) continue;
        const int nn = c / CM::kPerRow;
        sm.b[0][nn][kc + j] = (nn < b.n_valid && q.ok)
                                  ? b.w[static_cast<int64_t>(b.co0 + nn) * b.so + off]
                                  : Elem<T>::from_float(0.0f);
      }
    }
    __syncthreads();
    compute_stage<T, TL>(acc, sm, 0, f);
    __syncthreads();
  }
}

// The main loops a kernel instantiation carries: only the pipelined one (the launcher
// checked a.vec && b.vec), only the element-wise one, or both, chosen per call from
// the operands. One loop per instantiation keeps the other's code (~400 instructions)
// out of the kernel.
enum class Loads { kVector, kElement, kEither };

// acc += A B over the whole reduction K = a.k_total(). A is an AOperand<T> or any type
// with its interface (the dgrad's operand in conv_bn_train.cu). Ends with a barrier, so
// the shared memory may be reused (a second GEMM, the epilogue) right after.
template <typename T, class TL, Loads L = Loads::kEither, class A, int S>
__device__ __forceinline__ void gemm(float (&acc)[TL::MI][TL::NJ][4], const A& a,
                                     const BOperand<T>& b, const RowMap& rows,
                                     Smem<T, TL, S>& sm) {
  using CM = ChunkMap<T, TL>;
  RowPos pos[CM::kA];
#pragma unroll
  for (int i = 0; i < CM::kA; ++i) {
    int64_t m;
    int n, oh, ow;
    const bool ok = rows.decode(CM::a_row(i), m, n, oh, ow);
    pos[i] = a.row(n, oh, ow, ok);
  }
  if constexpr (L == Loads::kVector)
    gemm_pipelined<T, TL>(acc, a, b, pos, sm);
  else if constexpr (L == Loads::kElement)
    gemm_elementwise<T, TL>(acc, a, b, pos, sm);
  else if (a.vec && b.vec)
    gemm_pipelined<T, TL>(acc, a, b, pos, sm);
  else
    gemm_elementwise<T, TL>(acc, a, b, pos, sm);
  __syncthreads();
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

// The main loop of a grouped conv's CTA: column tile col = group * tiles_n + the N
// tile, so A moves to the group and B to the tile's first row group * n_per_group +
// tile * BN. Returns B as the CTA used it (co0, n_valid) for the epilogue.
template <typename T, class TL, Loads L = Loads::kEither, class A, int S>
__device__ __forceinline__ BOperand<T> grouped_gemm(float (&acc)[TL::MI][TL::NJ][4], A a,
                                                    BOperand<T> b, int n_per_group,
                                                    const FastDiv& tiles_n, int col,
                                                    const RowMap& rows, Smem<T, TL, S>& sm) {
  const int group = tiles_n.div(col);
  const int n0 = (col - group * tiles_n.d) * TL::BN;
  a.set_group(group);
  b.co0 = group * n_per_group + n0;
  b.n_valid = min(TL::BN, n_per_group - n0);
  zero<TL>(acc);
  gemm<T, TL, L>(acc, a, b, rows, sm);
  return b;
}

// The CTA's output tile staged in shared memory (over the main loop's buffers, free
// after gemm()'s closing barrier), so that it leaves in whole 16-byte chunks of an output
// row: coalesced stores, and one row decode per chunk instead of one per fragment row.
// E: T (the final values) or float (values that still get an fp32 term, e.g. a
// residual). Rows padded by 8 elements: the fragment pairs a warp writes fall in
// distinct banks, and rows stay 16-byte aligned.
template <typename E, class TL>
struct OutTile {
  static constexpr int kLd = TL::BN + 8;
  E v[TL::BM][kLd];
};

// acc (fragment layout) into the staged tile, converted to E. The caller publishes it
// with a barrier.
template <typename E, class TL>
__device__ __forceinline__ void stage(OutTile<E, TL>& out, const float (&acc)[TL::MI][TL::NJ][4],
                                      const Frag<TL>& f) {
#pragma unroll
  for (int i = 0; i < TL::MI; ++i)
#pragma unroll
    for (int j = 0; j < TL::NJ; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        E* dst = &out.v[f.row(i, h)][f.col(j, 0)];
        dst[0] = Elem<E>::from_float(acc[i][j][2 * h]);
        dst[1] = Elem<E>::from_float(acc[i][j][2 * h + 1]);
      }
}

// Calls fn(r, c) for the output chunks this thread stores: tile row r (< rows), columns
// c .. c + V - 1 with V = 16 / sizeof(T), V adjacent threads on one row.
template <typename T, class TL, class Fn>
__device__ __forceinline__ void for_each_out_chunk(int rows, Fn&& fn) {
  constexpr int V = 16 / static_cast<int>(sizeof(T)), kPerRow = TL::BN / V;
  static_assert(TL::BN % V == 0 && TL::kThreads % kPerRow == 0, "whole chunks per pass");
  const int c = (threadIdx.x % kPerRow) * V;
#pragma unroll 2
  for (int r = threadIdx.x / kPerRow; r < rows; r += TL::kThreads / kPerRow) fn(r, c);
}

// V = 16 / sizeof(T) elements src[0, stride, .., (V - 1) stride] into v: one 16-byte
// load when vec (stride 1, src 16-byte aligned) and all valid, else element by element,
// zeros past the first `valid`.
template <typename T>
__device__ __forceinline__ void load_chunk(T (&v)[16 / sizeof(T)], const T* src, int64_t stride,
                                           int valid, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec && valid >= V) {
    *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(src));
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = j < valid ? src[j * stride] : Elem<T>::from_float(0.0f);
}

// The V = 16 / sizeof(T) elements v[0 .. V) to dst: one 16-byte store when vec (dst
// 16-byte aligned) and all valid, else element by element, the first `valid` of them.
template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, const T* v, int valid, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (vec && valid >= V) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) dst[j] = v[j];
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
// with padding k / 2 and no prologue (set_prologue adds one); the vector path when the
// layout allows.
template <typename T, bool PROLOGUE = false>
inline AOperand<T, PROLOGUE> a_operand(const void* x, int64_t sn, int64_t sh, int64_t sw,
                                       int64_t sc, int64_t h, int64_t w, int64_t cin_g,
                                       int64_t ks, int64_t stride) {
  constexpr int V = Layout<T>::kVec;
  AOperand<T, PROLOGUE> a{};
  a.x = static_cast<const T*>(x);
  a.sn = sn, a.sh = sh, a.sw = sw, a.sc = sc;
  a.h = static_cast<int>(h), a.w = static_cast<int>(w);
  a.cin_g = static_cast<int>(cin_g), a.ci0 = 0;
  a.ks = static_cast<int>(ks), a.stride = static_cast<int>(stride), a.pad = a.ks / 2;
  a.cin_div = FastDiv(a.cin_g), a.ks_div = FastDiv(a.ks);
  a.vec = sc == 1 && cin_g % V == 0 && sn % V == 0 && sh % V == 0 && sw % V == 0 && aligned16(x);
  return a;
}

// u = relu?(x * in_scale + in_shift) * gate[n] on A's loads (each part optional: nullptr /
// false). The vector path also needs the fp32 vectors 16-byte aligned (gate rows too).
template <typename T>
inline void set_prologue(AOperand<T, true>& a, const float* in_scale, const float* in_shift,
                         bool in_relu, const float* gate, int64_t s_gate_n) {
  a.in_scale = in_scale;
  a.in_shift = in_shift;
  a.in_relu = in_relu;
  a.gate = gate;
  a.sg = s_gate_n;
  a.vec = a.vec && aligned16(in_scale) && aligned16(in_shift) && aligned16(gate) &&
          (gate == nullptr || s_gate_n % 4 == 0);
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
using T128x32 = Tile<128, 32, 8, 1>;
using T128x64 = Tile<128, 64, 4, 2>;
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
