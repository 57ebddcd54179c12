"""Whole X/Y blocks assembled from the C++ ops (block_ops=cpp): eval blocks against the float64
reference block; a train step is bit-deterministic on the CPU and CUDA kernels, and
torch.compile traces a whole train step into one graph. The blocks' parity in training
with the float64 reference is in tests/test_fused_block_train.py (parametrized by
backend)."""
import copy

import pytest
import torch

from blocks import BLOCKS, make_block
from numerics import activation, check_close, nan_filled_empty
from op_backends import backends
from regnet_kernels.backends.cpp import ops as cpp
from regnet_kernels.models.fused import block_forward_eval, block_forward_train, fold_block


@backends("cpu", "cuda")
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_eval(backend, name):
    block, h = make_block(name, torch.float32)
    block = block.to(backend.device)
    x = activation(3, BLOCKS[name][0], h, h, torch.float32, torch.Generator().manual_seed(8),
                   device=backend.device)
    with torch.no_grad():
        y = block_forward_eval(x, fold_block(block), block_ops=cpp)
        ref = block.double()(x.double())
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref, torch.float32)


def run_block(block, x, grad):
    x = x.detach().requires_grad_()
    with nan_filled_empty():
        out = block_forward_train(x, block, block_ops=cpp)
        out.backward(grad)
    return out, x.grad


@backends("cpu", "cuda")
def test_block_train_is_deterministic(backend):
    block, h = make_block("Y-proj-s2", torch.float32)
    block = block.to(backend.device)
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(2)
    x = activation(3, block.w_in, h, h, torch.float32, gen, device=backend.device)
    grad = activation(3, block.w_out, 7, 7, torch.float32, gen, device=backend.device)
    a, da = run_block(block.train(), x, grad)
    b, db = run_block(twin.train(), x, grad)
    assert torch.equal(a, b) and torch.equal(da, db)
    for (key, p), q in zip(block.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, u), v in zip(block.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(u, v), key


@pytest.mark.slow
def test_block_train_compiles_fullgraph():
    """torch.compile traces a whole train step (fakes, autograd formulas, the mutating
    running-statistics update) into one graph, and computes what eager does."""
    block, h = make_block("Y-proj-s2", torch.float32)
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(3)
    x = activation(2, block.w_in, h, h, torch.float32, gen)
    grad = activation(2, block.w_out, 7, 7, torch.float32, gen)
    step = torch.compile(lambda x: block_forward_train(x, block.train(), block_ops=cpp),
                         fullgraph=True, backend="aot_eager")
    x_c = x.clone().requires_grad_()
    out = step(x_c)
    out.backward(grad)
    expected, dx = run_block(twin.train(), x, grad)
    assert torch.equal(out, expected) and torch.equal(x_c.grad, dx)
    for (key, p), q in zip(block.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, u), v in zip(block.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(u, v), key
