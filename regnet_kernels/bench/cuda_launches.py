"""What the CUDA backend launches for an eval op call, without a GPU: the kernel (its C++
name as the static report prints it), the grid, the warps and the dynamic shared memory.

The choices mirror the C launchers (csrc/cuda/igemm.cuh's tile table, conv_bn_act.cu,
conv1x1_gate_residual.cu, se_excite.cu; the tile choice itself is the CUDA backend's
`cuda_tiles.pick_tiles`, which its fakes use too); the CUDA emulation tests check the mirror
against the launchers' own plan functions. The op
calls come from `capture` (the fused model's eval forward on meta tensors): the CUDA ops
take the same arguments as the Triton ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..backends.cpp.cuda_tiles import pick_tiles

#: igemm.cuh's Layout<T>: K step and padded shared-memory row (elements), pipeline depth.
LAYOUT = {"bf16": (32, 40, 3), "fp16": (32, 40, 3), "fp32": (16, 20, 3)}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CPP_TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "float"}

#: igemm.cuh's tiles: (BM, BN) -> (WARPS_M, WARPS_N)
CONV_TILES = {(128, 32): (8, 1), (128, 64): (4, 2), (128, 128): (2, 4), (64, 8): (4, 1),
              (64, 16): (4, 1), (64, 32): (4, 1), (64, 64): (2, 2), (64, 128): (2, 2)}
#: conv1x1_gate_residual.cu's tiles by output width.
GATE_TILES = {(128, 32): (4, 1), (128, 64): (4, 2), (64, 128): (2, 4)}
SE_EXCITE_THREADS = 256


@dataclass
class CudaLaunch:
    kernel: str          # C++ name with template arguments, spaces removed
    ctas: int
    warps: int
    dynamic_smem: int    # bytes
    vector_path: bool    # the cp.async pipeline (else the element-wise main loop)
    tile: str


def kernel_key(name: str) -> str:
    """A C++ kernel name as a lookup key (the report's short names differ in spaces)."""
    return name.replace(" ", "")


def _smem(dtype: str, bm: int, bn: int) -> int:
    _, ld, stages = LAYOUT[dtype]
    return stages * (bm + bn) * ld * ELEMENT_BYTES[dtype]


def _vec(dtype: str, channels_per_group: int, x) -> bool:
    """The launchers' 16-byte path: unit channel stride, whole chunks per group (the
    captured tensors are channels_last; their alignment is the allocator's)."""
    per_chunk = 16 // ELEMENT_BYTES[dtype]
    return x.stride(1) == 1 and channels_per_group % per_chunk == 0


def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def conv_bn_act(args: dict, dtype: str, squeeze: bool) -> CudaLaunch:
    x, w = args["x"], args["weight"]
    n, c_in, h, wd = x.shape
    c_out, cin_g, k = w.shape[0], w.shape[1], w.shape[2]
    stride, groups = int(args["stride"]), int(args["groups"])
    hwo = _conv_out(h, k, stride) * _conv_out(wd, k, stride)
    cout_g = c_out // groups
    bm, bn = pick_tiles(dtype, cout_g, hwo if squeeze else n * hwo)
    row_tiles = n * math.ceil(hwo / bm) if squeeze else math.ceil(n * hwo / bm)
    ctas = row_tiles * groups * math.ceil(cout_g / bn)
    wm, wn = CONV_TILES[(bm, bn)]
    vec = _vec(dtype, cin_g, x) and w.stride(1) == 1
    name = (f"conv_bn_act_kernel<{CPP_TYPE[dtype]},Tile<{bm},{bn},{wm},{wn}>,"
            f"{'true' if vec else 'false'}>")
    return CudaLaunch(name, ctas, wm * wn, _smem(dtype, bm, bn), vec, f"{bm}x{bn}")


def conv1x1_gate_residual(args: dict, dtype: str) -> CudaLaunch:
    x, w = args["x"], args["weight"]
    n, c_in, h, wd = x.shape
    c_out = w.shape[0]
    project = args.get("proj_weight") is not None
    bm, bn = (128, 32) if c_out <= 32 else (128, 64) if c_out <= 64 else (64, 128)
    wm, wn = GATE_TILES[(bm, bn)]
    ctas = math.ceil(n * h * wd / bm) * math.ceil(c_out / bn)
    vec = _vec(dtype, c_in, x) and w.stride(1) == 1
    if project:
        res, pw = args["shortcut"], args["proj_weight"]
        vec = vec and _vec(dtype, res.shape[1], res) and pw.stride(1) == 1
    name = (f"conv1x1_gate_residual_kernel<{CPP_TYPE[dtype]},Tile<{bm},{bn},{wm},{wn}>,"
            f"{'true' if project else 'false'},{'true' if vec else 'false'}>")
    return CudaLaunch(name, ctas, wm * wn, _smem(dtype, bm, bn), vec, f"{bm}x{bn}")


def se_excite(args: dict, dtype: str) -> CudaLaunch:
    sums, w1 = args["sums"], args["w1"]
    n, c = sums.shape[0], sums.shape[-1]
    s = w1.shape[0]
    return CudaLaunch(f"se_excite_kernel<{CPP_TYPE[dtype]}>", n, SE_EXCITE_THREADS // 32,
                      (c + s) * 4, True, "-")


def eval_launch(op: str, args: dict, dtype: str) -> Optional[CudaLaunch]:
    """The CUDA launch of one eval op call; None for an op the CUDA eval path does not
    run as a kernel of its own."""
    if op == "conv_bn_act":
        return conv_bn_act(args, dtype, squeeze=False)
    if op == "conv_bn_act_squeeze":
        return conv_bn_act(args, dtype, squeeze=True)
    if op == "conv1x1_gate_residual":
        return conv1x1_gate_residual(args, dtype)
    if op == "se_excite":
        return se_excite(args, dtype)
    return None
