"""LRN against a float64 loop written from ONNX's definition, for window sizes even and odd, wider than the
channels, and parameters on both of the kernel's paths (a positive base through exp/log, and pow)."""
import numpy as np
import pytest
import torch

from kiln.ops.nn import lrn


def reference(x: np.ndarray, alpha: float, beta: float, bias: float, size: int) -> np.ndarray:
    channels = x.shape[1]
    out = np.empty_like(x)
    for c in range(channels):
        low, high = max(0, c - (size - 1) // 2), min(channels - 1, c + size - 1 - (size - 1) // 2)
        out[:, c] = x[:, c] / (bias + alpha / size * (x[:, low:high + 1] ** 2).sum(1)) ** beta
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("alpha, beta, bias", [(1e-4, 0.75, 1.0), (0.5, 0.3, 2.0), (0.2, 0.5, 0.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_matches_its_definition(size, alpha, beta, bias, channels_last):
    x = np.random.default_rng(size).standard_normal((2, 7, 5, 5)).astype(np.float32)
    tensor = torch.from_numpy(x)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    got = lrn(tensor, alpha=alpha, beta=beta, bias=bias, size=size).numpy()
    np.testing.assert_allclose(got, reference(x.astype(np.float64), alpha, beta, bias, size), rtol=1e-5, atol=1e-6)
