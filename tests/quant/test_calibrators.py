"""Histograms stay bounded as ranges grow; each calibrator picks the threshold its definition says."""
import numpy as np
import pytest

from kiln.quant.calibrators import amax
from kiln.quant.histogram import BINS, Histogram


def _histogram(*arrays):
    histogram = Histogram()
    for array in arrays:
        histogram.add(array)
    return histogram


def test_histogram_widens_in_fixed_memory():
    rng = np.random.default_rng(0)
    small, large = rng.standard_normal(10_000), rng.standard_normal(10_000) * 1000
    histogram = _histogram(small, large)
    assert histogram.counts.shape == (BINS,) and histogram.counts.sum() == 20_000
    assert histogram.width * BINS >= np.abs(large).max()
    assert histogram.amax == pytest.approx(max(np.abs(small).max(), np.abs(large).max()), rel=1e-6)


def test_calibrators_on_a_gaussian_with_outliers():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]])  # two outliers far out
    histogram = _histogram(values)
    assert amax(histogram, "minmax") == pytest.approx(40.0, rel=1e-6)
    p = amax(histogram, "percentile")
    assert p == pytest.approx(np.percentile(np.abs(values), 99.99), abs=2 * histogram.width)
    # entropy ignores the two outliers: a threshold within the bulk of the Gaussian
    assert 2.5 < amax(histogram, "entropy") < 8.0

    def squared_error(threshold):
        scale = threshold / 127
        return np.sum((np.clip(np.rint(values / scale), -127, 127) * scale - values) ** 2)

    # mse: its threshold quantizes these very values with less squared error than keeping every value or the percentile's
    chosen = amax(histogram, "mse")
    assert chosen < 40.0
    assert squared_error(chosen) < min(squared_error(40.0), squared_error(p))


def test_entropy_ignores_relu_zeros():
    rng = np.random.default_rng(2)
    relu = np.maximum(rng.standard_normal(100_000) * 3, 0)  # half exact zeros
    histogram = _histogram(relu)
    assert histogram.zeros >= 45_000
    assert amax(histogram, "entropy") > 0.5 * np.percentile(relu, 99.9)


def test_empty_and_zero_tensors_have_no_range():
    assert amax(_histogram(np.zeros(10)), "entropy") == 0.0
    assert amax(Histogram(), "minmax") == 0.0
