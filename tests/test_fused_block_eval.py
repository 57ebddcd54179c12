"""Eval-mode X and Y blocks assembled from the fused ops vs the reference block module."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from numerics import DEVICE, activation, poisoned_outputs, randomize_bn, rel_err, tol
from regnet_kernels.models.fused import block_forward_eval, fold_block
from regnet_kernels.models.reference import ResBottleneckBlock

# (w_in, w_out, stride, group_width, se_width, H): identity and projection
# shortcuts, strides 1 and 2, grouped and dense (groups = 1) 3x3 convs.
BLOCKS = {
    "Y-proj-s2": (24, 56, 2, 8, 6, 13),
    "Y-identity": (56, 56, 1, 8, 14, 7),
    "Y-dense": (48, 48, 1, 48, 12, 7),
    "X-proj-s2": (32, 64, 2, 16, 0, 13),
    "X-identity": (48, 48, 1, 24, 0, 7),
    "X-proj-s1": (32, 48, 1, 24, 0, 7),
}


class OpRecorder(TorchDispatchMode):
    """Names of the ops dispatched inside the block: each is one kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def make_block(name, dtype, seed=0):
    w_in, w_out, stride, g, se, h = BLOCKS[name]
    torch.manual_seed(seed)
    block = ResBottleneckBlock(w_in, w_out, stride, g, 1.0, se)
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(block, gen)
    with torch.no_grad():  # non-zero SE biases, so the test sees them
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
    return block.eval().to(DEVICE, dtype), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_reference(name, batch, dtype):
    block, h = make_block(name, dtype)
    x = activation(batch, block.w_in, h, h, dtype, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block.double()(x.double())
        block.to(dtype)
        with poisoned_outputs():
            out = block_forward_eval(x, fold_block(block))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("name,launches", [("Y-proj-s2", 4), ("Y-identity", 4),
                                           ("X-proj-s2", 3), ("X-identity", 3)])
def test_launch_count(name, launches):
    block, h = make_block(name, torch.float32)
    x = activation(1, block.w_in, h, h, torch.float32)
    folded = fold_block(block)
    with torch.no_grad(), OpRecorder() as rec:
        block_forward_eval(x, folded)
    assert all(op.startswith("regnet_triton.") for op in rec.ops), rec.ops
    assert len(rec.ops) == launches, rec.ops


def test_torch_compile_fullgraph():
    block, h = make_block("Y-proj-s2", torch.float32)
    folded = fold_block(block)
    x = activation(2, block.w_in, h, h, torch.float32)
    compiled = torch.compile(lambda t: block_forward_eval(t, folded), fullgraph=True)
    with torch.no_grad():
        out, ref = compiled(x), block_forward_eval(x, folded)
    assert torch.equal(out, ref)
