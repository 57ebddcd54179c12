"""fused_model / fuse / unfuse: whole fused RegNets against the reference model."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import regnet_kernels as rk
from blocks import OpRecorder
from numerics import DEVICE, gpu_only, randomize_bn, rel_err
from regnet_kernels.models.fused import FusedBlock, fuse, fused_model, unfuse
from regnet_kernels.models.reference import ResBottleneckBlock
from regnet_kernels.ops.dispatch import interpreting

# 3 stages (24, 48, 96 x 2), Y blocks, group width 8: small enough for the interpreter
TINY = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)


def pair(params, num_classes=10, seed=0, backend="auto"):
    """A reference model with random BN statistics and a fused copy of it."""
    torch.manual_seed(seed)
    ref = rk.reference_model(params, num_classes=num_classes)
    randomize_bn(ref, torch.Generator().manual_seed(seed))
    fused = fused_model(params, num_classes=num_classes, backend=backend)
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


# On CPU tensors: the Triton kernels under the interpreter, and the C++ CPU ops; on
# CUDA tensors: the Triton kernels and the C++ extension's CUDA kernels.
TRAIN_BACKENDS = ["triton", "cpu"] if DEVICE == "cpu" else ["triton", gpu_only("cuda")]
# Multi-step runs and whole-model training passes beyond test_train_step_matches_reference:
# a minute or more each for the Triton kernels under the interpreter, so `slow` on the CPU
# (pytest -m slow); single steps of the same ops stay in the default run.
MULTI_STEP_BACKENDS = ([pytest.param("triton", marks=pytest.mark.slow), "cpu"] if DEVICE == "cpu"
                       else TRAIN_BACKENDS)


def assert_grads_and_buffers_match(fused, ref, tol=1e-5):
    for (key, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        if not p_ref.requires_grad:
            assert p.grad is None and p_ref.grad is None, key
            continue
        assert rel_err(p.grad, p_ref.grad) <= tol, key
    for (key, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        assert rel_err(b, b_ref) < 1e-6, key


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_train_step_matches_reference(backend):
    ref, fused = pair(TINY, backend=backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=gen).to(DEVICE)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref.train()(x_ref), fused.train()(x_fused)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out_ref.backward(grad)
    out.backward(grad)
    assert rel_err(out, out_ref) < 1e-5
    assert rel_err(x_fused.grad, x_ref.grad) < 1e-5
    assert_grads_and_buffers_match(fused, ref)


@pytest.mark.parametrize("backend", MULTI_STEP_BACKENDS)
def test_sgd_steps_then_eval_match_reference(backend):
    """Three optimizer steps in train mode (same losses), then the eval forward."""
    ref, fused = pair(TINY, backend=backend)
    gen = torch.Generator().manual_seed(6)
    data = [(torch.randn(2, 3, 32, 32, generator=gen).to(DEVICE),
             torch.randint(0, 10, (2,), generator=gen).to(DEVICE)) for _ in range(3)]
    losses = {}
    for name, model in (("ref", ref), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        losses[name] = []
        for x, target in data:
            loss = torch.nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["fused"] == pytest.approx(losses["ref"], rel=1e-5)
    for (key, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p, p_ref) < 1e-5, key
    with torch.no_grad():
        x = data[0][0]
        assert rel_err(fused.eval()(x), ref.eval()(x)) < 1e-5


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_train_mode_under_no_grad_updates_running_stats(backend):
    ref, fused = pair(TINY, backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.no_grad():
        assert rel_err(fused.train()(x), ref.train()(x)) < 1e-5
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


# Changes no version counter sees: through `.data` (init code, pycls) and BN attributes.
UNTRACKED_CHANGES = {
    "conv weight .data": lambda m: m.trunk_output.block2[0].f.b[0].weight.data.mul_(1.5),
    "BN running_var .data": lambda m: m.trunk_output.block1[0].f.c[1].running_var.data.add_(0.5),
    "stem BN weight .data": lambda m: m.stem[1].weight.data.mul_(-1.0),
    "SE weight .data": lambda m: m.trunk_output.block1[0].f.se.fc1.weight.data.mul_(2.0),
    "BN eps": lambda m: setattr(m.trunk_output.block2[0].f.a[1], "eps", 0.5),
}


@pytest.mark.parametrize("change", UNTRACKED_CHANGES)
def test_eval_is_never_stale(change):
    """After an eval forward, a change through `.data` or of a BN's eps shows in the next
    eval forward as it does in the reference's."""
    ref, fused = pair(TINY)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        assert rel_err(fused.eval()(x), ref.eval()(x)) < 1e-5
        before = ref(x)
        for model in (ref, fused):
            UNTRACKED_CHANGES[change](model)
        after = ref(x)
        assert rel_err(after, before) > 1e-3  # the change matters
        assert rel_err(fused(x), after) < 1e-5


