// Plain C launchers of every CUDA kernel, one section per op: the eval ops
// (conv_bn_act, se_excite, conv1x1_gate_residual), then the training ops (conv_bn_train
// forward and backward, se_squeeze, bn_add_relu). Only CUDA runtime types appear here:
// the torch-facing bindings (cuda/<op>_binding.cpp) fill these structs from tensors and
// call the launchers; tests/cuda_emu calls them through ctypes.
//
// Conventions (the same as the Triton ops in regnet_kernels/ops):
// - Activations are NHWC. Inputs are read through their (n, h, w, c) element
//   strides; outputs are written dense NHWC ([N, Ho, Wo, C], i.e. a
//   channels_last tensor), in the input dtype.
// - Conv weights are (C_out, C_in / groups, k, k) read through their four element
//   strides. A channels_last weight (k = (kh, kw, ci) contiguous) takes the
//   vectorized load path; any other strides are read element by element.
// - scale / shift (folded BN), gate, the squeeze sums and the BN statistics are float32.
// - Sizes and strides are int64; offsets inside the kernels are int64.
// - Every launcher returns cudaSuccess or the launch error (cudaErrorInvalidValue
//   for unsupported arguments), and never synchronizes. Outputs y must be aligned
//   to two elements (any allocator's pointer is); an empty output launches nothing.
// - Every reduction is deterministic (fixed order, no atomics).
#ifndef REGNET_KERNELS_CUDA_LAUNCHERS_H_
#define REGNET_KERNELS_CUDA_LAUNCHERS_H_

#include <cuda_runtime.h>
#include <stdint.h>

#include "../rk_stats.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum rk_dtype {
  RK_FLOAT32 = 0,
  RK_FLOAT16 = 1,
  RK_BFLOAT16 = 2,
} rk_dtype;

// y = act(conv(x, w, stride, padding = k / 2, groups) * scale[c] + shift[c])
// and, when sums != NULL, sums[n, t, c] = sum of y over the output pixels of row
// tile t of image n (fp32, before y is rounded to the output dtype).
typedef struct rk_conv_bn_act_args {
  rk_dtype dtype;                    // of x, weight and y
  const void* x;                     // (N, H, W, C_in) through sx_*
  int64_t n, h, w, c_in;
  int64_t sx_n, sx_h, sx_w, sx_c;
  const void* weight;                // (C_out, C_in / groups, k, k) through sw_*
  int64_t c_out, k;                  // k odd
  int64_t sw_o, sw_i, sw_h, sw_w;
  const float* scale;                // (C_out,)
  const float* shift;                // (C_out,)
  int64_t stride, groups;
  int relu;                          // nonzero: ReLU after the affine
  void* y;                           // (N, Ho, Wo, C_out) dense
  float* sums;                       // NULL, or (N, tiles_per_image, C_out) dense
} rk_conv_bn_act_args;

// The geometry a launch uses: the output size and the row tiling, which fixes the
// shape of the squeeze sums. `squeeze` must match (sums != NULL) of the launch.
typedef struct rk_conv_plan {
  int64_t out_h, out_w;
  int64_t block_m, block_n;
  int64_t tiles_per_image;           // row tiles per image when squeezing, else 0
} rk_conv_plan;

cudaError_t rk_conv_bn_act_plan(const rk_conv_bn_act_args* args, int squeeze,
                                rk_conv_plan* plan);
cudaError_t rk_conv_bn_act(const rk_conv_bn_act_args* args, cudaStream_t stream);

// gate[n, c] = sigmoid(W2 relu(W1 (sum_t sums[n, t, :]) / hw + b1) + b2)[c]
typedef struct rk_se_excite_args {
  const float* sums;                 // (N, T, C) dense fp32
  int64_t n, t, c, hw;
  rk_dtype weight_dtype;             // of w1, b1, w2, b2
  const void* w1;                    // (S, C) through s1_o, s1_i
  int64_t s, s1_o, s1_i;
  const void* b1;                    // (S,) dense
  const void* w2;                    // (C, S) through s2_o, s2_i
  int64_t s2_o, s2_i;
  const void* b2;                    // (C,) dense
  float* gate;                       // (N, C) dense fp32
} rk_se_excite_args;

cudaError_t rk_se_excite(const rk_se_excite_args* args, cudaStream_t stream);

// y = relu(conv1x1(x * gate[n]) * scale + shift + shortcut'), where shortcut' is
//   the identity: res (N, Ho, Wo, C_out), when proj_weight == NULL, or
//   the projection: (res[:, ::s, ::s, :] @ proj_weight^T) * proj_scale + proj_shift,
//   res (N, Hr, Wr, C_r) with (Hr - 1) / s + 1 == Ho, (Wr - 1) / s + 1 == Wo,
//   accumulated in the same kernel.
typedef struct rk_conv1x1_gate_residual_args {
  rk_dtype dtype;                    // of x, weight, res, proj_weight and y
  const void* x;                     // (N, Ho, Wo, C_in) through sx_*
  int64_t n, h, w, c_in;
  int64_t sx_n, sx_h, sx_w, sx_c;
  const void* weight;                // (C_out, C_in) through sw_o, sw_i
  int64_t c_out, sw_o, sw_i;
  const float* scale;                // (C_out,)
  const float* shift;                // (C_out,)
  const float* gate;                 // NULL, or (N, C_in) with row stride s_gate_n
  int64_t s_gate_n;
  const void* res;                   // shortcut / block input, through sr_*
  int64_t res_h, res_w, res_c;       // (Ho, Wo, C_out) for the identity
  int64_t sr_n, sr_h, sr_w, sr_c;
  const void* proj_weight;           // NULL (identity), or (C_out, C_r) through sp_o, sp_i
  int64_t sp_o, sp_i;
  const float* proj_scale;           // (C_out,) with proj_weight
  const float* proj_shift;
  int64_t proj_stride;
  void* y;                           // (N, Ho, Wo, C_out) dense
} rk_conv1x1_gate_residual_args;

cudaError_t rk_conv1x1_gate_residual(const rk_conv1x1_gate_residual_args* args,
                                     cudaStream_t stream);

// ===========================================================================
// Training ops. The semantics of the Triton and C++ CPU ops (csrc/ops.cpp, docs/ops.md
// "Lazy BN outputs"):
//
//   u = relu?(x * in_scale + in_shift) * gate[n]     the conv's input prologue
//   y = conv(u, weight)                               raw output, stored dense NHWC
//   v = y * scale + shift                             the (lazy) BN output, applied by
//                                                     whichever kernel reads y
//
// Per-channel statistics are merged from per-tile partials in a fixed order; the
// (5, C) statistics rows are rk_stats.h's.
// ===========================================================================

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

#endif  // REGNET_KERNELS_CUDA_LAUNCHERS_H_
