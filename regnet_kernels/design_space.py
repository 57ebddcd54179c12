"""Design spaces: populations of networks to sample, restrict and compare.

Radosavovic et al., "Designing Network Design Spaces" (2020) compare *design spaces*, not
single models: sample n models from a space, train each with a short fixed regime, and compare
the spaces by the distribution of their errors (:mod:`regnet_kernels.design_analysis`). The
spaces of the paper, with its parameter ranges as defaults (every one can be overridden):

* ``anynetx_a``: 4 stages, each with its own depth d_i <= 16, width w_i <= 1024 (a multiple of
  8), bottleneck ratio b_i in {1, 2, 4} (bottleneck width w_i / b_i; here the ratio
  ``bottleneck_ratios`` = 1/b_i) and group width g_i in {1, 2, 4, 8, 16, 32}:
  (16 * 128 * 3 * 6)^4 ~ 1.8e18 configurations before the compatibility rule below.
* ``anynetx_b``: A with one b shared by all stages; ``anynetx_c``: B with one g shared;
  ``anynetx_d``: C with non-decreasing widths; ``anynetx_e``: D with non-decreasing depths.
* ``regnetx``: the quantized linear rule (:class:`~regnet_kernels.RegNetParams`) with
  d < 64, 8 <= w0 < 256, 0 < wa < 256, 1.5 <= wm <= 3 (wa and wm on a 0.01 grid, as the
  published models write them), b and g as in AnyNetX_E, and 4 stages.
  ``regnety`` is the same with SE blocks (se_ratio 0.25).

Sampling is uniform over a space's points. An AnyNet draw whose bottleneck width is not a
whole multiple of its group width is drawn again (pycls adjusts such a draw instead, which
would move it off the space's grid); a RegNet draw is adjusted by the RegNet rule itself, and
one that does not make exactly ``num_stages`` stages is drawn again. :meth:`DesignSpace.restrict`
adds a complexity regime (bands of flops, params and activations counted exactly as pycls does,
:func:`~regnet_kernels.complexity`), enforced by drawing again, as the paper samples its 400MF
populations.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from .complexity import complexity
from .design import AnyNetParams, DegenerateNetworkError, RegNetParams, WIDTH_QUANTUM

Network = Union[AnyNetParams, RegNetParams]

#: The paper's AnyNetX choices.
ANYNET_DEPTHS = tuple(range(1, 17))
ANYNET_WIDTHS = tuple(range(WIDTH_QUANTUM, 1025, WIDTH_QUANTUM))
#: Bottleneck width / stage width: the paper's b in {1, 2, 4} divides the width.
ANYNET_BOTTLENECK_RATIOS = (1.0, 0.5, 0.25)
ANYNET_GROUP_WIDTHS = (1, 2, 4, 8, 16, 32)
NUM_STAGES = 4
Y_SE_RATIO = 0.25
#: wa and wm are drawn on this grid (the published models give them to 2 decimals).
REGNET_GRID = 0.01
COMPLEXITY_KEYS = ("flops", "params", "acts")


def _band(name: str, band) -> Optional[tuple[float, float]]:
    if band is None:
        return None
    try:
        low, high = (float(v) for v in band)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {band!r}") from None
    if not (0 <= low <= high) or math.isnan(high):
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got {band!r}")
    return low, high


@dataclass(frozen=True)
class Regime:
    """A complexity regime: closed bands of flops (multiply-adds), params and activations
    (None: unbounded), counted at ``resolution`` with ``num_classes`` outputs."""

    flops: Optional[tuple[float, float]] = None
    params: Optional[tuple[float, float]] = None
    acts: Optional[tuple[float, float]] = None
    resolution: int = 224
    num_classes: int = 1000

    def __post_init__(self) -> None:
        for key in COMPLEXITY_KEYS:
            object.__setattr__(self, key, _band(key, getattr(self, key)))
        for key in ("resolution", "num_classes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")

    def admits(self, network: Network) -> bool:
        """Whether the network's complexity lies in every band."""
        counts = complexity(network, self.resolution, self.num_classes)
        return all(band is None or band[0] <= counts[key] <= band[1]
                   for key, band in ((k, getattr(self, k)) for k in COMPLEXITY_KEYS))


