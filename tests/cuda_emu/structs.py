"""ctypes mirrors of the argument structs of csrc/cuda/launchers.h (checked against the C
layout by tests/backends/cuda/test_emulation_harness.py::test_struct_mirrors_match_headers),
and the statistics rows of csrc/rk_stats.h, read from the header itself."""
from __future__ import annotations

import ctypes
import re
from ctypes import POINTER, Structure, c_double, c_int, c_int64, c_void_p
from pathlib import Path

RK_FLOAT32, RK_FLOAT16, RK_BFLOAT16 = 0, 1, 2

STATS_HEADER = Path(__file__).resolve().parents[2] / "csrc" / "rk_stats.h"


def stat_rows(header: Path = STATS_HEADER) -> dict[str, int]:
    """rk_stats.h's enumerators: {"RK_STAT_MEAN": 0, ..., "RK_STAT_ROWS": 5}."""
    return {name: int(value) for name, value in
            re.findall(r"\b(RK_STAT_\w+)\s*=\s*(\d+)", header.read_text())}


_ROWS = stat_rows()
RK_STAT_MEAN, RK_STAT_INV_STD, RK_STAT_SCALE = (_ROWS["RK_STAT_MEAN"], _ROWS["RK_STAT_INV_STD"],
                                                _ROWS["RK_STAT_SCALE"])
RK_STAT_SHIFT, RK_STAT_VAR, RK_STAT_ROWS = (_ROWS["RK_STAT_SHIFT"], _ROWS["RK_STAT_VAR"],
                                            _ROWS["RK_STAT_ROWS"])

c_dtype = c_int  # rk_dtype (a C enum)
i64 = c_int64
ptr = c_void_p


def _f(names: str, t) -> list[tuple[str, object]]:
    return [(n.strip(), t) for n in names.split(",")]


class rk_conv_bn_act_args(Structure):
    _fields_ = [
        ("dtype", c_dtype), ("x", ptr), *_f("n, h, w, c_in", i64), *_f("sx_n, sx_h, sx_w, sx_c", i64),
        ("weight", ptr), *_f("c_out, k", i64), *_f("sw_o, sw_i, sw_h, sw_w", i64),
        ("scale", ptr), ("shift", ptr), *_f("stride, groups", i64), ("relu", c_int),
        ("y", ptr), ("sums", ptr),
    ]


class rk_conv_plan(Structure):
    _fields_ = _f("out_h, out_w, block_m, block_n, tiles_per_image", i64)


class rk_se_excite_args(Structure):
    _fields_ = [
        ("sums", ptr), *_f("n, t, c, hw", i64), ("weight_dtype", c_dtype),
        ("w1", ptr), *_f("s, s1_o, s1_i", i64), ("b1", ptr), ("w2", ptr), *_f("s2_o, s2_i", i64),
        ("b2", ptr), ("gate", ptr),
    ]


class rk_conv1x1_gate_residual_args(Structure):
    _fields_ = [
        ("dtype", c_dtype), ("x", ptr), *_f("n, h, w, c_in", i64), *_f("sx_n, sx_h, sx_w, sx_c", i64),
        ("weight", ptr), *_f("c_out, sw_o, sw_i", i64), ("scale", ptr), ("shift", ptr),
        ("gate", ptr), ("s_gate_n", i64), ("res", ptr), *_f("res_h, res_w, res_c", i64),
        *_f("sr_n, sr_h, sr_w, sr_c", i64), ("proj_weight", ptr), *_f("sp_o, sp_i", i64),
        ("proj_scale", ptr), ("proj_shift", ptr), ("proj_stride", i64), ("y", ptr),
    ]


class rk_prologue(Structure):
    _fields_ = [("in_scale", ptr), ("in_shift", ptr), ("in_relu", c_int), ("gate", ptr),
                ("s_gate_n", i64)]


class rk_conv_train_args(Structure):
    _fields_ = [
        ("dtype", c_dtype), ("x", ptr), *_f("n, h, w, c_in", i64), *_f("sx_n, sx_h, sx_w, sx_c", i64),
        ("weight", ptr), *_f("c_out, k", i64), *_f("sw_o, sw_i, sw_h, sw_w", i64),
        *_f("stride, groups", i64), ("prologue", rk_prologue), ("y", ptr), ("partials", ptr),
    ]


class rk_conv_train_plan_t(Structure):
    _fields_ = _f("out_h, out_w, block_m, tiles_m", i64)


class rk_bn_finalize_args(Structure):
    _fields_ = [("partials", ptr), *_f("tiles, c, rows, block_m", i64), ("gamma", ptr),
                ("beta", ptr), ("eps", c_double), ("stats", ptr)]


class rk_se_squeeze_args(Structure):
    _fields_ = [("dtype", c_dtype), ("y", ptr), *_f("n, hw, c", i64), ("scale", ptr),
                ("shift", ptr), ("sums", ptr)]


class rk_se_squeeze_backward_args(Structure):
    _fields_ = [("dtype", c_dtype), ("grad_sums", ptr), ("y", ptr), *_f("n, hw, c", i64),
                ("scale", ptr), ("shift", ptr), ("dv", ptr)]


class rk_bn_add_relu_args(Structure):
    _fields_ = [("dtype", c_dtype), ("y", ptr), *_f("rows, c", i64), ("scale", ptr),
                ("shift", ptr), ("shortcut", ptr), ("sc_scale", ptr), ("sc_shift", ptr),
                ("out", ptr)]


class rk_bn_backward_sums_args(Structure):
    _fields_ = [("dtype", c_dtype), ("dv", ptr), ("y", ptr), *_f("rows, c", i64), ("mean", ptr),
                ("workspace", ptr), ("sums", ptr)]


