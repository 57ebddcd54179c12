"""The Triton backend: each op a torch custom op in the `regnet_triton` namespace (so it
traces under torch.compile) with a fake implementation. Importing it imports Triton; the
dispatcher (`regnet_kernels.ops.dispatch`) imports it only when the backend runs.

Eval (BN folded from running statistics):
  conv_bn_act            k x k grouped conv + folded BN + ReLU (+ SE squeeze sums)
  se_excite              SE squeeze sums -> sigmoid gate
  conv1x1_gate_residual  gate * x -> 1x1 conv + folded BN + identity/projection shortcut + ReLU
An eval-mode Y block is 4 launches, an X block 3.

Training (BN from batch statistics; differentiable, deterministic):
  conv_bn_train          conv of relu(x * s + t) * gate -> raw y, batch stats, running-stat
                         update (built from conv_bn_stats + bn_finalize)
  se_squeeze             SE squeeze of relu(y * s + t) from the raw conv output
  bn_add_relu            relu(BN(y) + shortcut or BN(projection))
  conv_dgrad, conv_wgrad, bn_act_backward: the gradient kernels behind them
"""
from __future__ import annotations

import torch
import triton

from ...ops.dispatch import interpreting
from .bn_act_backward import bn_act_backward
from .bn_add_relu import bn_add_relu
from .bn_finalize import BatchStats, bn_finalize
from .conv1x1_gate_residual import conv1x1_gate_residual
from .conv_bn_act import ConvStats, conv_bn_act, conv_bn_stats
from .conv_bn_train import conv_bn_train
from .conv_grad import DyPrologue, UPrologue, conv_dgrad, conv_wgrad
from .se_excite import se_excite, se_squeeze


def status() -> tuple[bool, str]:
    """The "triton" backend's (usable, reason) for the dispatcher's table."""
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if interpreting():
        return True, (f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): "
                      "CPU tensors, slow; for tests")
    return False, ("no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU through "
                   "Triton's interpreter, slowly)")


__all__ = ["conv_bn_act", "se_excite", "conv1x1_gate_residual", "conv_bn_stats", "ConvStats",
           "bn_finalize", "BatchStats", "se_squeeze", "bn_add_relu", "conv_bn_train",
           "conv_dgrad", "conv_wgrad", "DyPrologue", "UPrologue", "bn_act_backward", "status"]
