"""Eval-mode X and Y blocks assembled from the fused ops vs the reference block module."""
import pytest
import torch

from blocks import BLOCKS, OpRecorder, make_block
from numerics import DTYPES, activation, poisoned_outputs, rel_err, tol
from regnet_kernels.models.fused import block_forward_eval, fold_block

@pytest.mark.parametrize("dtype", DTYPES)
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