def folding_ops(model, x):
    """The ops of one eval forward that fold BNs (everything but the fused ops and the head)."""
    with torch.no_grad(), OpRecorder() as rec:
        model(x)
    return {op for op in rec.ops if "foreach" in op or "rsqrt" in op}


def test_freeze_folds_once_for_inference():
    ref, fused = pair(TINY)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert folding_ops(fused.eval(), x)  # unfrozen: every forward folds
    assert rk.freeze(fused) is fused
    with torch.no_grad():
        assert rel_err(fused(x), ref.eval()(x)) < 1e-5
    assert folding_ops(fused.eval(), x) == set()  # frozen: folded once, eval() keeps it

    for model in (ref, fused):
        model.trunk_output.block2[0].f.b[1].running_var.data.add_(0.5)
    rk.unfreeze(fused)
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) < 1e-5
    rk.freeze(fused)
    fused.train()  # training unfreezes
    assert folding_ops(fused.eval(), x)
    with pytest.raises(ValueError, match="freeze: RegNet has no fused modules"):
        rk.freeze(rk.reference_model(TINY))


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


def fused_ops_with_grad(model, x):
    """The op namespaces a forward + backward dispatches to."""
    with OpRecorder() as rec:
        model(x).sum().backward()
    return {op.split(".")[0] for op in rec.ops if op.startswith("regnet_")}


@pytest.mark.parametrize("backend", MULTI_STEP_BACKENDS)
def test_eval_with_grad_is_differentiable(backend):
    """Gradients through an eval-mode model: the training kernels with every BN frozen
    (running statistics, left unchanged), equal to the reference's gradients."""
    ref, fused = pair(TINY, backend=backend)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = fused.eval()(x_fused), ref.eval()(x_ref)
    out.sum().backward()
    out_ref.sum().backward()
    assert rel_err(out, out_ref) < 1e-5 and rel_err(x_fused.grad, x_ref.grad) < 1e-5
    assert_grads_and_buffers_match(fused, ref)
    assert fused_ops_with_grad(fused, x) != set()


@pytest.mark.parametrize("backend", MULTI_STEP_BACKENDS)
def test_frozen_batchnorm_detection_style(backend):
    """model.train() with every BN in eval mode and frozen, then with only the stem's BN
    frozen (mixed modes): outputs, gradients and running statistics match the
    reference's, through the fused ops."""
    ref, fused = pair(TINY, backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for frozen in ("all", "stem"):
        for model in (ref, fused):
            model.train()
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.BatchNorm2d) and (frozen == "all" or "stem" in name):
                    m.eval().requires_grad_(False)
            model.zero_grad()
        out, out_ref = fused(x), ref(x)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        assert rel_err(out, out_ref) < 1e-5, frozen
        assert_grads_and_buffers_match(fused, ref, tol=4e-5)  # fp32 against fp32
        assert fused_ops_with_grad(fused, x) != set()
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) < 1e-5


def test_bad_inputs_are_clear_errors():
    _, fused = pair(TINY)
    fused.eval()
    with torch.no_grad():
        with pytest.raises(ValueError,
                           match=r"takes \(N, 3, H, W\) images, got shape \(2, 4, 32, 32\)"):
            fused(torch.randn(2, 4, 32, 32).to(DEVICE))
        with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
            fused(torch.randn(3, 32, 32).to(DEVICE))


