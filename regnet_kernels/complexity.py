"""Parameters, multiply-adds and activations of a RegNet, counted exactly as pycls counts them.

Per conv: output size ``(h - 1) // stride + 1``; flops ``k*k*c_in*c_out*h'*w' / groups`` plus
``c_out*h'*w'`` for a bias; params ``k*k*c_in*c_out / groups`` plus ``c_out`` for a bias; acts
``c_out*h'*w'``. BatchNorm adds ``2*C`` params (running statistics are buffers). The SE convs
count at 1x1 spatial size. The classifier counts ``c_in*c_out + c_out`` flops and params and
``c_out`` acts. ReLU, sigmoid, pooling, the SE multiply and the residual add are free.
"""
from __future__ import annotations

from .design import BlockSpec, RegNetParams
from .zoo import resolve_params

STEM_KERNEL = 3
INPUT_CHANNELS = 3


def conv_output_size(size: int, stride: int) -> int:
    """Output height (or width) of a conv with 'same' padding and an odd kernel."""
    return (size - 1) // stride + 1


class _Tally:
    """Running totals of params, flops and acts."""

    def __init__(self) -> None:
        self.params = self.flops = self.acts = 0

    def conv(self, size: int, c_in: int, c_out: int, k: int, stride: int = 1,
             groups: int = 1, bias: bool = False) -> int:
        """Count a square conv applied at ``size`` x ``size``; return its output size."""
        size = conv_output_size(size, stride)
        weights = k * k * c_in * c_out // groups
        self.params += weights + (c_out if bias else 0)
        self.flops += (weights + (c_out if bias else 0)) * size * size
        self.acts += c_out * size * size
        return size

    def batchnorm(self, channels: int) -> None:
        self.params += 2 * channels

    def conv_bn(self, size: int, c_in: int, c_out: int, k: int, stride: int = 1,
                groups: int = 1) -> int:
        size = self.conv(size, c_in, c_out, k, stride, groups)
        self.batchnorm(c_out)
        return size

    def linear(self, c_in: int, c_out: int) -> None:
        self.params += c_in * c_out + c_out
        self.flops += c_in * c_out + c_out
        self.acts += c_out

    def block(self, size: int, block: BlockSpec, bottleneck_width: int) -> int:
        """Count one residual bottleneck block entered at ``size``; return its output size."""
        w_b = bottleneck_width
        self.conv_bn(size, block.w_in, w_b, 1)
        out_size = self.conv_bn(size, w_b, w_b, 3, block.stride, w_b // block.group_width)
        if block.se_width:
            self.conv(1, w_b, block.se_width, 1, bias=True)
            self.conv(1, block.se_width, w_b, 1, bias=True)
        self.conv_bn(out_size, w_b, block.w_out, 1)
        if block.w_in != block.w_out or block.stride != 1:
            self.conv_bn(size, block.w_in, block.w_out, 1, block.stride)
        return out_size


def stage_output_sizes(params: RegNetParams, resolution: int = 224) -> list[int]:
    """Spatial size (height = width) of each stage's output for a square input."""
    size = conv_output_size(resolution, 2)  # the stem
    sizes = []
    for stage in params.stages():
        size = conv_output_size(size, stage.stride)
        sizes.append(size)
    return sizes


def complexity(
    name_or_params: str | RegNetParams, resolution: int = 224, num_classes: int = 1000
) -> dict[str, int]:
    """Count ``params``, ``flops`` (multiply-adds) and ``acts`` of a RegNet, as pycls does.

    Args:
        name_or_params: a model name (any spelling :func:`~regnet_kernels.model_params` accepts)
            or a :class:`~regnet_kernels.RegNetParams`.
        resolution: square input size.
        num_classes: classifier outputs.

    Returns:
        ``{"params": int, "flops": int, "acts": int}``; params equals the number of elements
        of the parameters (not buffers) of :func:`~regnet_kernels.reference_model`.
    """
    params = resolve_params(name_or_params)
    tally = _Tally()
    size = tally.conv_bn(resolution, INPUT_CHANNELS, params.stem_width, STEM_KERNEL, stride=2)
    for stage in params.stages():
        for block in stage.blocks():
            size = tally.block(size, block, stage.bottleneck_width)
    tally.linear(params.stages()[-1].width, num_classes)
    return {"params": tally.params, "flops": tally.flops, "acts": tally.acts}
