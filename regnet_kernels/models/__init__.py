"""RegNet modules: the plain PyTorch reference (`reference`, exported here) and the fused
models built by the same builder (`fused`: fused_model, fuse, unfuse)."""
from .reference import (
    BottleneckTransform,
    Head,
    RegNet,
    ResBottleneckBlock,
    SqueezeExcite,
    Stage,
    Stem,
    reference_model,
)

__all__ = [
    "BottleneckTransform",
    "Head",
    "RegNet",
    "ResBottleneckBlock",
    "SqueezeExcite",
    "Stage",
    "Stem",
    "reference_model",
]
