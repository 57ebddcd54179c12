"""The fused ops' backend-neutral face: the op functions, BN folding, and the contract both
backends (regnet_kernels.backends.triton and .cpp) build on. Imports only torch.

    checks.py       argument checks (each backend passes its device check and dtypes)
    types.py        TrainOutput, BatchNormArgs, the BN statistics rows, output shapes
    sync_batchnorm.py  the cross-rank BN statistics (SyncBatchNorm) over either backend
    dispatch.py     the backend table: which backend runs where, and why not

`regnet_kernels.ops.<op>` (conv_bn_act, se_excite, conv1x1_gate_residual, conv_bn_train,
se_squeeze, bn_add_relu, conv_bn_stats, bn_finalize, conv_dgrad, conv_wgrad,
bn_act_backward) is the Triton backend's function, imported (with Triton) on first use;
`regnet_kernels.ops.cpp` is the C++ extension's (CPU and CUDA) functions; `dispatch.ops_for`
gives either by backend name. docs/ops.md has the ops' math.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import dispatch
from .types import BatchNormArgs, TrainOutput, acc_dtype

# The Triton backend's public names, re-exported here on first use (importing Triton then).
_TRITON_NAMES = ("conv_bn_act", "se_excite", "conv1x1_gate_residual", "conv_bn_stats",
                 "ConvStats", "bn_finalize", "BatchStats", "se_squeeze", "bn_add_relu",
                 "conv_bn_train", "conv_dgrad", "conv_wgrad", "DyPrologue", "UPrologue",
                 "bn_act_backward")


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        return getattr(dispatch.ops_for("triton"), name)
    if name == "cpp":
        return dispatch.ops_for("cpu")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fold_bn(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as a per-channel (scale, shift), float32 (float64 for a float64 BN):
    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a BatchNorm with running statistics")
    dtype = acc_dtype(bn.running_var.dtype)
    var = bn.running_var.to(dtype)
    mean = bn.running_mean.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale.detach().contiguous(), shift.detach().contiguous()


def fold_bns(bns: Sequence[torch.nn.BatchNorm2d]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`fold_bn` of several BatchNorms at once, with torch._foreach_* ops (a handful of
    launches for all of them instead of ~6 each): the fused eval forward folds on every
    call, so that no change of a weight, statistic or eps (`.data` included) goes unseen."""
    def batchable(bn):
        dtype = acc_dtype(bn.running_var.dtype) if bn.running_var is not None else None
        return (bn.running_mean is not None and bn.weight is not None and bn.bias is not None
                and all(t.dtype == dtype for t in (bn.running_var, bn.running_mean, bn.weight,
                                                   bn.bias)))
    if not all(batchable(bn) for bn in bns):
        return [fold_bn(bn) for bn in bns]
    with torch.no_grad():
        scale = torch._foreach_add([bn.running_var for bn in bns], [float(bn.eps) for bn in bns])
        torch._foreach_rsqrt_(scale)
        torch._foreach_mul_(scale, [bn.weight for bn in bns])
        shift = torch._foreach_mul(scale, [bn.running_mean for bn in bns])
        shift = torch._foreach_sub([bn.bias for bn in bns], shift)
    return list(zip(scale, shift))


__all__ = [*_TRITON_NAMES, "fold_bn", "fold_bns", "BatchNormArgs", "TrainOutput", "cpp"]
