// Plain C launchers of the training-mode CUDA kernels: the lazy-BN conv and its
// statistics, the BN / SE / residual pieces around it, and the backward kernels.
// Same conventions as launchers.h (NHWC activations read through element strides
// or dense, fp32 per-channel vectors, int64 sizes, cudaError_t results, no
// synchronization, an empty problem launches nothing) and the same semantics as
// the Triton and C++ CPU ops (see csrc/ops.cpp and regnet_kernels/ops/conv_bn_train.py):
//
//   u = relu?(x * in_scale + in_shift) * gate[n]     the conv's input prologue
//   y = conv(u, weight)                               raw output, stored dense NHWC
//   v = y * scale + shift                             the (lazy) BN output, applied by
//                                                     whichever kernel reads y
//
// Per-channel statistics are merged from per-tile partials in a fixed order:
// every reduction here is deterministic (no atomics).
#ifndef REGNET_KERNELS_CUDA_TRAIN_LAUNCHERS_H_
#define REGNET_KERNELS_CUDA_TRAIN_LAUNCHERS_H_

#include "launchers.h"

#ifdef __cplusplus
extern "C" {
#endif

// Rows of the (5, C) fp32 statistics tensor (regnet_kernels.ops.bn_finalize.STAT_ROWS).
enum { RK_STAT_MEAN = 0, RK_STAT_INV_STD, RK_STAT_SCALE, RK_STAT_SHIFT, RK_STAT_VAR, RK_STAT_ROWS };

// The conv input prologue; each part optional (NULL / 0).
typedef struct rk_prologue {
  const float* in_scale;             // (C_in,) with in_shift, or NULL
  const float* in_shift;
  int in_relu;
  const float* gate;                 // (N, C_in) with row stride s_gate_n, or NULL
  int64_t s_gate_n;
} rk_prologue;

// ---------------------------------------------------------------------------
// Forward: conv_bn_train = rk_conv_train, then rk_bn_finalize over its partials
// ---------------------------------------------------------------------------

// y = conv(u, weight) (stride, padding k / 2, groups), no bias, stored raw; with
// partials != NULL, per row tile t (rows m = (n, oh, ow) in [t * block_m, ...)) and
// channel c: partials[t, 0, c] = mean of y over the tile's rows, partials[t, 1, c] =
// sum over those rows of (y - that mean)^2, from the fp32 accumulators.
typedef struct rk_conv_train_args {
  rk_dtype dtype;                    // of x, weight and y
  const void* x;                     // (N, H, W, C_in) through sx_*
  int64_t n, h, w, c_in;
  int64_t sx_n, sx_h, sx_w, sx_c;
  const void* weight;                // (C_out, C_in / groups, k, k) through sw_*
  int64_t c_out, k;                  // k odd
  int64_t sw_o, sw_i, sw_h, sw_w;
  int64_t stride, groups;
  rk_prologue prologue;
  void* y;                           // (N, Ho, Wo, C_out) dense
  float* partials;                   // NULL (frozen BN), or (tiles_m, 2, C_out) dense
} rk_conv_train_args;

typedef struct rk_conv_train_plan_t {
  int64_t out_h, out_w;
  int64_t block_m;                   // rows per tile (the last tile may have fewer)
  int64_t tiles_m;                   // ceil(N * Ho * Wo / block_m)
} rk_conv_train_plan_t;

cudaError_t rk_conv_train_plan(const rk_conv_train_args* args, rk_conv_train_plan_t* plan);
cudaError_t rk_conv_train(const rk_conv_train_args* args, cudaStream_t stream);

// Batch statistics from rk_conv_train's partials (Chan's merge, tiles in order):
//   stats[MEAN], stats[VAR] (biased), inv_std = 1 / sqrt(var + eps),
//   scale = gamma * inv_std, shift = beta - mean * scale  (gamma = 1, beta = 0 if NULL)
typedef struct rk_bn_finalize_args {
  const float* partials;             // (tiles, 2, C) dense
  int64_t tiles, c;
  int64_t rows;                      // N * Ho * Wo, > 1
  int64_t block_m;                   // rows per tile: tile t has min(block_m, rows - t * block_m)
  const float* gamma;                // (C,) or NULL
  const float* beta;                 // (C,) or NULL
  double eps;
  float* stats;                      // (5, C) dense
} rk_bn_finalize_args;

cudaError_t rk_bn_finalize(const rk_bn_finalize_args* args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// SE squeeze and residual end of a training block (elementwise over y)
// ---------------------------------------------------------------------------

// sums[n, c] = sum over the image's pixels of relu(y * scale + shift), fp32.
typedef struct rk_se_squeeze_args {
  rk_dtype dtype;                    // of y
  const void* y;                     // (N, H, W, C) dense
  int64_t n, hw, c;
  const float* scale;                // (C,)
  const float* shift;
  float* sums;                       // (N, C) dense
} rk_se_squeeze_args;

cudaError_t rk_se_squeeze(const rk_se_squeeze_args* args, cudaStream_t stream);

// dv[n, p, c] = grad_sums[n, c] * (y * scale + shift > 0), in y's dtype.
typedef struct rk_se_squeeze_backward_args {
  rk_dtype dtype;
  const float* grad_sums;            // (N, C) dense
  const void* y;                     // (N, H, W, C) dense
  int64_t n, hw, c;
  const float* scale;
  const float* shift;
  void* dv;                          // (N, H, W, C) dense
} rk_se_squeeze_backward_args;

cudaError_t rk_se_squeeze_backward(const rk_se_squeeze_backward_args* args, cudaStream_t stream);

// out = relu(y * scale + shift + r'), r' = shortcut (sc_scale NULL), shortcut *
// sc_scale + sc_shift, or 0 (shortcut NULL); fp32 math, rounded once.
typedef struct rk_bn_add_relu_args {
  rk_dtype dtype;                    // of y, shortcut and out
  const void* y;                     // (rows, C) dense (NHWC)
  int64_t rows, c;
  const float* scale;
  const float* shift;
  const void* shortcut;              // (rows, C) dense, or NULL
  const float* sc_scale;             // (C,) with sc_shift, or NULL
  const float* sc_shift;
  void* out;                         // (rows, C) dense
} rk_bn_add_relu_args;

cudaError_t rk_bn_add_relu(const rk_bn_add_relu_args* args, cudaStream_t stream);

// dz = grad * (out > 0), elementwise over numel elements.
cudaError_t rk_relu_backward(rk_dtype dtype, const void* grad, const void* out, int64_t numel,
                             void* dz, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Backward of conv_bn_train: BN backward, then dgrad and wgrad of the conv
// ---------------------------------------------------------------------------

// sums[0, c] = sum over rows of dv, sums[1, c] = sum of dv * (y - mean[c]).
// `workspace` holds rk_bn_backward_workspace(rows, c) floats.
typedef struct rk_bn_backward_sums_args {
  rk_dtype dtype;                    // of dv and y
  const void* dv;                    // (rows, C) dense
  const void* y;                     // (rows, C) dense
  int64_t rows, c;
  const float* mean;                 // (C,)
  float* workspace;
  float* sums;                       // (2, C) dense
} rk_bn_backward_sums_args;

int64_t rk_bn_backward_workspace(int64_t rows, int64_t c);
cudaError_t rk_bn_backward_sums(const rk_bn_backward_sums_args* args, cudaStream_t stream);

// dy = scale * dv - scale * inv_std^2 * (y - mean) * sums[1] / rows - scale * sums[0] / rows
// (stats rows from the forward); frozen: dy = scale * dv (running statistics are constants).
typedef struct rk_bn_backward_dy_args {
  rk_dtype dtype;
  const void* dv;                    // (rows, C) dense
  const void* y;                     // (rows, C) dense
  int64_t rows, c;
  const float* stats;                // (5, C) dense
  const float* sums;                 // (2, C) dense (unused when frozen)
  int frozen;
  void* dy;                          // (rows, C) dense
} rk_bn_backward_dy_args;

cudaError_t rk_bn_backward_dy(const rk_bn_backward_dy_args* args, cudaStream_t stream);

// dgrad with the prologue's backward in the epilogue:
//   du = conv_transpose(dy, weight) at every input pixel
//   dx = du * gate[n] * relu'(x * in_scale + in_shift)              (the parts present)
//   dgate_partials[n, t, ci] = sum over the pixels of tile t of image n of
//                              du * relu?(x * in_scale + in_shift)   (gate only)
// (an image's pixels are tiled stride phase by stride phase: sum over t for dgate).
typedef struct rk_conv_dgrad_args {
  rk_dtype dtype;                    // of dy, weight_t, x and dx
  const void* dy;                    // (N, Ho, Wo, C_out) dense
  int64_t n, out_h, out_w, c_out;
  const void* weight_t;              // (C_in, k, k, C_out / groups) dense:
                                     //   weight_t[g * cin_g + ci, kh, kw, co] = weight[g * cout_g + co, ci, kh, kw]
  int64_t c_in, k, stride, groups;
  const void* x;                     // (N, H, W, C_in) through sx_*; read only with a prologue
  int64_t h, w;
  int64_t sx_n, sx_h, sx_w, sx_c;
  rk_prologue prologue;
  void* dx;                          // (N, H, W, C_in) dense
  float* dgate_partials;             // (N, tiles_per_image, C_in) dense, with a gate
} rk_conv_dgrad_args;

typedef struct rk_conv_dgrad_plan_t {
  int64_t block_m;
  int64_t tiles_per_image;           // tiles per image (the dgate partials' T)
} rk_conv_dgrad_plan_t;

cudaError_t rk_conv_dgrad_plan(const rk_conv_dgrad_args* args, rk_conv_dgrad_plan_t* plan);
cudaError_t rk_conv_dgrad(const rk_conv_dgrad_args* args, cudaStream_t stream);

// wgrad: dw[co, kh, kw, ci] = sum over output pixels of dy[m, co] * u[m at tap (kh, kw), ci],
// u recomputed from x through the prologue; per pixel-split fp32 partials summed in
// split order. dw is dense (C_out, k, k, C_in / groups), i.e. a channels_last weight.
typedef struct rk_conv_wgrad_args {
  rk_dtype dtype;                    // of dy, x and dw
  const void* dy;                    // (N, Ho, Wo, C_out) dense
  int64_t n, out_h, out_w, c_out;
  const void* x;                     // (N, H, W, C_in) through sx_*
  int64_t h, w, c_in;
  int64_t sx_n, sx_h, sx_w, sx_c;
  int64_t k, stride, groups;
  rk_prologue prologue;
  float* workspace;                  // rk_conv_wgrad_workspace(args) floats
  void* dw;                          // (C_out, k, k, C_in / groups) dense
} rk_conv_wgrad_args;

int64_t rk_conv_wgrad_workspace(const rk_conv_wgrad_args* args);
cudaError_t rk_conv_wgrad(const rk_conv_wgrad_args* args, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // REGNET_KERNELS_CUDA_TRAIN_LAUNCHERS_H_
