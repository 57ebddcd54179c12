"""The C++ extension's CPU kernels (regnet_kernels.ops.cpp) against float64 references,
and its build-on-first-use (one build per test run, into a fresh cache directory,
by two processes at once)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bad_inputs import (CONV_BN_ACT_CASES, GATE_RESIDUAL_CASES, conv_bn_act_args,
                        gate_residual_args)
from blocks import BLOCKS, make_block
from numerics import (activation, bn_fold, check_close, check_conv_bn_act_op, conv_weight,
                      grouped_conv_cases, ref_conv_bn, rel_err)
from regnet_kernels.models.fused import block_forward_eval, fold_block
from regnet_kernels.backends.cpp import build, ops as cpp

DTYPES = [torch.float32, torch.bfloat16]

_BUILD_SCRIPT = textwrap.dedent("""
    import torch
    from regnet_kernels.ops import cpp
    x = torch.randn(2, 8, 5, 5)
    y = cpp.conv_bn_act(x, torch.randn(8, 8, 3, 3), torch.ones(8), torch.zeros(8))
    assert y.shape == (2, 8, 5, 5) and torch.isfinite(y).all()
    print("ok")
""")


@pytest.fixture(scope="module", autouse=True)
def fresh_build(tmp_path_factory):
    """Builds the extension as a clean checkout would: two processes at once into
    a fresh cache directory, which this module's tests then load from."""
    cache = tmp_path_factory.mktemp("regnet_kernels_cache")
    env = dict(os.environ, REGNET_KERNELS_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    old = os.environ.get(build.CACHE_ENV)
    os.environ[build.CACHE_ENV] = str(cache)
    yield cache, results
    if old is None:
        os.environ.pop(build.CACHE_ENV, None)
    else:
        os.environ[build.CACHE_ENV] = old


def test_concurrent_first_build(fresh_build):
    cache, results = fresh_build
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        assert out.strip() == "ok"
    building = [err for _, _, err in results if "regnet_kernels: building the C++ extension" in err]
    assert len(building) == 1, "exactly one process builds; the other waits on the lock and loads"
    assert str(cache) in building[0]
    assert len(list(cache.glob("*/BUILD_OK"))) == 1
    ok, reason = cpp.available()
    assert ok, reason


def test_import_does_not_build(tmp_path):
    env = dict(os.environ, REGNET_KERNELS_CACHE=str(tmp_path / "cache"))
    code = "import regnet_kernels, regnet_kernels.backends.cpp.ops; print('imported')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr
    assert not (tmp_path / "cache").exists()


def test_build_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(build.ExtensionBuildError, match="sources not found"):
        build._build_and_load()
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "ops.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(build, "source_dir", lambda: src)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(build.ExtensionBuildError) as info:
        build._build_and_load()
    msg = str(info.value)
    assert "deliberately broken" in msg and "C++20 compiler" in msg
    assert build.CACHE_ENV in msg and "ninja" in msg


# ---------------------------------------------------------------------------
# conv_bn_act
# ---------------------------------------------------------------------------


def check_conv_bn_act(*args, **kwargs):
    """The shared conv_bn_act check, plus: the squeeze sums have one tile per image."""
    _, sums = check_conv_bn_act_op(cpp.conv_bn_act, *args, **kwargs)
    assert sums is None or sums.shape[1] == 1


@pytest.mark.parametrize("cpg,groups,stride,size,batch,squeeze,dtype", grouped_conv_cases(DTYPES))
def test_grouped_3x3(cpg, groups, stride, size, batch, squeeze, dtype):
    c = cpg * groups
    check_conv_bn_act(batch, c, c, size, 3, stride, groups, dtype, squeeze=squeeze)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in,c_out,size,batch", [(24, 56, 13, 3), (232, 152, 7, 1), (48, 8, 16, 2)])
def test_dense_1x1(c_in, c_out, size, batch, dtype):
    check_conv_bn_act(batch, c_in, c_out, size, 1, 1, 1, dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_dense_3x3(stride):
    check_conv_bn_act(2, 40, 48, 13, 3, stride, 1, torch.float32, squeeze=True)


def test_stem_and_float16():
    check_conv_bn_act(2, 3, 32, 13, 3, 2, 1, torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = activation(2, 16, 7, 7, torch.float16, gen)
    w = conv_weight(16, 8, 3, torch.float16, gen)
    scale, shift = bn_fold(16, gen)
    y = cpp.conv_bn_act(x, w, scale, shift, groups=2)
    assert y.dtype == torch.float16
    assert rel_err(y, ref_conv_bn(x, w, scale, shift, 1, 2).relu()) < 2e-3


def test_no_relu_nchw_input_and_many_squeeze_chunks():
    # 3 images of 13x14 = 182 pixels: several squeeze chunks per image, NCHW input.
    check_conv_bn_act(3, 16, 24, 13, 3, 1, 2, torch.float32, relu=False, squeeze=True,
                      channels_last=False)


def test_squeeze_is_deterministic():
    gen = torch.Generator().manual_seed(4)
    x = activation(2, 32, 16, 16, torch.float32, gen)
    w = conv_weight(32, 16, 3, torch.float32, gen)
    scale, shift = bn_fold(32, gen)
    a = cpp.conv_bn_act(x, w, scale, shift, groups=2, squeeze=True)
    b = cpp.conv_bn_act(x, w, scale, shift, groups=2, squeeze=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch():
    x = torch.empty(0, 8, 5, 5)
    y, sums = cpp.conv_bn_act(x, torch.randn(8, 8, 1, 1), torch.ones(8), torch.zeros(8),
                              squeeze=True)
    assert y.shape == (0, 8, 5, 5) and sums.shape == (0, 1, 8)


@pytest.mark.parametrize("over,err,match", CONV_BN_ACT_CASES)
def test_conv_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        cpp.conv_bn_act(**conv_bn_act_args("cpu", **over))


def test_cpp_checks_behind_the_python_ones():
    """Called directly, the C++ op checks its arguments too (no crash on bad shapes)."""
    ops = cpp._ops()
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.conv_bn_act(torch.randn(2, 16, 7, 7), torch.randn(16, 8, 3, 3), torch.ones(3),
                        torch.zeros(16), 1, 2, True)
    with pytest.raises(RuntimeError, match="groups"):
        ops.conv_bn_act(torch.randn(2, 16, 7, 7), torch.randn(16, 8, 3, 3), torch.ones(16),
                        torch.zeros(16), 1, 3, True)
    with pytest.raises(RuntimeError, match="identity shortcut"):
        ops.conv1x1_gate_residual(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 1, 1), torch.ones(8),
                                  torch.zeros(8), None, torch.randn(1, 8, 5, 4), None, None, None, 1)
    with pytest.raises(RuntimeError, match="SE weights"):
        ops.se_excite(torch.randn(2, 1, 8), 4, torch.randn(2, 8), torch.randn(3), torch.randn(8, 2),
                      torch.randn(8))


# ---------------------------------------------------------------------------
# se_excite
# ---------------------------------------------------------------------------


def ref_se(sums, hw, w1, b1, w2, b2):
    mean = sums.double().sum(1) / hw
    hidden = (mean @ w1.double().flatten(1).T + b1.double()).relu()
    return torch.sigmoid(hidden @ w2.double().flatten(1).T + b2.double())


@pytest.mark.parametrize("n,t,c,s,conv_shaped,wdtype", [
    (1, 1, 8, 2, True, torch.float32),
    (3, 1, 232, 56, False, torch.float32),
    (2, 3, 120, 30, True, torch.float32),
    (2, 2, 48, 12, True, torch.bfloat16),
    (2, 1, 1512, 4096, False, torch.float32),
])
def test_se_excite(n, t, c, s, conv_shaped, wdtype):
    gen = torch.Generator().manual_seed(5)
    hw = 49
    sums = torch.randn(n, t, c, generator=gen) * hw
    shape1, shape2 = ((s, c, 1, 1), (c, s, 1, 1)) if conv_shaped else ((s, c), (c, s))
    w1 = (torch.randn(shape1, generator=gen) / c ** 0.5).to(wdtype)
    w2 = (torch.randn(shape2, generator=gen) / s ** 0.5).to(wdtype)
    b1, b2 = (torch.randn(s, generator=gen) * 0.1).to(wdtype), (torch.randn(c, generator=gen) * 0.1).to(wdtype)
    gate = cpp.se_excite(sums if t > 1 else sums[:, 0], hw, w1, b1, w2, b2)
    assert gate.dtype == torch.float32 and gate.shape == (n, c)
    check_close(gate, ref_se(sums, hw, w1, b1, w2, b2), torch.float32)


@pytest.mark.parametrize("over,err,match", [
    (dict(sums=torch.randn(2, 8).double()), TypeError, "float32"),
    (dict(sums=torch.randn(8)), ValueError, "sums must be"),
    (dict(hw=0), ValueError, "hw"),
    (dict(w1=torch.randn(3, 8)), ValueError, "b1 must have shape"),
    (dict(w2=torch.randn(8, 3)), ValueError, "w2 must have shape"),
    (dict(b2=torch.randn(8).long()), TypeError, "dtype"),
])
def test_se_bad_input(over, err, match):
    args = dict(sums=torch.randn(2, 8), hw=4, w1=torch.randn(2, 8), b1=torch.randn(2),
                w2=torch.randn(8, 2), b2=torch.randn(8))
    args.update(over)
    with pytest.raises(err, match=match):
        cpp.se_excite(**args)


# ---------------------------------------------------------------------------
# conv1x1_gate_residual
# ---------------------------------------------------------------------------


def check_gate_residual(n, c_b, c_out, c_in, h, stride, gated, project, dtype,
                        channels_last=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho = (h - 1) // stride + 1
    x = activation(n, c_b, ho, ho, dtype, gen, channels_last)
    w = conv_weight(c_out, c_b, 1, dtype, gen)
    scale, shift = bn_fold(c_out, gen)
    kwargs = {}
    u = x.double()
    if gated:
        kwargs["gate"] = torch.rand(n, c_b, generator=gen)
        u = u * kwargs["gate"].double()[:, :, None, None]
    ref = ref_conv_bn(u, w, scale, shift)
    if project:
        shortcut = activation(n, c_in, h, h, dtype, gen, channels_last)
        pw = conv_weight(c_out, c_in, 1, dtype, gen)
        ps, pt = bn_fold(c_out, gen)
        kwargs.update(proj_weight=pw, proj_scale=ps, proj_shift=pt, proj_stride=stride)
        ref = ref + ref_conv_bn(shortcut, pw, ps, pt, stride)
    else:
        shortcut = activation(n, c_out, ho, ho, dtype, gen, channels_last)
        ref = ref + shortcut.double()
    ref = ref.relu()
    y = cpp.conv1x1_gate_residual(x, w, scale, shift, shortcut, **kwargs)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c_b,c_out,c_in,h,stride,gated,project", [
    (3, 56, 56, 0, 7, 1, True, False),      # Y identity, gate folded into x (C_out > H*W)
    (1, 24, 24, 0, 13, 1, True, False),     # Y identity, gate folded into the weights
    (3, 48, 48, 0, 16, 1, False, False),    # X identity
    (3, 56, 56, 24, 13, 2, True, True),     # Y projection stride 2
    (1, 232, 232, 112, 7, 2, True, True),   # wide projection, odd size
    (3, 64, 64, 32, 13, 2, False, True),    # X projection stride 2
    (1, 48, 48, 32, 7, 1, False, True),     # projection stride 1
    (3, 8, 16, 8, 1, 2, True, True),        # 1x1 maps
])
def test_gate_residual(n, c_b, c_out, c_in, h, stride, gated, project, dtype):
    check_gate_residual(n, c_b, c_out, c_in, h, stride, gated, project, dtype)


def test_gate_residual_nchw_inputs():
    check_gate_residual(2, 24, 40, 16, 13, 2, True, True, torch.float32, channels_last=False)
    check_gate_residual(2, 40, 40, 0, 7, 1, True, False, torch.float32, channels_last=False)


@pytest.mark.parametrize("over,err,match", GATE_RESIDUAL_CASES)
def test_gate_residual_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        cpp.conv1x1_gate_residual(**gate_residual_args("cpu", **over))


# ---------------------------------------------------------------------------
# opcheck (schemas, fakes, autograd registration) and torch.compile
# ---------------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(6)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(24, 8, 3, torch.float32, gen)
    s, t = bn_fold(24, gen)
    yield "conv_bn_act", (x, w, s, t, 2, 2, True)
    yield "conv_bn_act_squeeze", (x, w, s, t, 1, 2, False)
    yield "se_excite", (torch.rand(2, 1, 24, generator=gen), 16, torch.randn(6, 24, 1, 1),
                        torch.randn(6), torch.randn(24, 6, 1, 1), torch.randn(24))
    xb = activation(2, 24, 4, 4, torch.float32, gen)
    w1 = conv_weight(32, 24, 1, torch.float32, gen)
    s1, t1 = bn_fold(32, gen)
    yield "conv1x1_gate_residual", (xb, w1, s1, t1, torch.rand(2, 24, generator=gen),
                                    activation(2, 32, 4, 4, torch.float32, gen), None, None, None, 1)
    ps, pt = bn_fold(32, gen)
    yield "conv1x1_gate_residual", (xb, w1, s1, t1, None, x, conv_weight(32, 16, 1, torch.float32, gen),
                                    ps, pt, 2)


@pytest.mark.parametrize("case", list(range(5)))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(cpp._ops(), name).default, args)


@pytest.mark.slow
def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(7)
    x = activation(2, 16, 7, 7, torch.float32, gen)
    w = conv_weight(16, 8, 3, torch.float32, gen)
    s, t = bn_fold(16, gen)

    def f(x):
        y, sums = cpp.conv_bn_act(x, w, s, t, groups=2, squeeze=True)
        return y, sums

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# ---------------------------------------------------------------------------
# Whole eval blocks assembled from the C++ ops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_eval(name):
    block, h = make_block(name, torch.float32)
    x = activation(3, BLOCKS[name][0], h, h, torch.float32, torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = block_forward_eval(x, fold_block(block), block_ops=cpp)
        ref = block.double()(x.double())
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_close(y, ref, torch.float32)


def test_cuda_architectures_from_the_environment(monkeypatch):
    """REGNET_KERNELS_CUDA_ARCHS picks nvcc's targets (default sm_90a and sm_80); a bad
    value is a clear error."""
    from regnet_kernels.backends.cpp import build

    monkeypatch.delenv(build.CUDA_ARCHS_ENV, raising=False)
    assert build.cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a",
                                            "-gencode=arch=compute_80,code=sm_80"]
    monkeypatch.setenv(build.CUDA_ARCHS_ENV, " 90a ")
    assert build.cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv(build.CUDA_ARCHS_ENV, "sm_90")
    with pytest.raises(build.ExtensionBuildError, match="expected compute capabilities"):
        build.cuda_arch_flags()
