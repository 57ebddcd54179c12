// Plain C launchers of the eval-mode CUDA kernels (conv_bn_act, se_excite,
// conv1x1_gate_residual). Only CUDA runtime types appear here: the torch-facing
// binding (.cpp) fills these structs from tensors and calls the launchers.
//
// Conventions (the same as the Triton ops in regnet_kernels/ops):
// - Activations are NHWC. Inputs are read through their (n, h, w, c) element
//   strides; outputs are written dense NHWC ([N, Ho, Wo, C], i.e. a
//   channels_last tensor), in the input dtype.
// - Conv weights are (C_out, C_in / groups, k, k) read through their four element
//   strides. A channels_last weight (k = (kh, kw, ci) contiguous) takes the
//   vectorized load path; any other strides are read element by element.
// - scale / shift (folded BN), gate and the squeeze sums are float32.
// - Sizes and strides are int64; offsets inside the kernels are int64.
// - Every launcher returns cudaSuccess or the launch error (cudaErrorInvalidValue
//   for unsupported arguments), and never synchronizes. Outputs y must be aligned
//   to two elements (any allocator's pointer is); an empty output launches nothing.
#ifndef REGNET_KERNELS_CUDA_LAUNCHERS_H_
#define REGNET_KERNELS_CUDA_LAUNCHERS_H_

#include <cuda_runtime.h>
#include <stdint.h>

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

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // REGNET_KERNELS_CUDA_LAUNCHERS_H_