def _choices(name: str, values, check: Callable[[object], bool], what: str) -> tuple:
    """A sorted tuple of distinct allowed values; ValueError naming the parameter."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a collection of {what}, got {values!r}")
    values = tuple(sorted(set(values)))
    if not values or not all(check(v) for v in values):
        raise ValueError(f"{name} must be a non-empty collection of {what}, got {values!r}")
    return values


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _positive_real(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and 0 < v < math.inf


class DesignSpace:
    """A space of networks: :meth:`sample` a reproducible population, :meth:`contains`,
    :meth:`size`, :meth:`restrict` to a complexity regime, :meth:`build` a model."""

    name: str
    regime: Optional[Regime]

    def draw(self, rng: np.random.Generator) -> Optional[Network]:
        """One uniform draw from the space's grid; None when it is not a valid network."""
        raise NotImplementedError

    def contains(self, network: Network) -> bool:
        """Whether ``network`` is a point of the space (the regime is not checked)."""
        raise NotImplementedError

    def size(self) -> int:
        """How many points the space has (regime not counted)."""
        raise NotImplementedError

    def sample(self, n: int, seed: int = 0, max_draws: Optional[int] = None) -> list[Network]:
        """``n`` networks drawn uniformly from the space (and its regime), reproducibly:
        the same seed gives the same list, and a longer list starts with the shorter one.

        Raises RuntimeError when ``max_draws`` draws (default ``1000 * n``) did not give
        ``n`` accepted networks: a regime that the space hardly reaches.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = np.random.default_rng(seed)
        max_draws = 1000 * max(n, 1) if max_draws is None else max_draws
        found: list[Network] = []
        draws = 0
        while len(found) < n:
            if draws >= max_draws:
                why = (f"the regime {self.regime} is too narrow for this space's ranges (widen "
                       f"it or narrow the ranges)" if self.regime else
                       "the ranges hardly make valid networks")
                raise RuntimeError(f"{self.name}: {len(found)} of {n} networks in {max_draws} "
                                   f"draws; {why}")
            draws += 1
            network = self.draw(rng)
            if network is not None and (self.regime is None or self.regime.admits(network)):
                found.append(network)
        return found

    def restrict(self, *, flops=None, params=None, acts=None, resolution: int = 224,
                 num_classes: int = 1000) -> "DesignSpace":
        """The same space, sampled only within a complexity regime (see :class:`Regime`)."""
        regime = Regime(flops, params, acts, resolution, num_classes)
        return dataclasses.replace(self, regime=regime)

    def build(self, network: Network, fused: bool = True, num_classes: int = 1000,
              backend: str = "auto"):
        """The fused (default) or reference model of one of the space's networks."""
        from .models import reference_model
        from .models.fused import fused_model
        if fused:
            return fused_model(network, backend=backend, num_classes=num_classes)
        return reference_model(network, num_classes=num_classes)

    def settings(self) -> dict:
        """The space's definition as plain JSON values (written beside a population)."""
        return json_values(dataclasses.asdict(self))


def json_values(value):
    """Tuples to lists, recursively: the values as they read back from JSON."""
    if isinstance(value, dict):
        return {k: json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_values(v) for v in value]
    return value


def _count_sequences(weights: dict, length: int, non_decreasing: bool) -> int:
    """How many sequences of ``length`` keys (each key counted ``weights[key]`` times:
    its number of variants), with non-decreasing keys if asked. Exact integers."""
    if not non_decreasing:
        return sum(weights.values()) ** length
    keys = sorted(weights)
    ways = [weights[k] for k in keys]  # sequences of length 1 ending at each key
    for _ in range(length - 1):
        running, nxt = 0, []
        for key, count in zip(keys, ways):
            running += count
            nxt.append(running * weights[key])
        ways = nxt
    return sum(ways)


def _non_decreasing_draw(rng: np.random.Generator, values: tuple, length: int) -> list:
    """A uniform draw among the non-decreasing sequences of ``values`` (sorted): choose
    ``length`` distinct positions of ``len(values) + length - 1`` (stars and bars)."""
    positions = np.sort(rng.choice(len(values) + length - 1, size=length, replace=False))
    return [values[int(p) - i] for i, p in enumerate(positions)]


