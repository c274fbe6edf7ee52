"""Bounded-memory statistics of one tensor over many batches: a histogram of |x| that widens as larger
values arrive, plus the signed extremes (the coverage check compares them with validation data)."""
from __future__ import annotations

import numpy as np

BINS = 2048  # as TensorRT's entropy calibrator
PROFILE_BINS = 32  # the coarse distribution the coverage check compares (kept in the calibration cache)


class Histogram:
    def __init__(self, bins: int = BINS):
        self.counts = np.zeros(bins, dtype=np.float64)
        self.width = 0.0  # of one bin; 0 until the first nonzero value
        self.low = np.inf
        self.high = -np.inf
        self.total = 0
        self.zeros = 0  # exact zeros (ReLU outputs are full of them); int8 holds them exactly at any scale

    @property
    def amax(self) -> float:
        """The largest |x| seen."""
        return float(max(abs(self.low), abs(self.high))) if self.total else 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        self.total += values.size
        self.zeros += int(np.count_nonzero(values == 0))
        magnitude = np.abs(values)
        top = float(magnitude.max())
        if self.width == 0.0:
            if top == 0.0:
                self.counts[0] += values.size
                return
            self.width = top / len(self.counts)
        while top > self.width * len(self.counts):
            self._widen()
        index = np.minimum((magnitude / self.width).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(index, minlength=len(self.counts))

    def _widen(self) -> None:
        """Double the covered range by merging neighbouring bins: memory stays fixed."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.concatenate([merged, np.zeros_like(merged)])
        self.width *= 2.0

    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1) * self.width

    def profile(self, top: float, bins: int = PROFILE_BINS) -> np.ndarray:
        """Shares of |x| in `bins` equal bins over [0, top], plus one last share for values beyond top."""
        if not self.total or self.width == 0.0:
            return np.zeros(bins + 1)
        centers = (np.arange(len(self.counts)) + 0.5) * self.width
        index = np.minimum((centers / max(top, 1e-30) * bins).astype(np.int64), bins)
        shares = np.bincount(index, weights=self.counts, minlength=bins + 1)
        return shares / max(shares.sum(), 1.0)
