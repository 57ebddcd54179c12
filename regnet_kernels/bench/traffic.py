"""Analytic traffic and FLOP model: what an op, block or network must move and compute.

Eval mode, per image, activations of ``elem`` bytes per element; every pass counts its reads
plus its writes. Two schedules of the same network:

- eager: every conv, BN, ReLU, pool, SE step, multiply, add and ReLU is its own pass over its
  tensor (an in-place ReLU still reads and writes it). 16-18 launches per Y block, 10-12 per X.
- fused: the fused block of docs/ops.md. conv a reads x and writes a; conv b reads a and
  writes b (and the SE sums); the excite reads and writes only (N, C) vectors; conv c reads b,
  the shortcut (x, or x at the projection's stride) and writes the block output. 4 launches per
  Y block, 3 per X block.

Conventions (these set where the totals land relative to the rough ~260 / ~75 MB per image for
RegNetY-8.0GF in bf16 at 224 of docs/performance.md):
- The stem (eager: conv, BN, ReLU; fused: one conv_bn_act) and the head (pool, classifier;
  the same in both) are included.
- A stride-2 1x1 projection reads only the pixels it uses (w_in * H_out * W_out elements).
- The (N, C)-sized SE vectors and the head's pooled vector are not counted (< 0.1%).
- Weights (conv, BN, SE, classifier) are listed apart: they are read once per call, so per image
  they shrink with the batch. The fused kernels read BN as fp32 scale/shift; the weight total
  uses the parameter count times ``elem`` for both schedules.
- FLOPs are 2 x the multiply-adds that `regnet_kernels.complexity` counts (pycls's count).

With these conventions RegNetY-8.0GF bf16 at 224 moves 261 MB/image eager in 285 launches and
75 MB/image fused in 71 launches (3.5x less), the rough estimate's ~260 / ~75 MB and ~280 / ~70
launches.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..complexity import INPUT_CHANNELS, complexity
from ..zoo import resolve_params
from .shapes import BlockShape, block_shapes, stem_output_size

#: Peak numbers for the roofline, measured on an H200 (docs/performance.md): copy bandwidth
#: and dense tensor-core FLOP/s. fp32 runs on TF32 tensor cores (cuDNN's default), whose dense
#: rate is half the 16-bit rate on Hopper.
H200_PEAKS = {"bandwidth": 4.3e12,
              "flops": {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12}}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Cost:
    """What a call must do: bytes moved (reads + writes), FLOP, kernel launches."""

    bytes: int
    flops: int
    launches: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops,
                    self.launches + other.launches)

    def __mul__(self, k: int) -> "Cost":
        return Cost(self.bytes * k, self.flops * k, self.launches * k)


def roofline_floor_s(cost: Cost, bandwidth: float | None, flops: float | None) -> float | None:
    """The lower bound max(bytes / bandwidth, FLOP / peak FLOP/s) in seconds; None without
    peaks. A missing bandwidth or FLOP peak leaves out that term."""
    terms = [cost.bytes / bandwidth if bandwidth else None, cost.flops / flops if flops else None]
    terms = [t for t in terms if t is not None]
    return max(terms) if terms else None


# ---------------------------------------------------------------------------
# Element counts of one block's tensors, per image
# ---------------------------------------------------------------------------


def _tensors(shape: BlockShape) -> dict[str, int]:
    """Elements of x, a, b, the block output, and x read at the projection's stride."""
    s, h, ho = shape.spec, shape.size, shape.out_size
    return {"x": s.w_in * h * h, "a": shape.w_b * h * h, "b": shape.w_b * ho * ho,
            "out": s.w_out * ho * ho, "x_strided": s.w_in * ho * ho}


def layer_macs(shape: BlockShape, layer: str) -> int:
    """Multiply-adds per image of one layer ("a", "b", "se", "c"; "c" includes the projection)."""
    s, h, ho, w_b = shape.spec, shape.size, shape.out_size, shape.w_b
    if layer == "a":
        return s.w_in * w_b * h * h
    if layer == "b":
        return 9 * w_b * w_b // shape.groups * ho * ho
    if layer == "se":
        return 2 * w_b * s.se_width + w_b + s.se_width  # two 1x1 convs with biases
    if layer == "c":
        return w_b * s.w_out * ho * ho + (s.w_in * s.w_out * ho * ho if shape.has_proj else 0)
    raise ValueError(f"unknown layer {layer!r}")


def layer_weight_bytes(shape: BlockShape, layer: str, elem: int) -> int:
    """Weight bytes a fused op reads: conv weights in ``elem`` bytes, BN as fp32 scale/shift,
    SE weights and biases in ``elem`` bytes."""
    s, w_b = shape.spec, shape.w_b
    if layer == "a":
        return s.w_in * w_b * elem + 8 * w_b
    if layer == "b":
        return 9 * w_b * w_b // shape.groups * elem + 8 * w_b
    if layer == "se":
        return (2 * w_b * s.se_width + w_b + s.se_width) * elem
    if layer == "c":
        proj = s.w_in * s.w_out * elem + 8 * s.w_out if shape.has_proj else 0
        return w_b * s.w_out * elem + 8 * s.w_out + proj
    raise ValueError(f"unknown layer {layer!r}")