@dataclass(frozen=True)
class AnyNetSpace(DesignSpace):
    """AnyNet: ``num_stages`` stages, each with its own depth, width, bottleneck ratio and
    group width from the given choices; the flags are the paper's refinements B-E."""

    name: str = "anynetx_a"
    depths: tuple = ANYNET_DEPTHS
    widths: tuple = ANYNET_WIDTHS
    bottleneck_ratios: tuple = ANYNET_BOTTLENECK_RATIOS
    group_widths: tuple = ANYNET_GROUP_WIDTHS
    shared_bottleneck_ratio: bool = False
    shared_group_width: bool = False
    non_decreasing_widths: bool = False
    non_decreasing_depths: bool = False
    num_stages: int = NUM_STAGES
    se_ratio: float = 0.0
    stem_width: int = 32
    regime: Optional[Regime] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", _choices("depths", self.depths, _positive_int,
                                                    "positive integers"))
        object.__setattr__(self, "widths", _choices("widths", self.widths, _positive_int,
                                                    "positive integers"))
        object.__setattr__(self, "bottleneck_ratios", _choices(
            "bottleneck_ratios", self.bottleneck_ratios, _positive_real, "positive numbers"))
        object.__setattr__(self, "group_widths", _choices(
            "group_widths", self.group_widths, _positive_int, "positive integers"))
        if not _positive_int(self.num_stages):
            raise ValueError(f"num_stages must be a positive integer, got {self.num_stages!r}")

    def draw(self, rng: np.random.Generator) -> Optional[AnyNetParams]:
        k = self.num_stages

        def per_stage(values: tuple, shared: bool, non_decreasing: bool = False) -> list:
            if shared:
                return [values[int(rng.integers(len(values)))]] * k
            if non_decreasing:
                return _non_decreasing_draw(rng, values, k)
            return [values[int(i)] for i in rng.integers(len(values), size=k)]

        depths = per_stage(self.depths, False, self.non_decreasing_depths)
        widths = per_stage(self.widths, False, self.non_decreasing_widths)
        ratios = per_stage(self.bottleneck_ratios, self.shared_bottleneck_ratio)
        groups = per_stage(self.group_widths, self.shared_group_width)
        try:
            return AnyNetParams(depths, widths, ratios, groups, self.se_ratio, self.stem_width)
        except DegenerateNetworkError:
            return None

    def contains(self, network: Network) -> bool:
        if not isinstance(network, AnyNetParams) or len(network.depths) != self.num_stages:
            return False
        if network.se_ratio != self.se_ratio or network.stem_width != self.stem_width:
            return False
        ratios = [min(self.bottleneck_ratios, key=lambda b: abs(b - r))
                  for r in network.bottleneck_ratios]
        return (
            all(d in self.depths for d in network.depths)
            and all(w in self.widths for w in network.widths)
            and all(math.isclose(r, b) for r, b in zip(network.bottleneck_ratios, ratios))
            and all(g in self.group_widths for g in network.group_widths)
            and (not self.shared_bottleneck_ratio or len(set(ratios)) == 1)
            and (not self.shared_group_width or len(set(network.group_widths)) == 1)
            and (not self.non_decreasing_widths or list(network.widths) == sorted(network.widths))
            and (not self.non_decreasing_depths or list(network.depths) == sorted(network.depths))
        )

    def _stage_variants(self, ratios: tuple, groups: tuple) -> dict:
        """width -> how many (ratio, group width) pairs make a valid stage of that width."""
        variants = {}
        for w in self.widths:
            count = sum(1 for b in ratios for g in groups
                        if abs(w * b - round(w * b)) <= 1e-9 and round(w * b) >= 1
                        and round(w * b) % g == 0)
            if count:
                variants[w] = count
        return variants

    def size(self) -> int:
        """Points of the space: configurations whose every stage can be grouped (so fewer
        than the paper's (16 * 128 * 3 * 6)^4 for AnyNetX_A, which counts them all)."""
        k = self.num_stages
        n_depths = len(self.depths)
        depth_sequences = (math.comb(n_depths + k - 1, k) if self.non_decreasing_depths
                           else n_depths ** k)
        shared_ratios = ([(b,) for b in self.bottleneck_ratios]
                         if self.shared_bottleneck_ratio else [self.bottleneck_ratios])
        shared_groups = ([(g,) for g in self.group_widths]
                         if self.shared_group_width else [self.group_widths])
        stage_sequences = sum(
            _count_sequences(self._stage_variants(ratios, groups), k, self.non_decreasing_widths)
            for ratios in shared_ratios for groups in shared_groups)
        return depth_sequences * stage_sequences


