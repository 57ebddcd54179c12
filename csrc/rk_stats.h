// The rows of the (5, C) fp32 batch-statistics tensor that conv_bn_train returns on every
// backend (C and C++; regnet_kernels.ops' STAT_ROWS is the Python side, and
// tests/test_stats_layout.py checks that the two agree).
#ifndef REGNET_KERNELS_RK_STATS_H_
#define REGNET_KERNELS_RK_STATS_H_

enum rk_stat_row {
  RK_STAT_MEAN = 0,     // batch mean
  RK_STAT_INV_STD = 1,  // 1 / sqrt(var + eps)
  RK_STAT_SCALE = 2,    // gamma * inv_std: the lazy BN's scale
  RK_STAT_SHIFT = 3,    // beta - mean * scale
  RK_STAT_VAR = 4,      // biased batch variance
  RK_STAT_ROWS = 5
};

#endif  // REGNET_KERNELS_RK_STATS_H_