def fused_layer_elements(shape: BlockShape, layer: str) -> int:
    """Activation elements one fused op reads + writes per image."""
    t = _tensors(shape)
    if layer == "a":
        return t["x"] + t["a"]
    if layer == "b":
        return t["a"] + t["b"]
    if layer == "se":
        return 0  # (N, C) vectors only
    if layer == "c":
        return t["b"] + (t["x_strided"] if shape.has_proj else t["x"]) + t["out"]
    raise ValueError(f"unknown layer {layer!r}")


def fused_layer_cost(shape: BlockShape, layer: str, batch: int, elem: int) -> Cost:
    """Bytes and FLOP one fused op call must move and do at a batch size."""
    return Cost(fused_layer_elements(shape, layer) * elem * batch
                + layer_weight_bytes(shape, layer, elem),
                2 * layer_macs(shape, layer) * batch, 1)


def fused_block_elements(shape: BlockShape) -> tuple[int, int]:
    """(activation elements read + written per image, launches) of a fused eval block."""
    layers = shape.layers()
    return sum(fused_layer_elements(shape, layer) for layer in layers), len(layers)


def eager_block_elements(shape: BlockShape) -> tuple[int, int]:
    """(activation elements read + written per image, launches) of an eager eval block."""
    t = _tensors(shape)
    a, b, out = t["a"], t["b"], t["out"]
    passes = [
        t["x"] + a, 2 * a, 2 * a,      # conv a, BN, ReLU
        a + b, 2 * b, 2 * b,           # conv b (strided), BN, ReLU
        b + out, 2 * out,              # conv c, BN
        3 * out, 2 * out,              # add (reads two, writes one), ReLU
    ]
    if shape.spec.se_width:
        passes += [b, 2 * b]           # pool (reads b), gate multiply (reads and writes b)
        passes += [0, 0, 0, 0]         # fc1, ReLU, fc2, sigmoid on (N, C) vectors
    if shape.has_proj:
        passes += [t["x_strided"] + out, 2 * out]  # projection conv, its BN
    return sum(passes), len(passes)


def block_cost(shape: BlockShape, batch: int, elem: int, fused: bool = True) -> Cost:
    """Bytes (activations + the block's weights) and FLOP of one block call."""
    elements, launches = (fused_block_elements if fused else eager_block_elements)(shape)
    layers = shape.layers()
    weights = sum(layer_weight_bytes(shape, layer, elem) for layer in layers)
    flops = 2 * sum(layer_macs(shape, layer) for layer in layers) * batch
    return Cost(elements * elem * batch + weights, flops, launches)


# ---------------------------------------------------------------------------
# Whole networks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTraffic:
    """Per-image eval traffic of a network under both schedules, and its weights and FLOP."""

    model: str
    resolution: int
    dtype: str
    eager_bytes: int     # activation bytes per image
    fused_bytes: int
    eager_launches: int  # per forward
    fused_launches: int
    weight_bytes: int    # per call (all batch sizes)
    flops: int           # per image

    def cost(self, batch: int, fused: bool = True) -> Cost:
        """What one forward at ``batch`` must move: activations + weights once."""
        per_image = self.fused_bytes if fused else self.eager_bytes
        return Cost(per_image * batch + self.weight_bytes, self.flops * batch,
                    self.fused_launches if fused else self.eager_launches)

    def floor_ms(self, bandwidth: float, flops: float, fused: bool = True) -> float:
        """Roofline floor per image (batch large enough that weights do not count)."""
        per_image = Cost(self.fused_bytes if fused else self.eager_bytes, self.flops)
        return 1e3 * roofline_floor_s(per_image, bandwidth, flops)


def model_traffic(model: str, resolution: int = 224, dtype: str = "bf16") -> ModelTraffic:
    """Activation bytes per image (eager vs fused), launches, weights and FLOP of a network."""
    elem = DTYPE_BYTES[dtype]
    params = resolve_params(model)
    size = stem_output_size(resolution)
    stem_in, stem_out = INPUT_CHANNELS * resolution ** 2, params.stem_width * size * size
    # Stem: fused = one conv_bn_act; eager = conv, BN, ReLU. Head: pool (reads the last
    # activation) and the classifier on a vector, the same in both schedules.
    last = block_shapes(params, resolution)[-1]
    head = last.spec.w_out * last.out_size ** 2
    eager, fused = stem_in + 5 * stem_out + head, stem_in + stem_out + head
    eager_launches, fused_launches = 3 + 2, 1 + 2
    for shape in block_shapes(params, resolution):
        e, e_launches = eager_block_elements(shape)
        f, f_launches = fused_block_elements(shape)
        eager += e * shape.count
        fused += f * shape.count
        eager_launches += e_launches * shape.count
        fused_launches += f_launches * shape.count
    counts = complexity(params, resolution)
    return ModelTraffic(model, resolution, dtype, eager * elem, fused * elem, eager_launches,
                        fused_launches, counts["params"] * elem, 2 * counts["flops"])
