import os

import torch

# Without a GPU the Triton kernels run under the interpreter. Triton picks the
# interpreter when a kernel is defined, so this must be set before
# regnet_kernels.ops is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
