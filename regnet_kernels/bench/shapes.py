"""The layer shapes a benchmark level runs: every distinct (stage, block kind) of a model.

Within a stage, block 0 strides, has the projection shortcut and an SE width taken from the
stage input; blocks 1.. are all alike (stride 1, identity shortcut). So a stage has at most two
distinct block shapes, "first" and "rest", and every fused op of the network runs at one of
their shapes (plus the stem's conv).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..complexity import conv_output_size
from ..design import BlockSpec, RegNetParams
from ..zoo import resolve_params

#: The fused ops of an eval block, in launch order, by the name of the layer they compute.
BLOCK_OPS = {"a": "conv_bn_act", "b": "conv_bn_act", "se": "se_excite",
             "c": "conv1x1_gate_residual"}


@dataclass(frozen=True)
class BlockShape:
    """One distinct block of a model: its spec, bottleneck width and input size (H = W)."""

    model: str
    kind: str  # "first" (block 0 of its stage) or "rest"
    spec: BlockSpec
    w_b: int
    size: int
    count: int  # how many blocks of the network have this shape

    @property
    def name(self) -> str:
        return f"s{self.spec.stage_index + 1}.{self.kind}"

    @property
    def out_size(self) -> int:
        return conv_output_size(self.size, self.spec.stride)

    @property
    def groups(self) -> int:
        return self.w_b // self.spec.group_width

    @property
    def has_proj(self) -> bool:
        return self.spec.w_in != self.spec.w_out or self.spec.stride != 1

    def layers(self) -> list[str]:
        """The layers with a fused op: a, b, se (Y blocks only), c."""
        return [name for name in BLOCK_OPS if name != "se" or self.spec.se_width]


def stem_output_size(resolution: int) -> int:
    return conv_output_size(resolution, 2)


def block_shapes(model: str | RegNetParams, resolution: int = 224) -> list[BlockShape]:
    """The distinct block shapes of a model, stage by stage ("first", then "rest")."""
    params = resolve_params(model)
    name = model if isinstance(model, str) else "custom"
    size = stem_output_size(resolution)
    shapes = []
    for stage in params.stages():
        blocks = list(stage.blocks())
        shapes.append(BlockShape(name, "first", blocks[0], stage.bottleneck_width, size, 1))
        size = conv_output_size(size, stage.stride)
        if len(blocks) > 1:
            shapes.append(BlockShape(name, "rest", blocks[1], stage.bottleneck_width, size,
                                     len(blocks) - 1))
    return shapes


def representative_blocks(model: str | RegNetParams, resolution: int = 224
                          ) -> dict[str, BlockShape]:
    """One Y block and one X block of the same widths, for the block level.

    The model's most frequent block shape (the deep stage's identity block), with SE (Y,
    se_ratio 0.25 of its input width) and without (X), so the two differ only by the SE.
    """
    common = max(block_shapes(model, resolution), key=lambda s: s.count)
    w_in = common.spec.w_in
    y = common.spec._replace(se_width=common.spec.se_width or max(1, round(w_in * 0.25)))
    x = common.spec._replace(se_width=0)
    return {"Y": BlockShape(common.model, common.kind, y, common.w_b, common.size, 1),
            "X": BlockShape(common.model, common.kind, x, common.w_b, common.size, 1)}
