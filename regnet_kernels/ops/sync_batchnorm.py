"""SyncBatchNorm through the fused training conv, for every backend: the batch
statistics of all ranks of a process group, as `nn.SyncBatchNorm` computes them.

Forward. The conv op's epilogue gives this rank's per-channel mean and biased variance
over its M_r rows (its per-tile (count, mean, M2) partials merged locally). Every rank
all-gathers (M_r, mean_r, M2_r = var_r * M_r) and merges them in rank order with Chan's
update, so all ranks finalize the same mean and variance over M = sum M_r rows, then
inv_std, scale, shift; the running statistics are updated with them and M (unbiased
variance M / (M - 1)), as nn.SyncBatchNorm does. Uneven M_r need nothing special.

Backward. BN's two per-channel reductions, d_beta = sum dv and
d_gamma = inv_std * sum dv * (y - mean), over this rank's rows (the op's own reduction
pass), all-gathered and summed in rank order. The op's backward then applies BN's
backward with the global sums; it divides by its own row count, so they are handed over
scaled by M_r / M. The gamma/beta gradients returned are this rank's, as
nn.SyncBatchNorm returns them (DDP averages them).

Deterministic: all_gather and fixed-order merges; no reduction order is left to the
collective. One all_gather per BN in forward and one in backward.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist


class ConvBnPrimitives(NamedTuple):
    """A backend's raw (autograd-free) pieces of conv_bn_train.

    forward(x, weight, stride, groups, in_scale, in_shift, in_relu, gate, bn_weight,
            bn_bias, eps, frozen_stats) -> (y, stats)
    backward(grad, x, weight, y, stats, stride, groups, in_scale, in_shift, in_relu, gate,
             frozen, output_mask, bn_grads) -> (grad_x, grad_w, grad_gate, d_gamma, d_beta)
    update_running(stats, count): the BN's running-statistics update
    """
    forward: Callable
    backward: Callable
    update_running: Callable


def sync_group(bn: torch.nn.Module, sync_bn: bool) -> Optional[dist.ProcessGroup]:
    """The process group whose ranks share `bn`'s batch statistics, or None for this
    rank's own: an nn.SyncBatchNorm syncs over its process_group, a BatchNorm2d of a
    model fused with sync_bn=True over the default group; only in training mode and when
    torch.distributed is initialized with more than one rank (nn.SyncBatchNorm's rule)."""
    if not bn.training or not (isinstance(bn, torch.nn.SyncBatchNorm) or sync_bn):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """(world, *t.shape): every rank's t, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def merge_across_ranks(count: int, mean: torch.Tensor, var: torch.Tensor,
                       group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased var, total count) over every rank of group, from this rank's
    per-channel mean and biased var over `count` rows; merged in float64, in rank order,
    returned in mean's dtype."""
    local = torch.cat([mean.new_tensor([count], dtype=torch.float64), mean.double(),
                       var.double() * count])
    parts = _gather(local, group)
    c = mean.shape[0]
    n, m, m2 = parts[0, 0], parts[0, 1:c + 1], parts[0, c + 1:]
    for part in parts[1:]:
        n_b, m_b, m2_b = part[0], part[1:c + 1], part[c + 1:]
        total = n + n_b
        delta = m_b - m
        m = m + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (n * n_b / total)
        n = total
    return m.to(mean.dtype), (m2 / n).to(mean.dtype), int(n.item())


class _SyncConvBnTrain(torch.autograd.Function):
    """conv_bn_train with cross-rank statistics; the lazy BN output convention holds
    (y stands for v = y * scale + shift; the stats rows are not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, in_scale, in_shift, gate, bn_weight, bn_bias, prims, group,
                stride, groups, in_relu, eps):
        y, local = prims.forward(x, weight, stride, groups, in_scale, in_shift, in_relu, gate,
                                 bn_weight, bn_bias, eps, None)
        count = y.shape[0] * y.shape[2] * y.shape[3]
        mean, var, total = merge_across_ranks(count, local[0], local[4], group)
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if bn_weight is None else inv_std * bn_weight.detach().to(var.dtype)
        shift = -mean * scale if bn_bias is None else bn_bias.detach().to(var.dtype) - mean * scale
        stats = torch.stack([mean, inv_std, scale, shift, var])
        prims.update_running(stats, total)
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(x, weight, in_scale, in_shift, gate, y, stats)
        ctx.conv = (stride, groups, in_relu)
        ctx.prims, ctx.group, ctx.share = prims, group, count / total
        ctx.bn_dtype = None if bn_weight is None else bn_weight.dtype
        return y, stats

    @staticmethod
    def backward(ctx, grad_v, _grad_stats):
        x, weight, in_scale, in_shift, gate, y, stats = ctx.saved_tensors
        stride, groups, in_relu = ctx.conv
        conv = (x, weight, y, stats, stride, groups, in_scale, in_shift, in_relu, gate, False)
        *_, d_gamma, d_beta = ctx.prims.backward(grad_v, *conv, (False, False), None)
        local = torch.stack([d_beta, d_gamma])
        bn_grads = (_gather(local, ctx.group).sum(0) * ctx.share).to(local.dtype)
        need_gate = gate is not None and ctx.needs_input_grad[4]
        need_x = ctx.needs_input_grad[0] or need_gate
        need_w = ctx.needs_input_grad[1]
        grad_x = grad_w = grad_gate = None
        if need_x or need_w:
            grad_x, grad_w, grad_gate, _, _ = ctx.prims.backward(
                grad_v, *conv, (need_x, need_w), bn_grads)
        grad_gamma = grad_beta = None
        if ctx.bn_dtype is not None:
            grad_gamma, grad_beta = d_gamma.to(ctx.bn_dtype), d_beta.to(ctx.bn_dtype)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_w if need_w else None, None,
                None, grad_gate if need_gate else None, grad_gamma, grad_beta, None, None, None,
                None, None, None)


def sync_conv_bn_train(prims: ConvBnPrimitives, group, x, weight, stride, groups, in_scale,
                       in_shift, in_relu, gate, bn_weight, bn_bias, eps):
    """(y, stats) of conv_bn_train with the statistics of every rank of group; the
    running statistics are updated through prims.update_running."""
    return _SyncConvBnTrain.apply(x, weight, in_scale, in_shift, gate, bn_weight, bn_bias,
                                  prims, group, stride, groups, in_relu, eps)
