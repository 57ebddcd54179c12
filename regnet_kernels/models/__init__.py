"""RegNet modules: the plain PyTorch reference (and, later, the fused variant)."""
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
