"""Comparing design spaces by their populations' errors (Radosavovic et al. 2019, 2020).

* :func:`error_edf`: the error empirical distribution function F(e) = (1/n) sum_i 1[e_i < e],
  the share of a population with error below e; optionally weighted.
* :func:`complexity_weights`: the paper's normalization. Populations sampled from different
  spaces have different complexity distributions, and complexity alone moves error; each model
  gets a weight such that every complexity bin (log-spaced bins shared by the populations
  compared) carries the same total weight, and the weighted EDF is the *normalized* EDF.
* :func:`ks_distance`: the Kolmogorov-Smirnov distance sup_e |F_1(e) - F_2(e)| between two
  (weighted) EDFs; :func:`ks_bootstrap` adds a percentile bootstrap interval.
* :func:`fit_quantized_linear`: the fit of the quantized linear rule (w0, wa, wm) to a network's
  per-block widths by grid search, scored by the paper's e_fit (the mean absolute log ratio
  of fitted to observed widths).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .design import WIDTH_QUANTUM


def _values(name: str, values, allow_empty: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (array.size == 0 and not allow_empty):
        raise ValueError(f"{name} must be a non-empty 1-d sequence of numbers, "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers")
    return array


def _weights(name: str, weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = _values(name, weights)
    if w.size != n or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{name} must be {n} non-negative numbers with a positive sum")
    return w / w.sum()


def error_edf(errors, at, weights=None) -> np.ndarray:
    """F(e) = sum_i w_i 1[e_i < e] at each threshold e of ``at`` (w_i = 1/n by default; else
    the given weights, normalized to sum 1)."""
    errors = _values("errors", errors)
    at = np.atleast_1d(_values("at", np.atleast_1d(at)))
    w = _weights("weights", weights, errors.size)
    order = np.argsort(errors, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(w[order])])
    cumulative /= cumulative[-1]  # exactly 1 above every error, whatever the rounding
    # how many errors lie strictly below each threshold
    below = np.searchsorted(errors[order], at, side="left")
    return cumulative[below]


def complexity_bin_edges(complexities: Sequence, num_bins: int) -> np.ndarray:
    """``num_bins`` log-spaced bins spanning all the given complexities (pass the union of
    the populations compared, so that they share the bins)."""
    c = _values("complexities", complexities)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    if np.any(c <= 0):
        raise ValueError("complexities must be positive")
    low, high = c.min(), c.max()
    if low == high:
        return np.array([low, high])
    return np.geomspace(low, high, num_bins + 1)


def complexity_weights(complexities, bin_edges) -> np.ndarray:
    """Weights (summing to 1) giving every occupied complexity bin the same total weight:
    1 / (occupied bins x models in the model's bin). Bins are half-open, the last closed."""
    c = _values("complexities", complexities)
    edges = _values("bin_edges", bin_edges)
    if edges.size < 2 or np.any(np.diff(edges) < 0):
        raise ValueError("bin_edges must be at least 2 non-decreasing numbers")
    if c.min() < edges[0] or c.max() > edges[-1]:
        raise ValueError(f"complexities span [{c.min():g}, {c.max():g}], outside the bins "
                         f"[{edges[0]:g}, {edges[-1]:g}]")
    bins = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, edges.size - 2)
    occupied, counts = np.unique(bins, return_counts=True)
    per_bin = dict(zip(occupied.tolist(), counts.tolist()))
    return np.array([1.0 / (len(occupied) * per_bin[b]) for b in bins.tolist()])


def ks_distance(errors_a, errors_b, weights_a=None, weights_b=None) -> float:
    """sup_e |F_a(e) - F_b(e)| of the two (weighted) error EDFs. Both are step functions
    that change only just after a sample, so the sup is attained just after one."""
    a, b = _values("errors_a", errors_a), _values("errors_b", errors_b)
    pooled = np.unique(np.concatenate([a, b]))
    # just after each pooled value: F(v+) = share of errors <= v
    after = np.nextafter(pooled, np.inf)
    gap = error_edf(a, after, weights_a) - error_edf(b, after, weights_b)
    return float(np.max(np.abs(gap)))


class KSResult(NamedTuple):
    """The KS distance of two populations and a bootstrap interval for it."""

    distance: float
    low: float
    high: float
    confidence: float
    resamples: int