class rk_bn_backward_dy_args(Structure):
    _fields_ = [("dtype", c_dtype), ("dv", ptr), ("y", ptr), *_f("rows, c", i64), ("stats", ptr),
                ("sums", ptr), ("frozen", c_int), ("dy", ptr)]


class rk_conv_dgrad_args(Structure):
    _fields_ = [
        ("dtype", c_dtype), ("dy", ptr), *_f("n, out_h, out_w, c_out", i64), ("weight_t", ptr),
        *_f("c_in, k, stride, groups", i64), ("x", ptr), *_f("h, w", i64),
        *_f("sx_n, sx_h, sx_w, sx_c", i64), ("prologue", rk_prologue), ("dx", ptr),
        ("dgate_partials", ptr),
    ]


class rk_conv_dgrad_plan_t(Structure):
    _fields_ = _f("block_m, tiles_per_image", i64)


class rk_conv_wgrad_args(Structure):
    _fields_ = [
        ("dtype", c_dtype), ("dy", ptr), *_f("n, out_h, out_w, c_out", i64), ("x", ptr),
        *_f("h, w, c_in", i64), *_f("sx_n, sx_h, sx_w, sx_c", i64), *_f("k, stride, groups", i64),
        ("prologue", rk_prologue), ("workspace", ptr), ("dw", ptr),
    ]


# struct name -> (mirror, header)
STRUCTS = {
    "rk_conv_bn_act_args": (rk_conv_bn_act_args, "launchers.h"),
    "rk_conv_plan": (rk_conv_plan, "launchers.h"),
    "rk_se_excite_args": (rk_se_excite_args, "launchers.h"),
    "rk_conv1x1_gate_residual_args": (rk_conv1x1_gate_residual_args, "launchers.h"),
    "rk_prologue": (rk_prologue, "launchers.h"),
    "rk_conv_train_args": (rk_conv_train_args, "launchers.h"),
    "rk_conv_train_plan_t": (rk_conv_train_plan_t, "launchers.h"),
    "rk_bn_finalize_args": (rk_bn_finalize_args, "launchers.h"),
    "rk_se_squeeze_args": (rk_se_squeeze_args, "launchers.h"),
    "rk_se_squeeze_backward_args": (rk_se_squeeze_backward_args, "launchers.h"),
    "rk_bn_add_relu_args": (rk_bn_add_relu_args, "launchers.h"),
    "rk_bn_backward_sums_args": (rk_bn_backward_sums_args, "launchers.h"),
    "rk_bn_backward_dy_args": (rk_bn_backward_dy_args, "launchers.h"),
    "rk_conv_dgrad_args": (rk_conv_dgrad_args, "launchers.h"),
    "rk_conv_dgrad_plan_t": (rk_conv_dgrad_plan_t, "launchers.h"),
    "rk_conv_wgrad_args": (rk_conv_wgrad_args, "launchers.h"),
}

# launcher name -> (argtypes, restype); cudaError_t is a C enum (int), streams are pointers.
P = POINTER
LAUNCHERS = {
    "rk_conv_bn_act_plan": ([P(rk_conv_bn_act_args), c_int, P(rk_conv_plan)], c_int),
    "rk_conv_bn_act": ([P(rk_conv_bn_act_args), ptr], c_int),
    "rk_se_excite": ([P(rk_se_excite_args), ptr], c_int),
    "rk_conv1x1_gate_residual": ([P(rk_conv1x1_gate_residual_args), ptr], c_int),
    "rk_conv_train_plan": ([P(rk_conv_train_args), P(rk_conv_train_plan_t)], c_int),
    "rk_conv_train": ([P(rk_conv_train_args), ptr], c_int),
    "rk_bn_finalize": ([P(rk_bn_finalize_args), ptr], c_int),
    "rk_se_squeeze": ([P(rk_se_squeeze_args), ptr], c_int),
    "rk_se_squeeze_backward": ([P(rk_se_squeeze_backward_args), ptr], c_int),
    "rk_bn_add_relu": ([P(rk_bn_add_relu_args), ptr], c_int),
    "rk_relu_backward": ([c_dtype, ptr, ptr, i64, ptr, ptr], c_int),
    "rk_bn_backward_workspace": ([i64, i64], i64),
    "rk_bn_backward_sums": ([P(rk_bn_backward_sums_args), ptr], c_int),
    "rk_bn_backward_dy": ([P(rk_bn_backward_dy_args), ptr], c_int),
    "rk_conv_dgrad_plan": ([P(rk_conv_dgrad_args), P(rk_conv_dgrad_plan_t)], c_int),
    "rk_conv_dgrad": ([P(rk_conv_dgrad_args), ptr], c_int),
    "rk_conv_wgrad_workspace": ([P(rk_conv_wgrad_args)], i64),
    "rk_conv_wgrad": ([P(rk_conv_wgrad_args), ptr], c_int),
}


def layout_program(names=None) -> str:
    """C source printing `name sizeof` and `name.field offsetof` for each mirrored struct."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "launchers.h"',
             "int main(void) {"]
    for name in names or STRUCTS:
        cls = STRUCTS[name][0]
        lines.append(f'  printf("{name} %zu\\n", sizeof({name}));')
        for fname, _ in cls._fields_:
            lines.append(f'  printf("{name}.{fname} %zu\\n", offsetof({name}, {fname}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def mirror_layout(names=None) -> dict[str, int]:
    out = {}
    for name in names or STRUCTS:
        cls = STRUCTS[name][0]
        out[name] = ctypes.sizeof(cls)
        for fname, _ in cls._fields_:
            out[f"{name}.{fname}"] = getattr(cls, fname).offset
    return out
