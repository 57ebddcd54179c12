// How every kernel in csrc/cuda is launched:
//     RK_LAUNCH(grid, block, dynamic_smem_bytes, stream, kernel)(args...);
// (the kernel last, so template arguments with commas need no parentheses), and
// dynamic shared memory is declared with RK_DYNAMIC_SMEM(type, name).
// Under nvcc this is the <<<...>>> launch. With RK_CUDA_EMULATION defined (the
// CPU test harness in tests/cuda_emu/, which compiles these sources as host C++)
// it runs the kernel's CTAs on CPU threads instead; nothing else in the kernels
// changes.
#ifndef REGNET_KERNELS_CUDA_LAUNCH_CUH_
#define REGNET_KERNELS_CUDA_LAUNCH_CUH_

#ifdef RK_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#define RK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
// The kernel's dynamic shared memory, as an array `name` of `type`.
#define RK_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

#endif  // REGNET_KERNELS_CUDA_LAUNCH_CUH_
