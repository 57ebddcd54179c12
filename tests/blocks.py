"""Test blocks: small reference X/Y blocks with random BN statistics, and an op recorder."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from numerics import DEVICE, randomize_bn
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
