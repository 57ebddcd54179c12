import os

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
