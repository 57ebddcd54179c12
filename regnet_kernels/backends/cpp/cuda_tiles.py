"""The CUDA launchers' tile choice, in Python: what the fakes need to give the CUDA ops'
outputs their shapes without a GPU, and what the static report models the launches with
(`regnet_kernels/bench/cuda_launches.py`).

It mirrors `pick_tiles` in csrc/cuda/igemm.cuh, which depends on the dtype and the shapes
only; the CUDA emulation tests run the launchers' own plan function
(`rk_conv_bn_act_plan`) against it.
"""
from __future__ import annotations

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def pick_tiles(dtype: str, n_per_group: int, rows: int) -> tuple[int, int]:
    """(BM, BN) of a conv: BN from the group's output width, BM = 64 for small row counts,
    narrow groups and fp32. dtype: "bf16", "fp16" or "fp32"."""
    bn = 8 if n_per_group <= 8 else 16 if n_per_group <= 16 else 32 if n_per_group <= 32 \
        else 64 if n_per_group <= 64 else 128
    bm = 64 if rows <= 64 or bn <= 16 or dtype == "fp32" else 128
    return bm, bn


def squeeze_row_tiles(dtype: torch.dtype, out_per_group: int, out_pixels: int) -> int:
    """T of conv_bn_act_squeeze's (N, T, C_out) SE sums on CUDA: the row tiles of one image
    (each tile writes its partial sums; se_excite adds them up)."""
    bm, _ = pick_tiles(DTYPE_NAMES[dtype], out_per_group, out_pixels)
    return -(-out_pixels // bm)
