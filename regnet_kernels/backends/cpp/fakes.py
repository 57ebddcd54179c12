"""The C++ extension's fake implementations (shapes only, for torch.compile and opcheck).

They are registered once the library is loaded (`register`, called by `ops.py` after it
loads the extension); the C++ library names this module (`set_python_module` in
csrc/ops.cpp), so torch imports it when it needs them. The ops' autograd is in C++
(csrc/autograd.cpp).
"""
from __future__ import annotations

import torch

from ...ops.types import STAT_ROWS, conv_output_size, new_activation
from .cuda_tiles import squeeze_row_tiles


def _conv_out(x, weight, stride):
    k = weight.shape[-1]
    ho, wo = conv_output_size(x.shape[2], k, stride), conv_output_size(x.shape[3], k, stride)
    return new_activation(x.shape[0], weight.shape[0], ho, wo, x)


registered = False


def register() -> None:
    """Registers the fakes and the autograd formulas; the ops must exist (the library loaded)."""
    global registered
    if registered:
        return

    @torch.library.register_fake("regnet_kernels::conv_bn_act")
    def _(x, weight, scale, shift, stride, groups, relu):
        return _conv_out(x, weight, stride)

    @torch.library.register_fake("regnet_kernels::conv_bn_act_squeeze")
    def _(x, weight, scale, shift, stride, groups, relu):
        y = _conv_out(x, weight, stride)
        n, c_out, ho, wo = y.shape
        # SE sums (N, T, C_out): one row per image on the CPU, one per row tile on CUDA.
        tiles = (squeeze_row_tiles(x.dtype, c_out // groups, ho * wo)
                 if x.device.type == "cuda" else 1)
        return y, x.new_empty((n, tiles, c_out), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::se_excite")
    def _(sums, hw, w1, b1, w2, b2):
        return sums.new_empty((sums.shape[0], sums.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::conv1x1_gate_residual")
    def _(x, weight, scale, shift, gate, shortcut, proj_weight, proj_scale, proj_shift,
          proj_stride):
        return _conv_out(x, weight, 1)

    # The oneDNN overloads (CPU only: their squeeze sums have one row per image).
    @torch.library.register_fake("regnet_kernels::conv_bn_act.folded")
    def _(x, weight, bias, stride, groups, relu):
        return _conv_out(x, weight, stride)

    @torch.library.register_fake("regnet_kernels::conv_bn_act_squeeze.folded")
    def _(x, weight, bias, stride, groups, relu):
        return (_conv_out(x, weight, stride),
                x.new_empty((x.shape[0], 1, weight.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("regnet_kernels::conv1x1_gate_residual.folded")
    def _(x, weight, bias, gate, shortcut, proj_weight, proj_bias, proj_stride):
        return _conv_out(x, weight, 1)

    @torch.library.register_fake("regnet_kernels::conv_bn_train")
    def _(x, weight, stride, groups, in_scale, in_shift, in_relu, gate, bn_weight, bn_bias, eps,
          frozen_stats):
        return (_conv_out(x, weight, stride),
                x.new_empty((len(STAT_ROWS), weight.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("regnet_kernels::conv_bn_train_backward")
    def _(grad, x, weight, y, stats, stride, groups, in_scale, in_shift, in_relu, gate, frozen,
          output_mask, bn_grads=None):
        need_x, need_w = output_mask
        none = stats.new_empty((0,))
        return (new_activation(*x.shape, x) if need_x else x.new_empty((0,)),
                weight.new_empty(weight.shape) if need_w else weight.new_empty((0,)),
                stats.new_empty(gate.shape) if need_x and gate is not None else none,
                stats.new_empty((weight.shape[0],)), stats.new_empty((weight.shape[0],)))

    @torch.library.register_fake("regnet_kernels::bn_update_running")
    def _(stats, count, running_mean, running_var, num_batches_tracked, momentum):
        return None

    @torch.library.register_fake("regnet_kernels::se_squeeze")
    def _(y, scale, shift):
        return y.new_empty((y.shape[0], 1, y.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("regnet_kernels::se_squeeze_backward")
    def _(grad_sums, y, scale, shift):
        return new_activation(*y.shape, y)

    @torch.library.register_fake("regnet_kernels::bn_add_relu")
    def _(y, scale, shift, shortcut, sc_scale, sc_shift):
        return new_activation(*y.shape, y)

    @torch.library.register_fake("regnet_kernels::bn_add_relu_backward")
    def _(grad, out):
        return new_activation(*out.shape, out)
    registered = True


# The library loaded by other means (torch imports this module for the fakes, see
# set_python_module in csrc/ops.cpp): register them now.
if hasattr(torch.ops.regnet_kernels, "conv_bn_act"):
    register()
