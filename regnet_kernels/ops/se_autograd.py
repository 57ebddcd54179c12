"""The SE excitation's backward, which both backends register for their se_excite op
(the Triton op and `regnet_kernels::se_excite`): the MLP runs on (N, C) vectors, so a
few small torch matmuls are as fast as a kernel. Imports only torch."""
from __future__ import annotations

import torch


def se_excite_setup_context(ctx, inputs, output) -> None:
    sums, hw, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(sums, w1, b1, w2, b2, output)
    ctx.hw = hw


def se_excite_backward(ctx, grad_gate: torch.Tensor):
    """Gradients of gate = sigmoid(W2 relu(W1 mean + b1) + b2), mean = sums.sum(1) / hw,
    with respect to (sums, hw, w1, b1, w2, b2)."""
    sums, w1, b1, w2, b2, gate = ctx.saved_tensors
    mean = sums.sum(1) / ctx.hw
    w1m, w2m = w1.to(gate.dtype).flatten(1), w2.to(gate.dtype).flatten(1)
    hidden_pre = mean @ w1m.T + b1.to(gate.dtype)
    hidden = hidden_pre.clamp_min(0.0)
    dz = grad_gate * gate * (1.0 - gate)
    dhidden = (dz @ w2m) * (hidden_pre > 0)
    dmean = dhidden @ w1m
    dsums = (dmean / ctx.hw).unsqueeze(1).expand_as(sums).contiguous()
    return (dsums, None, (dhidden.T @ mean).reshape(w1.shape).to(w1.dtype),
            dhidden.sum(0).to(b1.dtype), (dz.T @ hidden).reshape(w2.shape).to(w2.dtype),
            dz.sum(0).to(b2.dtype))
