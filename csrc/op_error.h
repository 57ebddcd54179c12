// Every error message of the ops starts with "regnet_kernels.<op> (<backend>): ", the
// prefix the Python checks write too (regnet_kernels/ops/checks.py, op_errors), so a
// message names the op and the backend whichever layer caught the problem. `op` is the
// op's name as registered (csrc/ops.cpp), `backend` "cpu" or "cuda".
#pragma once

#include <c10/util/Exception.h>

#define RK_CHECK(op, backend, cond, ...) \
  TORCH_CHECK(cond, "regnet_kernels.", op, " (", backend, "): ", __VA_ARGS__)
