"""Symmetric per-output-channel int8 weights: each output channel gets its own scale, so one large
channel does not flatten the resolution of all the others."""
from __future__ import annotations

import numpy as np


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight of the same shape, float32 scale per output channel (axis 0))."""
    weight = np.asarray(weight, dtype=np.float32)
    amax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shaped = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    quantized = np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8)
    return quantized, scale


def activation_scale(amax: float) -> float:
    """Per-tensor symmetric int8 scale for a calibrated threshold."""
    return float(amax) / 127.0 if amax > 0 else 1.0
