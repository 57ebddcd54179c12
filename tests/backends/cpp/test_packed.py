"""The C++ CPU backend's eval path with prepacked oneDNN weights (`pack_block` /
`pack_conv`: each BN's scale folded into its conv weight, reordered once into oneDNN's
layout, conv + bias + ReLU (+ residual add) as one oneDNN primitive): against float64
references, packed once per fold in a frozen model, and under torch.compile."""
import copy

import pytest
import torch

import regnet_kernels as rk
from blocks import BLOCKS, make_block
from numerics import activation, check_close, nan_filled_empty, randomize_bn, rel_err
from regnet_kernels.backends.cpp import ops as cpp
from regnet_kernels.models.fused import FoldedBlock, FusedBlock, fold_block

TINY = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_packed_block_against_float64(name, dtype):
    block, h = make_block(name, dtype)
    x = activation(3, BLOCKS[name][0], h, h, dtype, torch.Generator().manual_seed(8))
    with torch.no_grad():
        packed = cpp.pack_block(fold_block(block), x)
        y = packed(x)
        ref = copy.deepcopy(block).double()(x.double())
    convs = [packed.a, packed.b, packed.c] + ([packed.proj] if packed.proj else [])
    assert all(conv.weight.is_mkldnn for conv in convs)  # reordered once, here
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_packed_block_in_chunks_against_float64(name, dtype, monkeypatch):
    """A batch larger than the chunk budget runs in balanced chunks (5 images: 2, 2, 1),
    each a separate oneDNN call on a slice; the concatenated output is the float64 block's."""
    block, h = make_block(name, dtype)
    x = activation(5, BLOCKS[name][0], h, h, dtype, torch.Generator().manual_seed(9))
    folded = fold_block(block)
    with torch.no_grad():
        whole = cpp.pack_block(folded, x)
        b_shape = [5, folded.a.weight.shape[0], (h - 1) // folded.b.stride + 1,
                   (h - 1) // folded.b.stride + 1]
        per_image = b_shape[1] * b_shape[2] * b_shape[3] * x.element_size()
        monkeypatch.setattr(cpp, "chunk_budget_bytes", lambda: 2 * per_image + 1)
        chunked = cpp.pack_block(folded, x)
        calls = []
        run = cpp.PackedBlock._run
        monkeypatch.setattr(cpp.PackedBlock, "_run",
                            lambda self, part: calls.append(part.shape[0]) or run(self, part))
        x_in = x.clone()
        with nan_filled_empty():
            y = chunked(x_in)
        ref = copy.deepcopy(block).double()(x.double())
    assert whole.images_per_chunk == 5 and chunked.images_per_chunk == 2
    assert calls == [2, 2, 1]
    assert torch.equal(x_in, x)  # the input is read, not written
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert not y.isnan().any()
    check_close(y, ref, dtype)


def test_choose_images_per_chunk(monkeypatch):
    """Conv b's output per chunk within the budget, at least one image, at most the batch."""
    monkeypatch.setattr(cpp, "chunk_budget_bytes", lambda: 1000)
    assert cpp.choose_images_per_chunk([32, 2, 5, 5], torch.float32) == 5  # 200 B per image
    assert cpp.choose_images_per_chunk([32, 2, 5, 5], torch.bfloat16) == 10
    assert cpp.choose_images_per_chunk([4, 2, 5, 5], torch.float32) == 4
    assert cpp.choose_images_per_chunk([32, 20, 5, 5], torch.float32) == 1
    assert cpp.l2_cache_bytes() > 0
    monkeypatch.undo()
    assert cpp.chunk_budget_bytes() == min(cpp.l2_cache_bytes() * torch.get_num_threads(),
                                           32 << 20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1024)
    assert cpp.chunk_budget_bytes() == 32 << 20  # many threads: below the mmap threshold


def test_float16_and_cuda_keep_the_folded_weights():
    block, h = make_block("Y-identity", torch.float16)
    folded = fold_block(block)
    x = activation(2, BLOCKS["Y-identity"][0], h, h, torch.float16)
    assert cpp.pack_block(folded, x) is folded
    assert cpp.pack_block(folded, x.to("meta")) is folded


def frozen_pair():
    torch.manual_seed(0)
    ref = rk.reference_model(TINY, num_classes=10)
    randomize_bn(ref, torch.Generator().manual_seed(0))
    fused = rk.fused_model(TINY, num_classes=10, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    return ref.eval(), rk.freeze(fused.eval())


def test_frozen_model_packs_once(monkeypatch):
    ref, fused = frozen_pair()
    packed = []
    pack = cpp._pack
    monkeypatch.setattr(cpp, "_pack", lambda *args: packed.append(1) or pack(*args))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = fused(x), fused(x)
        expected = copy.deepcopy(ref).double()(x.double())
    blocks = [m for m in fused.modules() if isinstance(m, FusedBlock)]
    assert len(packed) == 1 + sum(4 if b.proj is not None else 3 for b in blocks)
    assert torch.equal(first, second)
    assert rel_err(first, expected) < 1e-5
    assert [k for k in fused.state_dict()] == [k for k in ref.state_dict()]
    fused.train().eval()  # training unfreezes: the next forward packs the new weights
    with torch.no_grad():
        fused(x)
    assert not any(isinstance(w, cpp.PackedBlock) for b in blocks
                   for w in b.__dict__.get("_frozen", {}).values())


def test_a_new_input_shape_repacks_once_and_replaces(monkeypatch):
    """oneDNN's layout is picked for an input shape: a frozen model packs again for a new
    batch size (once), keeps one packing per module, and stays right for both shapes."""
    ref, fused = frozen_pair()
    packed = []
    pack = cpp._pack
    monkeypatch.setattr(cpp, "_pack", lambda *args: packed.append(args[1]) or pack(*args))
    gen = torch.Generator().manual_seed(6)
    x2, x3 = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        fused(x2)
        per_shape = len(packed)
        y3, y3_again, y2 = fused(x3), fused(x3), fused(x2)
        assert len(packed) == 3 * per_shape  # x2, x3, x2 again: one packing each
        assert {shape[0] for shape in packed[per_shape:2 * per_shape]} == {3}
        for y, x in ((y3, x3), (y3_again, x3), (y2, x2)):
            assert rel_err(y, copy.deepcopy(ref).double()(x.double())) < 1e-5
    for module in fused.modules():
        assert len(module.__dict__.get("_frozen", {})) <= 1


def test_unfrozen_model_refolds_every_forward():
    """Without freeze, each forward folds for the ops without packing (a reorder every forward
    would cost more than it saves), and a change of the weights is seen by the next one."""
    ref, fused = frozen_pair()
    rk.unfreeze(fused)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused(x)
        block = fused.trunk_output[0][0]
        assert isinstance(block._folded(None, fused.stem(x), cpp), FoldedBlock)
        for model in (ref, fused):
            model.trunk_output[0][0].f.b[1].running_var.mul_(4.0)
        assert rel_err(fused(x), ref(x)) < 1e-5


def test_torch_compile_fullgraph_with_packed_weights():
    """A frozen model whose forward packed its weights (oneDNN tensors in the fold cache)
    compiles with fullgraph, and so does one compiled before any forward (the trace, which
    cannot make oneDNN tensors, folds for the ops without packing); both compute the
    reference."""
    ref, fused = frozen_pair()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fused(x)  # packs
        expected = ref(x)
        assert rel_err(torch.compile(fused, fullgraph=True)(x), expected) < 1e-5
        _, fresh = frozen_pair()
        assert rel_err(torch.compile(fresh, fullgraph=True)(x), expected) < 1e-5


def test_frozen_model_takes_an_empty_batch():
    ref, fused = frozen_pair()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        empty = fused(x[:0])
        y = fused(x)
        expected = copy.deepcopy(ref).double()(x.double())
    assert empty.shape == (0, 10)
    assert rel_err(y, expected) < 1e-5