def ks_bootstrap(errors_a, errors_b, weights_a=None, weights_b=None, resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> KSResult:
    """KS distance with a percentile bootstrap interval: both populations resampled with
    replacement (their weights travel with the models), ``resamples`` times.

    The bootstrap distribution of a distance is biased upwards (resampling adds noise, and
    noise only makes EDFs differ more), so the interval is a measure of spread, not an
    unbiased confidence interval for a small distance.
    """
    a, b = _values("errors_a", errors_a), _values("errors_b", errors_b)
    wa, wb = _weights("weights_a", weights_a, a.size), _weights("weights_b", weights_b, b.size)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    distances = np.empty(resamples)
    for r in range(resamples):
        ia = rng.integers(a.size, size=a.size)
        ib = rng.integers(b.size, size=b.size)
        distances[r] = ks_distance(a[ia], b[ib], wa[ia], wb[ib])
    tail = (1 - confidence) / 2
    low, high = np.quantile(distances, [tail, 1 - tail])
    return KSResult(ks_distance(a, b, wa, wb), float(low), float(high), confidence, resamples)


class QuantizedLinearFit(NamedTuple):
    """The best (w0, wa, wm) for a network's per-block widths, and how well it fits.

    ``e_fit``: mean |log(fitted width / observed width)| over the blocks (0: exact).
    ``wa_range``, ``wm_range``: the smallest and largest wa and wm on the search grid that
    fit as well as the best (parameters are identifiable only up to the rounding).
    """

    w0: int
    wa: float
    wm: float
    e_fit: float
    widths: tuple[int, ...]
    wa_range: tuple[float, float]
    wm_range: tuple[float, float]


def quantized_linear_widths(depth: int, w0: float, wa: float, wm: float) -> np.ndarray:
    """The quantized linear rule's per-block widths (as :meth:`RegNetParams.block_widths`)."""
    return _quantized_widths(np.arange(depth), w0, np.atleast_1d(np.float64(wa)), wm)[0]


def _quantized_widths(j: np.ndarray, w0: float, wa: np.ndarray, wm: float) -> np.ndarray:
    """[len(wa), len(j)] widths: u = w0 + wa * j; k = round(log(u / w0) / log(wm));
    w = round(w0 * wm^k / 8) * 8, rounding half to even as pycls does."""
    linear = w0 + wa[:, None] * j[None, :]
    exponents = np.round(np.log(linear / w0) / np.log(wm))
    return np.round(w0 * np.power(wm, exponents) / WIDTH_QUANTUM) * WIDTH_QUANTUM


def fit_quantized_linear(widths: Sequence[int], wm_grid: Optional[Sequence[float]] = None,
                         wa_max: float = 256.0, w0_candidates: Optional[Sequence[int]] = None
                         ) -> QuantizedLinearFit:
    """Fit (w0, wa, wm) of the quantized linear rule to per-block widths (the paper's
    analysis of good AnyNet models and of the RegNet models themselves).

    Grid search with d = len(widths): w0 over ``w0_candidates`` (default: the multiples of 8
    within 8 of the first width, which the rule reproduces exactly), wm over ``wm_grid``
    (default 1.5 to 3 by 0.01, the paper's range), and, for each (w0, wm), every wa in
    [0, wa_max] where the fitted widths change (the rule is a step function of wa: between
    two breakpoints every wa gives the same widths, so one wa per step is exhaustive).
    Returns the fit with the smallest e_fit; ties go to the middle of the tied wm values
    and of the tied wa steps.
    """
    observed = _values("widths", widths)
    if np.any(observed <= 0):
        raise ValueError("widths must be positive")
    wm_grid = (np.round(np.arange(150, 301) * 0.01, 2) if wm_grid is None
               else _values("wm_grid", wm_grid))
    if np.any(wm_grid <= 1):
        raise ValueError("wm_grid values must be > 1")
    if not wa_max > 0:
        raise ValueError(f"wa_max must be > 0, got {wa_max!r}")
    first = int(round(observed[0] / WIDTH_QUANTUM)) * WIDTH_QUANTUM
    if w0_candidates is None:
        w0_candidates = [w for w in (first - WIDTH_QUANTUM, first, first + WIDTH_QUANTUM) if w > 0]
    depth = observed.size
    j = np.arange(depth, dtype=np.float64)
    log_observed = np.log(observed)
    best = math.inf
    results = []  # (e_fit, w0, wm, lowest tied wa, highest tied wa, middle tied wa)
    for w0 in w0_candidates:
        for wm in wm_grid.tolist():
            # breakpoints: wa where block j's exponent crosses k + 1/2
            max_exponent = math.ceil(math.log1p(wa_max * max(depth - 1, 1) / w0) / math.log(wm))
            k = np.arange(max_exponent + 1) + 0.5
            breaks = (w0 * (np.power(wm, k)[None, :] - 1) / np.maximum(j[1:, None], 1)).ravel()
            breaks = np.unique(np.concatenate([[0.0, wa_max], breaks[breaks < wa_max]]))
            steps_low, steps_high = breaks[:-1], breaks[1:]
            middles = (steps_low + steps_high) / 2
            fitted = _quantized_widths(j, w0, middles, wm)
            e_fit = np.mean(np.abs(np.log(np.maximum(fitted, 1)) - log_observed), axis=1)
            smallest = float(e_fit.min())
            if smallest > best + 1e-12:
                continue
            best = min(best, smallest)
            tied = np.flatnonzero(e_fit <= smallest + 1e-12)
            results.append((smallest, w0, wm, float(steps_low[tied[0]]),
                            float(steps_high[tied[-1]]), float(middles[tied[len(tied) // 2]])))
    winners = [r for r in results if r[0] <= best + 1e-12]
    w0 = min((r[1] for r in winners), key=lambda w: abs(w - first))
    winners = [r for r in winners if r[1] == w0]
    e_fit, _, wm, _, _, wa = winners[len(winners) // 2]
    fitted = quantized_linear_widths(depth, w0, wa, wm)
    return QuantizedLinearFit(
        w0=int(w0), wa=wa, wm=wm, e_fit=e_fit, widths=tuple(int(w) for w in fitted),
        wa_range=(min(r[3] for r in winners), max(r[4] for r in winners)),
        wm_range=(min(r[2] for r in winners), max(r[2] for r in winners)),
    )


def block_widths(network) -> list[int]:
    """Per-block output widths of a built network (RegNetParams or AnyNetParams)."""
    return [block.w_out for block in network.blocks()]
