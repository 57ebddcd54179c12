"""regnet_kernels: RegNet X/Y networks with fused GPU kernels.

Public API:
  design space:   RegNetParams, sample_params
  model zoo:      list_models, model_params
  complexity:     complexity
  modules:        reference_model, fused_model, fuse, unfuse, freeze, unfreeze
  backends:       available_backends, resolved_backend
  checkpoints:    load_checkpoint
  fused ops:      regnet_kernels.ops (conv_bn_act, se_excite, conv1x1_gate_residual)
"""
from .design import RegNetParams, sample_params
from .zoo import list_models, model_params
from .complexity import complexity
from .models.reference import reference_model
from .models.fused import freeze, fuse, fused_model, resolved_backend, unfreeze, unfuse
from .checkpoints import load_checkpoint
from .ops.dispatch import available_backends
from . import ops

__version__ = "0.1.0"

__all__ = [
    "RegNetParams",
    "sample_params",
    "list_models",
    "model_params",
    "complexity",
    "reference_model",
    "fused_model",
    "fuse",
    "unfuse",
    "freeze",
    "unfreeze",
    "resolved_backend",
    "load_checkpoint",
    "available_backends",
    "ops",
]
