"""Calibrators: from a tensor's |x| histogram to the clipping threshold amax (scale = amax / 127).

minmax keeps every value (amax = largest |x|); percentile clips the top (100 - p)% of values;
entropy picks the threshold whose 128-level quantized distribution loses least information
(KL divergence, TensorRT's entropy calibrator); mse picks the threshold with the least expected
squared error (rounding inside, clipping outside).
"""
from __future__ import annotations

import numpy as np

from .histogram import Histogram

LEVELS = 128  # magnitudes of symmetric int8


def amax(histogram: Histogram, calibrator: str, percentile: float = 99.99) -> float:
    if histogram.width == 0.0:
        return 0.0
    if calibrator == "minmax":
        return histogram.amax
    if calibrator == "percentile":
        return _percentile(histogram, percentile)
    if calibrator == "entropy":
        return _entropy(histogram)
    if calibrator == "mse":
        return _mse(histogram)
    raise AssertionError(f"unknown calibrator {calibrator!r}")


def _percentile(histogram: Histogram, percentile: float) -> float:
    cumulative = np.cumsum(histogram.counts)
    index = int(np.searchsorted(cumulative, cumulative[-1] * percentile / 100.0))
    return min(float((index + 1) * histogram.width), histogram.amax)


def _entropy(histogram: Histogram, step: int = 16) -> float:
    counts = histogram.counts.copy()
    # Exact zeros are left out: merged into the first level they would smear over its bins and make every
    # wide threshold look lossy, which clips the large activations that matter most.
    counts[0] -= histogram.zeros
    if not counts.any():
        return histogram.amax
    used = int(np.nonzero(counts)[0][-1]) + 1  # bins past the largest value only add empty work
    best, best_divergence = used, np.inf
    for stop in range(LEVELS, max(used, LEVELS) + 1, step):
        reference = counts[:stop].copy()
        reference[-1] += counts[stop:].sum()  # what the threshold clips lands in the last bin
        divergence = _kl(reference, _quantized(counts[:stop]))
        if divergence < best_divergence:
            best, best_divergence = stop, divergence
    return min(float(best * histogram.width), histogram.amax)


def _quantized(counts: np.ndarray) -> np.ndarray:
    """counts merged into LEVELS groups and spread back evenly over each group's nonzero bins."""
    groups = np.array_split(np.arange(len(counts)), LEVELS)
    expanded = np.zeros_like(counts)
    for group in groups:
        chunk = counts[group]
        nonzero = chunk > 0
        if nonzero.any():
            expanded[group[nonzero]] = chunk.sum() / nonzero.sum()
    return expanded


def _kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = reference / reference.sum()
    q_total = candidate.sum()
    if q_total == 0:
        return np.inf
    q = candidate / q_total
    mask = p > 0
    q = np.where(mask & (q == 0), 1e-12, q)  # a clipped outlier bin: large but finite divergence
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse(histogram: Histogram, candidates: int = 128) -> float:
    counts = histogram.counts
    centers = (np.arange(len(counts)) + 0.5) * histogram.width
    top = histogram.amax
    best, best_error = top, np.inf
    for threshold in np.linspace(top / candidates, top, candidates):
        delta = threshold / (LEVELS - 1)
        inside = centers <= threshold
        # rounding error of a uniform value in a step is delta^2 / 12; clipped values lose (x - threshold)^2
        error = counts[inside].sum() * delta * delta / 12.0 + np.sum(counts[~inside] * (centers[~inside] - threshold) ** 2)
        if error < best_error:
            best, best_error = float(threshold), error
    return best
