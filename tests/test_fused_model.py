"""fused_model / fuse / unfuse: whole fused RegNets against the reference model."""
import copy

import pytest
import torch

import regnet_kernels as rk
from blocks import OpRecorder
from numerics import DEVICE, randomize_bn, rel_err
from regnet_kernels.models.fused import FusedBlock, fuse, fused_model, unfuse
from regnet_kernels.models.reference import ResBottleneckBlock

# 3 stages (24, 48, 96 x 2), Y blocks, group width 8: small enough for the interpreter
TINY = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)


def pair(params, num_classes=10, seed=0):
    """A reference model with random BN statistics and a fused copy of it."""
    torch.manual_seed(seed)
    ref = rk.reference_model(params, num_classes=num_classes)
    randomize_bn(ref, torch.Generator().manual_seed(seed))
    fused = fused_model(params, num_classes=num_classes)
    fused.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), fused.to(DEVICE)


@pytest.mark.parametrize("name", ["regnetx_200mf", "regnety_400mf", "regnet_y_800mf"])
def test_state_dict_is_the_reference_layout(name):
    ref, fused = rk.reference_model(name), fused_model(name)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
           [(k, v.shape) for k, v in ref.state_dict().items()]
    fused.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("params,size", [(TINY, 64), pytest.param("regnetx_200mf", 32),
                                         pytest.param("regnety_200mf", 32, marks=pytest.mark.slow)])
def test_eval_matches_reference(params, size):
    ref, fused = pair(params)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert rel_err(fused.eval()(x), ref.eval()(x)) < 1e-5


def test_train_step_matches_reference():
    ref, fused = pair(TINY)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=gen).to(DEVICE)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref.train()(x_ref), fused.train()(x_fused)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out_ref.backward(grad)
    out.backward(grad)
    assert rel_err(out, out_ref) < 1e-5
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-5
    for (key, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-5, key
    for (key, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        assert rel_err(b, b_ref) < 1e-6, key


def test_eval_refolds_after_a_change():
    ref, fused = pair(TINY)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        fused.eval()(x)
        for model in (ref, fused):  # an in-place change the cached folding must notice
            model.trunk_output.block1[0].f.b[1].running_mean.add_(0.5)
        assert rel_err(fused(x), ref.eval()(x)) < 1e-5


def test_fuse_and_unfuse_keep_parameters():
    ref, _ = pair(TINY)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    model = copy.deepcopy(ref).eval()
    params = [p.data_ptr() for p in model.parameters()]
    assert fuse(model) is model
    assert all(type(m) is not ResBottleneckBlock for m in model.modules())
    assert any(type(m) is FusedBlock for m in model.modules())
    assert [p.data_ptr() for p in model.parameters()] == params
    with torch.no_grad():
        fused_out = model(x)
        unfuse(model)
        assert all(type(m) is not FusedBlock for m in model.modules())
        assert rel_err(fused_out, model(x)) < 1e-5


def test_eval_with_grad_warns():
    _, fused = pair(TINY)
    x = torch.randn(1, 3, 32, 32).to(DEVICE)
    with pytest.warns(UserWarning, match="does not backpropagate"):
        fused.eval()(x)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda_graphs'"):
        fused_model(TINY, backend="cuda_graphs")


def fused_ops_used(model, x):
    """The op namespaces a forward dispatches to (regnet_triton or regnet_kernels)."""
    with torch.no_grad(), OpRecorder() as rec:
        model(x)
    return {op.split(".")[0] for op in rec.ops if op.startswith("regnet_")}


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ CPU backend runs CPU tensors")
@pytest.mark.parametrize("backend,namespace", [("auto", "regnet_kernels"), ("cpu", "regnet_kernels"),
                                               ("triton", "regnet_triton")])
def test_eval_backends_on_cpu(backend, namespace):
    ref, _ = pair(TINY)
    fused = fuse(copy.deepcopy(ref), backend=backend).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert fused_ops_used(fused, x) == {namespace}
    with torch.no_grad():
        assert rel_err(fused(x), ref.eval()(x)) < 1e-5


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ CPU backend runs CPU tensors")
def test_cpu_backend_training_is_a_clear_error():
    fused = fused_model(TINY, backend="cpu").train()
    with pytest.raises(NotImplementedError, match="training on the C\\+\\+ CPU backend"):
        fused(torch.randn(2, 3, 32, 32))
