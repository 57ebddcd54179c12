"""The RegNet design space: a handful of numbers that generate a whole network.

A RegNet is described by depth ``d``, initial width ``w0``, slope ``wa``, width multiplier
``wm``, group width ``g``, bottleneck ratio ``b`` and SE ratio. The quantized linear rule
(Radosavovic et al., "Designing Network Design Spaces", 2020) turns them into per-block widths,
which are grouped into stages. :class:`RegNetParams` holds the numbers and generates the stages
(:meth:`RegNetParams.stages`) and blocks (:meth:`RegNetParams.blocks`) that the model builder,
the complexity counter and the CLI all read.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

#: Block widths are quantized to multiples of this.
WIDTH_QUANTUM = 8
#: The first block of every stage halves the resolution.
STAGE_STRIDE = 2
#: The two width/group compatibility rules: "pycls" (paper, pycls, timm) and "torchvision".
ROUNDING_RULES = ("pycls", "torchvision")


class DegenerateNetworkError(ValueError):
    """Valid-looking parameters that generate an unbuildable network (e.g. an SE width of 0)."""


class BlockSpec(NamedTuple):
    """One residual bottleneck block: everything needed to build it.

    ``stage_index`` and ``block_index`` count from 0; torchvision's module names count stages
    from 1 (``trunk_output.block{stage_index + 1}.block{stage_index + 1}-{block_index}``).
    """

    stage_index: int
    block_index: int
    w_in: int
    w_out: int
    stride: int
    group_width: int
    se_width: int


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``depth`` blocks of output width ``width``; the first one strides.

    ``group_width`` is the stage's (possibly adjusted) group width, so the grouped 3x3 conv
    has ``groups = bottleneck_width // group_width`` groups. ``index`` counts from 0 (the CLI
    and error messages count stages from 1, as torchvision's names do).
    """

    index: int
    w_in: int
    width: int
    depth: int
    stride: int
    bottleneck_width: int
    group_width: int
    se_ratio: float
    bottleneck_ratio: float = 1.0

    @property
    def groups(self) -> int:
        return self.bottleneck_width // self.group_width

    def block_w_in(self, block_index: int) -> int:
        """Input width of a block: the stage input for block 0, the stage width after."""
        return self.w_in if block_index == 0 else self.width

    def se_width(self, block_index: int) -> int:
        """SE squeeze width of a block, 0 without SE.

        It is taken from the block's INPUT width, so block 0 of a stage differs from the rest.
        """
        return round(self.block_w_in(block_index) * self.se_ratio)

    def blocks(self) -> Iterator[BlockSpec]:
        """The stage's blocks, in order."""
        for b in range(self.depth):
            yield BlockSpec(
                stage_index=self.index,
                block_index=b,
                w_in=self.block_w_in(b),
                w_out=self.width,
                stride=self.stride if b == 0 else 1,
                group_width=self.group_width,
                se_width=self.se_width(b),
            )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RegNetParams:
    """The parameters of one RegNet; generates its stages and blocks.

    Args:
        depth: number of blocks ``d`` (>= 1).
        w0: initial width, a positive multiple of 8.
        wa: width slope (>= 0).
        wm: width multiplier between stages (> 1).
        group_width: channels per group of the 3x3 conv (>= 1).
        bottleneck_ratio: bottleneck width / block width (> 0; 1.0 in every standard model).
        se_ratio: SE squeeze width / block input width, 0 for no SE (RegNetX), 0.25 for RegNetY.
        rounding: width/group compatibility rule, "pycls" (the paper's networks) or
            "torchvision" (torchvision's builders; differs for X-400MF, Y-800MF and Y-8GF).
        stem_width: output channels of the stem conv.

    Invalid values raise ``ValueError`` naming the field; values that generate an unbuildable
    network raise its subclass :class:`DegenerateNetworkError`.
    """

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int
    bottleneck_ratio: float = 1.0
    se_ratio: float = 0.0
    rounding: str = "pycls"
    stem_width: int = 32

    def __post_init__(self) -> None:
        # Normalize numpy scalars to Python numbers so reprs and hashes stay plain.
        normalized = {
            "depth": _check_int("depth", self.depth, 1),
            "w0": _check_int("w0", self.w0, WIDTH_QUANTUM),
            "wa": _check_real("wa", self.wa),
            "wm": _check_real("wm", self.wm),
            "group_width": _check_int("group_width", self.group_width, 1),
            "bottleneck_ratio": _check_real("bottleneck_ratio", self.bottleneck_ratio),
            "se_ratio": _check_real("se_ratio", self.se_ratio),
            "stem_width": _check_int("stem_width", self.stem_width, 1),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)
        if self.w0 % WIDTH_QUANTUM:
            raise ValueError(f"w0 must be a positive multiple of {WIDTH_QUANTUM}, got {self.w0}")
        if self.wa < 0:
            raise ValueError(f"wa must be >= 0, got {self.wa}")
        if self.wm <= 1:
            raise ValueError(f"wm must be > 1, got {self.wm}")
        if self.bottleneck_ratio <= 0:
            raise ValueError(f"bottleneck_ratio must be > 0, got {self.bottleneck_ratio}")
        if not 0 <= self.se_ratio < 1:
            raise ValueError(f"se_ratio must be in [0, 1), got {self.se_ratio}")
        if self.rounding not in ROUNDING_RULES:
            raise ValueError(f"rounding must be one of {ROUNDING_RULES}, got {self.rounding!r}")
        self.stages()  # raises for bottleneck ratios that cannot be grouped

    def block_widths(self) -> list[int]:
        """The quantized width of every block (length ``depth``), before group adjustment."""
        linear_widths = self.w0 + self.wa * np.arange(self.depth)
        # Which power of wm each block sits at; np.round rounds half to even, as pycls does.
        exponents = np.round(np.log(linear_widths / self.w0) / np.log(self.wm))
        widths = np.round(self.w0 * np.power(self.wm, exponents) / WIDTH_QUANTUM) * WIDTH_QUANTUM
        return [int(w) for w in widths]

    def stages(self) -> tuple[StageSpec, ...]:
        """The stages, in order: distinct block widths, adjusted for group compatibility."""
        widths, depths = np.unique(self.block_widths(), return_counts=True)
        stages = []
        w_in = self.stem_width
        for index, (width, depth) in enumerate(zip(widths.tolist(), depths.tolist())):
            width, group_width = self._fit_groups(width)
            bottleneck_width = round(width * self.bottleneck_ratio)
            if bottleneck_width < 1 or bottleneck_width % group_width:
                raise DegenerateNetworkError(
                    f"bottleneck_ratio={self.bottleneck_ratio} gives stage {index + 1} a "
                    f"bottleneck width {bottleneck_width} that group_width {group_width} does not "
                    f"divide"
                )
            if self.se_ratio and round(min(w_in, width) * self.se_ratio) < 1:
                raise DegenerateNetworkError(
                    f"se_ratio={self.se_ratio} gives stage {index + 1} an SE width of 0"
                )
            stages.append(
                StageSpec(
                    index=index,
                    w_in=w_in,
                    width=width,
                    depth=depth,
                    stride=STAGE_STRIDE,
                    bottleneck_width=bottleneck_width,
                    group_width=group_width,
                    se_ratio=self.se_ratio,
                    bottleneck_ratio=self.bottleneck_ratio,
                )
            )
            w_in = width
        return tuple(stages)

    def blocks(self) -> Iterator[BlockSpec]:
        """Every block of the network, stage by stage."""
        for stage in self.stages():
            yield from stage.blocks()

    def _fit_groups(self, width: int) -> tuple[int, int]:
        """Adjust a stage width so that its bottleneck width is a multiple of the group width.

        Returns (stage width, group width); the group width shrinks to the bottleneck width
        when it is wider.
        """
        b = self.bottleneck_ratio
        bottleneck = max(1, int(width * b))
        group_width = min(self.group_width, bottleneck)
        if self.rounding == "pycls":
            # pycls also keeps v / b integral for integer ratios b > 1.
            multiple = math.lcm(group_width, int(b)) if b > 1 and b == int(b) else group_width
            bottleneck = max(multiple, round(bottleneck / multiple) * multiple)
        else:
            # torchvision's _make_divisible: round half up, never drop more than 10%.
            half_up = int(bottleneck + group_width / 2) // group_width * group_width
            rounded = max(group_width, half_up)
            bottleneck = rounded + group_width if rounded < 0.9 * bottleneck else rounded
        return int(bottleneck / b), group_width