def test_float64_model_on_triton():
    """A float64 model computes in float64 end to end on the Triton kernels."""
    ref, _ = pair(TINY)
    ref = ref.double().eval()
    fused = fuse(copy.deepcopy(ref), backend="triton")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert rel_err(fused(x.to(DEVICE)), ref(x.to(DEVICE))) < 1e-12


def test_nchw_and_channels_last_inputs():
    ref, fused = pair(TINY)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    with torch.no_grad():
        expected = ref.eval()(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            assert rel_err(fused.eval()(x.contiguous(memory_format=layout)), expected) < 1e-5


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda_graphs'"):
        fused_model(TINY, backend="cuda_graphs")


def test_available_backends():
    status = rk.available_backends()
    assert set(status) == {"triton", "cpu", "cuda"}
    assert status["cpu"].usable, status["cpu"].reason  # CI builds the C++ extension
    assert status["triton"].usable == (torch.cuda.is_available() or interpreting())
    assert status["cuda"].usable or status["cuda"].reason
    assert torch.cuda.is_available() or not status["cuda"].usable


WITHOUT_TRITON = """
import sys

class NoTriton:  # triton is a Linux-only dependency: as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError("No module named 'triton'")

sys.meta_path.insert(0, NoTriton())
import torch
import regnet_kernels as rk
from regnet_kernels.ops.dispatch import BackendUnavailable

status = rk.available_backends()
assert not status["triton"].usable and "triton is not importable" in status["triton"].reason
assert status["cpu"].usable, status["cpu"].reason
params = rk.RegNetParams(depth=2, w0=16, wa=8, wm=2.0, group_width=8, se_ratio=0.25)
ref = rk.reference_model(params, num_classes=4)
fused = rk.fused_model(params, num_classes=4)
fused.load_state_dict(ref.state_dict())
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    assert torch.allclose(fused.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
fused.train()(x).sum().backward()
ref.train()(x).sum().backward()
for (key, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
    assert torch.allclose(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5), key
try:
    rk.fused_model(params, backend="triton")(x)
except BackendUnavailable as e:
    assert "pip install" in str(e)
else:
    raise AssertionError("backend='triton' ran without triton")
try:
    rk.ops.bn_finalize  # the Triton backend's: it loads with Triton
except BackendUnavailable:
    pass
else:
    raise AssertionError("a Triton op loaded without triton")
print("ok")
"""


def test_everything_but_the_triton_backend_works_without_triton():
    """`import regnet_kernels`, the C++ CPU backend (eval and training) and the backend
    report, where Triton is not installed (macOS, Windows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_backend_and_device_mismatch_is_a_clear_error():
    other = "cuda" if DEVICE == "cpu" else "cpu"
    fused = fused_model(TINY, backend=other).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"backend='{other}' runs"):
        fused(torch.randn(1, 3, 32, 32).to(DEVICE))
    with pytest.raises(RuntimeError, match=f"backend='{other}' runs"):
        fused_model(TINY, backend=other).train()(torch.randn(2, 3, 32, 32).to(DEVICE))


def fused_ops_used(model, x):
    """The op namespaces a forward dispatches to (regnet_triton or regnet_kernels)."""
    with torch.no_grad(), OpRecorder() as rec:
        model(x)
    return {op.split(".")[0] for op in rec.ops if op.startswith("regnet_")}


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ CPU backend runs CPU tensors")
@pytest.mark.parametrize("backend,namespace", [
    ("auto", "regnet_kernels"), ("cpu", "regnet_kernels"),
    # slow under the interpreter; test_float64_model_on_triton runs the Triton eval model
    pytest.param("triton", "regnet_triton", marks=pytest.mark.slow)])
def test_eval_backends_on_cpu(backend, namespace):
    ref, _ = pair(TINY)
    fused = fuse(copy.deepcopy(ref), backend=backend).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert fused_ops_used(fused, x) == {namespace}
    with torch.no_grad():
        assert rel_err(fused(x), ref.eval()(x)) < 1e-5


# (backend, autocast dtype): each backend that runs this device's tensors at full speed
AUTOCAST_CASES = ([("cpu", dtype) for dtype in (torch.bfloat16, torch.float16)] if DEVICE == "cpu"
                  else [gpu_only(backend, dtype) for backend in ("triton", "cuda")
                        for dtype in (torch.bfloat16, torch.float16)])
AUTOCAST_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("backend,dtype", AUTOCAST_CASES)
def test_autocast_eval(backend, dtype):
    """Under torch.autocast the convs run in the autocast dtype; the output has the
    reference's dtype and is within that dtype's accuracy of the float64 reference."""
    ref, fused = pair(TINY, backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double().eval()(x.double())
        with torch.autocast(DEVICE, dtype=dtype):
            out_ref = ref.eval()(x)
            with OpRecorder() as rec:
                out = fused.eval()(x)
    assert out.dtype == out_ref.dtype == dtype
    assert any(op.endswith(".conv_bn_act") for op in rec.ops), rec.ops
    assert rel_err(out, expected) < AUTOCAST_TOL[dtype]
    assert rel_err(out_ref, expected) < AUTOCAST_TOL[dtype]


@pytest.mark.parametrize("backend,dtype", AUTOCAST_CASES)
def test_autocast_training(backend, dtype):
    """A training step under autocast: the reference's output dtype, output and
    gradients within twice the reference's own autocast error against float64 (16-bit
    gradients of a deep net at batch 4 are tens of percent off for both: the test
    catches order-one errors, such as a gradient that never arrives)."""
    ref, fused = pair(TINY, backend=backend)
    exact = copy.deepcopy(ref).double().train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        out_ref, out = ref.train()(x), fused.train()(x)
    expected = exact(x.double())
    assert out.dtype == out_ref.dtype == dtype
    assert rel_err(out, expected) < max(2 * rel_err(out_ref, expected), AUTOCAST_TOL[dtype])
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    expected.square().sum().backward()
    for (key, p), p_ref, p_exact in zip(fused.named_parameters(), ref.parameters(),
                                        exact.parameters()):
        assert p.grad.dtype == torch.float32, key
        assert rel_err(p.grad, p_exact.grad) < max(2 * rel_err(p_ref.grad, p_exact.grad), 0.1), key


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ CPU backend runs CPU tensors")
def test_torch_compile_fullgraph_on_cpu():
    ref, fused = pair(TINY, backend="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    compiled = torch.compile(fused.eval(), fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), ref.eval()(x)) < 1e-5


COMPILED_FIRST_CALL = """
import torch
import regnet_kernels as rk
params = rk.RegNetParams(depth=4, w0=24, wa=24, wm=2.0, group_width=8, se_ratio=0.25)
torch.manual_seed(0)
model = rk.fused_model(params, backend="cpu", num_classes=10).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    out = torch.compile(model, fullgraph=True)(x)  # the process's first op call: traced
    eager = model(x)
assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), (out - eager).abs().max()
print("ok")
"""


def test_torch_compile_fullgraph_as_the_first_call():
    """A fresh process whose first fused op call is under torch.compile(fullgraph=True): the
    extension is loaded by the dispatcher outside the trace (loading it inside failed with
    Dynamo's "Unsupported context manager")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILED_FIRST_CALL], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_eval_forward_in_a_cuda_graph(backend):
    ref, fused = pair(TINY, backend=backend)
    fused.eval()
    static_x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        fused(static_x)  # warm-up: compiles the kernels, folds the BNs
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fused(static_x)
        x = torch.randn(2, 3, 64, 64, device="cuda")
        static_x.copy_(x)
        graph.replay()
        assert rel_err(static_out, ref.eval()(x)) < 1e-5
        compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # recorded on the second call, replayed after
            out = compiled(x)
        assert rel_err(out, ref.eval()(x)) < 1e-5


def test_fused_model_stores_kxk_weights_as_the_kernels_read_them():
    """fused_model's 3x3 (and stem) conv weights are channels_last, so the per-forward fold
    does not permute them; a contiguous checkpoint loads into that layout, same values."""
    model = fused_model(TINY, num_classes=10)
    kxk = [m.weight for m in model.modules()
           if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert kxk and all(w.is_contiguous(memory_format=torch.channels_last) for w in kxk)
    ref, _ = pair(TINY)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    model.load_state_dict(state)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in kxk)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
