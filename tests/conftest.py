import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton picks the
# interpreter when a kernel is defined, so this must be set before
# regnet_kernels.ops is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 references exact in fp32: cuDNN's default TF32 convs are ~1e-3 off, and the
    # Triton fp32 dots follow the same flag. Tests of TF32 turn it on themselves.
    torch.backends.cudnn.allow_tf32 = False


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
    selects them with -m bf16."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_names_bf16(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.bf16)