def _check_stage_values(name: str, values: object, check) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
        raise ValueError(f"{name} must be a non-empty sequence (one value per stage), "
                         f"got {values!r}")
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(values))


@dataclass(frozen=True)
class AnyNetParams:
    """The parameters of one AnyNet (the paper's AnyNetX/AnyNetY): every stage has its own
    depth, width, bottleneck ratio and group width; generates stages and blocks as
    :class:`RegNetParams` does, so the model builders and the complexity counter take it.

    Args:
        depths: blocks per stage (>= 1 each).
        widths: output width of each stage (>= 1 each).
        bottleneck_ratios: bottleneck width / stage width of each stage (the paper's
            b_i in {1, 2, 4} divides the width: ratios 1, 1/2, 1/4).
        group_widths: channels per group of each stage's 3x3 conv.
        se_ratio: SE squeeze width / block input width, 0 for no SE.
        stem_width: output channels of the stem conv.

    Unlike :class:`RegNetParams`, nothing is adjusted: each stage's bottleneck width
    ``width * ratio`` must be an integer that its group width divides, or
    :class:`DegenerateNetworkError` is raised. Other invalid values raise ``ValueError``
    naming the field.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    bottleneck_ratios: tuple[float, ...]
    group_widths: tuple[int, ...]
    se_ratio: float = 0.0
    stem_width: int = 32

    def __post_init__(self) -> None:
        normalized = {
            "depths": _check_stage_values("depths", self.depths, lambda n, v: _check_int(n, v, 1)),
            "widths": _check_stage_values("widths", self.widths, lambda n, v: _check_int(n, v, 1)),
            "bottleneck_ratios": _check_stage_values("bottleneck_ratios",
                                                     self.bottleneck_ratios, _check_real),
            "group_widths": _check_stage_values("group_widths", self.group_widths,
                                                lambda n, v: _check_int(n, v, 1)),
            "se_ratio": _check_real("se_ratio", self.se_ratio),
            "stem_width": _check_int("stem_width", self.stem_width, 1),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)
        num_stages = len(self.depths)
        for name in ("widths", "bottleneck_ratios", "group_widths"):
            if len(getattr(self, name)) != num_stages:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for "
                                 f"{num_stages} stages (len(depths))")
        if any(b <= 0 for b in self.bottleneck_ratios):
            raise ValueError(f"bottleneck_ratios must be > 0, got {self.bottleneck_ratios}")
        if not 0 <= self.se_ratio < 1:
            raise ValueError(f"se_ratio must be in [0, 1), got {self.se_ratio}")
        self.stages()  # raises for stages that cannot be grouped

    @property
    def depth(self) -> int:
        """Total number of blocks."""
        return sum(self.depths)

    def stages(self) -> tuple[StageSpec, ...]:
        """The stages, in order, exactly as given."""
        stages = []
        w_in = self.stem_width
        for index, (depth, width, ratio, group_width) in enumerate(zip(
                self.depths, self.widths, self.bottleneck_ratios, self.group_widths)):
            bottleneck_width = round(width * ratio)
            # A tolerance, not equality: width * 0.25 is exact, width * (1/3) is not.
            if (bottleneck_width < 1 or abs(width * ratio - bottleneck_width) > 1e-9
                    or bottleneck_width % group_width):
                raise DegenerateNetworkError(
                    f"stage {index + 1}: width {width} x bottleneck ratio {ratio} is not a "
                    f"whole bottleneck width that group width {group_width} divides"
                )
            if self.se_ratio and round(min(w_in, width) * self.se_ratio) < 1:
                raise DegenerateNetworkError(
                    f"se_ratio={self.se_ratio} gives stage {index + 1} an SE width of 0"
                )
            stages.append(StageSpec(
                index=index, w_in=w_in, width=width, depth=depth, stride=STAGE_STRIDE,
                bottleneck_width=bottleneck_width, group_width=group_width,
                se_ratio=self.se_ratio, bottleneck_ratio=ratio,
            ))
            w_in = width
        return tuple(stages)

    def blocks(self) -> Iterator[BlockSpec]:
        """Every block of the network, stage by stage."""
        for stage in self.stages():
            yield from stage.blocks()


def params_from_dict(fields: dict) -> RegNetParams | AnyNetParams:
    """:class:`RegNetParams` or :class:`AnyNetParams` from its fields (as
    ``dataclasses.asdict`` or JSON gives them): AnyNetParams when there is a ``depths``."""
    if not isinstance(fields, dict):
        raise TypeError(f"network parameters must be a dict of fields, got {fields!r}")
    return AnyNetParams(**fields) if "depths" in fields else RegNetParams(**fields)


#: Group widths sampled by :func:`sample_params` (those of the paper's design space and beyond).
SAMPLED_GROUP_WIDTHS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def sample_params(
    rng: np.random.Generator | int | None = None,
    *,
    se_ratio: float = 0.0,
    rounding: str = "pycls",
    num_stages: int | None = 4,
    max_tries: int = 1000,
) -> RegNetParams:
    """Draw random valid parameters from the RegNet design space, as the paper samples it.

    Ranges: depth uniform in [12, 28], w0 uniform in {8, 16, ..., 256}, wa log-uniform in
    [8, 256], wm log-uniform in [1.5, 3] (wa and wm rounded to 2 decimals like the published
    configurations), group width from :data:`SAMPLED_GROUP_WIDTHS`, bottleneck ratio 1.

    The paper's networks have exactly 4 stages; a draw that generates a different number of
    stages (``num_stages``; None accepts any), or that is degenerate (an SE width of 0), is
    rejected and drawn again, up to ``max_tries`` times.

    Args:
        rng: a numpy Generator, or a seed for one.
        se_ratio: 0 for X-style blocks, e.g. 0.25 for Y-style blocks with SE.
        rounding: the width/group compatibility rule of the result.
    """
    rng = np.random.default_rng(rng)
    reason = "none"
    for _ in range(max_tries):
        draw = dict(
            depth=int(rng.integers(12, 29)),
            w0=8 * int(rng.integers(1, 33)),
            wa=round(float(np.exp(rng.uniform(np.log(8), np.log(256)))), 2),
            wm=round(float(np.exp(rng.uniform(np.log(1.5), np.log(3)))), 2),
            group_width=int(rng.choice(SAMPLED_GROUP_WIDTHS)),
            se_ratio=se_ratio,
            rounding=rounding,
        )
        try:
            params = RegNetParams(**draw)
        except DegenerateNetworkError as error:
            reason = str(error)
            continue
        if num_stages is None or len(params.stages()) == num_stages:
            return params
        reason = f"{len(params.stages())} stages"
    raise RuntimeError(
        f"no valid {num_stages}-stage network in {max_tries} draws (last rejection: {reason})"
    )