def _grid_points(low: float, high: float, step: float, open_low: bool, open_high: bool):
    """Integer multiples of step (as integers) in the interval; exact at the ends."""
    first = math.ceil(round(low / step, 6))
    last = math.floor(round(high / step, 6))
    if open_low and math.isclose(first * step, low):
        first += 1
    if open_high and math.isclose(last * step, high):
        last -= 1
    return first, last


def _on_grid(value: float, step: float) -> bool:
    return math.isclose(value / step, round(value / step), abs_tol=1e-6)


@dataclass(frozen=True)
class RegNetSpace(DesignSpace):
    """RegNet: (d, w0, wa, wm, b, g) through the quantized linear rule (pycls rounding).

    Ranges: depth and w0 are closed integer ranges (w0 in multiples of 8); ``wa_range`` is
    open at both ends and ``wm_range`` closed (the paper's 0 < wa < 256, 1.5 <= wm <= 3),
    both on a ``grid`` of 0.01. ``num_stages``: draws making another number of stages are
    drawn again (None accepts any).
    """

    name: str = "regnetx"
    depth_range: tuple = (1, 63)
    w0_range: tuple = (8, 248)
    wa_range: tuple = (0.0, 256.0)
    wm_range: tuple = (1.5, 3.0)
    bottleneck_ratios: tuple = ANYNET_BOTTLENECK_RATIOS
    group_widths: tuple = ANYNET_GROUP_WIDTHS
    num_stages: Optional[int] = NUM_STAGES
    se_ratio: float = 0.0
    stem_width: int = 32
    grid: float = REGNET_GRID
    regime: Optional[Regime] = None

    def __post_init__(self) -> None:
        for name in ("depth_range", "w0_range"):
            low, high = getattr(self, name)
            if not (_positive_int(low) and _positive_int(high) and low <= high):
                raise ValueError(f"{name} must be (low, high) positive integers with low <= high, "
                                 f"got {getattr(self, name)!r}")
        if self.w0_range[1] < WIDTH_QUANTUM or self.w0_range[0] > self.w0_range[1] // 8 * 8:
            raise ValueError(f"w0_range {self.w0_range} holds no multiple of {WIDTH_QUANTUM}")
        if not (_positive_real(self.grid)):
            raise ValueError(f"grid must be a positive number, got {self.grid!r}")
        wa_low, wa_high = _band("wa_range", self.wa_range)
        wm_low, wm_high = _band("wm_range", self.wm_range)
        if wm_low <= 1:
            raise ValueError(f"wm_range must lie above 1 (wm > 1), got {self.wm_range!r}")
        if self._wa_steps()[0] > self._wa_steps()[1] or \
                self._wm_steps()[0] > self._wm_steps()[1]:
            raise ValueError(f"wa_range {self.wa_range} or wm_range {self.wm_range} holds no "
                             f"point of the grid {self.grid}")
        object.__setattr__(self, "bottleneck_ratios", _choices(
            "bottleneck_ratios", self.bottleneck_ratios, _positive_real, "positive numbers"))
        object.__setattr__(self, "group_widths", _choices(
            "group_widths", self.group_widths, _positive_int, "positive integers"))
        if self.num_stages is not None and not _positive_int(self.num_stages):
            raise ValueError(f"num_stages must be a positive integer or None, "
                             f"got {self.num_stages!r}")

    def _wa_steps(self) -> tuple[int, int]:
        return _grid_points(*self.wa_range, self.grid, open_low=True, open_high=True)

    def _wm_steps(self) -> tuple[int, int]:
        return _grid_points(*self.wm_range, self.grid, open_low=False, open_high=False)

    def _w0_choices(self) -> tuple[int, int]:
        low = -(-self.w0_range[0] // WIDTH_QUANTUM)
        return low, self.w0_range[1] // WIDTH_QUANTUM

    def draw(self, rng: np.random.Generator) -> Optional[RegNetParams]:
        wa_first, wa_last = self._wa_steps()
        wm_first, wm_last = self._wm_steps()
        w0_first, w0_last = self._w0_choices()
        fields = dict(
            depth=int(rng.integers(self.depth_range[0], self.depth_range[1] + 1)),
            w0=WIDTH_QUANTUM * int(rng.integers(w0_first, w0_last + 1)),
            # round(): the grid value as the published models write it (24.48, not 24.4800001)
            wa=round(int(rng.integers(wa_first, wa_last + 1)) * self.grid, 10),
            wm=round(int(rng.integers(wm_first, wm_last + 1)) * self.grid, 10),
            group_width=self.group_widths[int(rng.integers(len(self.group_widths)))],
            bottleneck_ratio=self.bottleneck_ratios[int(rng.integers(len(self.bottleneck_ratios)))],
            se_ratio=self.se_ratio,
            stem_width=self.stem_width,
        )
        try:
            network = RegNetParams(**fields)
        except DegenerateNetworkError:
            return None
        if self.num_stages is not None and len(network.stages()) != self.num_stages:
            return None
        return network

    def contains(self, network: Network) -> bool:
        if not isinstance(network, RegNetParams) or network.rounding != "pycls":
            return False
        if network.se_ratio != self.se_ratio or network.stem_width != self.stem_width:
            return False
        wa_first, wa_last = self._wa_steps()
        wm_first, wm_last = self._wm_steps()
        return (
            self.depth_range[0] <= network.depth <= self.depth_range[1]
            and self.w0_range[0] <= network.w0 <= self.w0_range[1]
            and network.w0 % WIDTH_QUANTUM == 0
            and _on_grid(network.wa, self.grid)
            and wa_first <= round(network.wa / self.grid) <= wa_last
            and _on_grid(network.wm, self.grid)
            and wm_first <= round(network.wm / self.grid) <= wm_last
            and any(math.isclose(network.bottleneck_ratio, b) for b in self.bottleneck_ratios)
            and network.group_width in self.group_widths
            and (self.num_stages is None or len(network.stages()) == self.num_stages)
        )

    def size(self) -> int:
        """Points of the parameter grid: every (d, w0, wa, wm, b, g), before the stage-count
        rule and the rejection of degenerate draws (many points generate the same network)."""
        wa_first, wa_last = self._wa_steps()
        wm_first, wm_last = self._wm_steps()
        w0_first, w0_last = self._w0_choices()
        return ((self.depth_range[1] - self.depth_range[0] + 1) * (w0_last - w0_first + 1)
                * (wa_last - wa_first + 1) * (wm_last - wm_first + 1)
                * len(self.bottleneck_ratios) * len(self.group_widths))


_SPACES: dict[str, Callable[..., DesignSpace]] = {
    "anynetx_a": lambda **kw: AnyNetSpace(name="anynetx_a", **kw),
    "anynetx_b": lambda **kw: AnyNetSpace(name="anynetx_b", shared_bottleneck_ratio=True, **kw),
    "anynetx_c": lambda **kw: AnyNetSpace(name="anynetx_c", shared_bottleneck_ratio=True,
                                          shared_group_width=True, **kw),
    "anynetx_d": lambda **kw: AnyNetSpace(name="anynetx_d", shared_bottleneck_ratio=True,
                                          shared_group_width=True, non_decreasing_widths=True,
                                          **kw),
    "anynetx_e": lambda **kw: AnyNetSpace(name="anynetx_e", shared_bottleneck_ratio=True,
                                          shared_group_width=True, non_decreasing_widths=True,
                                          non_decreasing_depths=True, **kw),
    "regnetx": lambda **kw: RegNetSpace(name="regnetx", **kw),
    "regnety": lambda **kw: RegNetSpace(name="regnety", **{"se_ratio": Y_SE_RATIO, **kw}),
}

#: The names :func:`design_space` knows.
SPACE_NAMES = tuple(_SPACES)


def design_space(name: str, **overrides) -> DesignSpace:
    """The paper's space called ``name`` (:data:`SPACE_NAMES`), with any field overridden,
    e.g. ``design_space("anynetx_a", depths=range(1, 5), widths=range(8, 129, 8))``."""
    if name not in _SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACE_NAMES)}, got {name!r}")
    try:
        return _SPACES[name](**overrides)
    except TypeError as error:  # an unknown or repeated field
        raise ValueError(f"space {name}: {error}") from None


__all__ = ["AnyNetSpace", "DesignSpace", "Network", "Regime", "RegNetSpace", "SPACE_NAMES",
           "design_space"]
