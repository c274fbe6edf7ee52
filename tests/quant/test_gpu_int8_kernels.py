"""The GPU int8/fp8 matrix kernels' arithmetic, checked on the CPU (torch._int_mm and torch._scaled_mm run
there too) against float64; on a GPU the same tests run on CUDA tensors."""
import numpy as np
import pytest
import torch

from kiln.backends.cuda.int8 import Fp8Linear, Int8Linear
from kiln.ops.quantize import int_matmul

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 20, 10), (40, 64, 24)])  # odd sizes: the CUDA path pads to its multiples
def test_int_matmul_exact(device, shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    got = int_matmul(a.to(device), b.to(device)).cpu()
    assert torch.equal(got, (a.long() @ b.long()).int())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_matches_float64(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g)
    wq = torch.randint(-127, 128, (24, 48), generator=g, dtype=torch.int8)
    w_scale, bias, x_scale = torch.rand(24, generator=g) * 0.01 + 0.001, torch.randn(24, generator=g), 0.03
    layer = Int8Linear.prepare(wq, w_scale, bias, x_scale, activation="relu", device=device)
    got = layer(x.to(device)).cpu().numpy()
    xq = np.clip(np.rint(x.double().numpy() / x_scale), -128, 127)
    want = np.maximum(xq @ wq.double().numpy().T * (w_scale.double().numpy() * x_scale) + bias.double().numpy(), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_linear_close_to_fp32():
    device = "cuda" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else "cpu"
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(7, 40, generator=g), torch.randn(30, 40, generator=g) * 0.1, torch.randn(30, generator=g)
    layer = Fp8Linear.prepare(weight, bias, x_amax=float(x.abs().max()), device=device)
    got = layer(x.to(device)).cpu()
    want = x @ weight.t() + bias
    # e4m3 keeps 3 mantissa bits: a few percent per product, averaging out over the 40-long sums
    assert float((got - want).norm() / want.norm()) < 0.05
