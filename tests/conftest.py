import os
import sys
from pathlib import Path

import pytest
import torch

# The test helpers (numerics, bad_inputs, blocks, op_backends, cuda_emu) import by name from
# every test folder (tests/ops, tests/backends/<backend>).
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Without a GPU the Triton kernels run under the interpreter. Triton picks the
# interpreter when a kernel is defined, so this must be set before
# regnet_kernels.ops is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 references exact in fp32: cuDNN's default TF32 convs are ~1e-3 off, and the
    # Triton fp32 dots follow the same flag. Tests of TF32 turn it on themselves.
    torch.backends.cudnn.allow_tf32 = False

import op_backends  # noqa: E402
from cuda_emu.harness import emu, release_guarded_inputs  # noqa: E402,F401  (fixtures)


@pytest.fixture(params=[op_backends.param(name) for name in op_backends.ALL])
def backend(request):
    """The op backend a per-op test runs (tests/op_backends.py): triton, cpu, cuda, and
    cuda_emu where a test asks for it. Tests choose them with op_backends.backends(...) or
    op_backends.per_backend(...)."""
    if request.param == "cuda_emu":
        return op_backends.emulated(request.getfixturevalue("emu"))
    return op_backends.get(request.param)


def _names_bf16(value) -> bool:
    if value is torch.bfloat16:
        return True
    if isinstance(value, (tuple, list)):
        return any(_names_bf16(v) for v in value)
    if isinstance(value, dict):
        return any(_names_bf16(v) for v in value.values())
    return False


def pytest_collection_modifyitems(config, items):
    """Mark every test with a torch.bfloat16 parameter `bf16`: bf16 runs on GPUs only (the
    interpreter computes bf16 dots wrongly), so the GPU suite (benchmarks/gpu_suite.sh)
    selects them with -m bf16. Mark the op tests of the C++ CPU backend `cpp_cpu` and those
    of the CUDA emulation `cuda_emu`: CPU-machine checks, which the GPU suite leaves out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_names_bf16(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.bf16)
        if callspec is not None and callspec.params.get("backend") == "cpu":
            item.add_marker(pytest.mark.cpp_cpu)
        if "emu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda_emu)
