"""INT8 and FP8 matrix kernels for the GPU, behind kiln::QGemm / kiln::QConv (kiln/quant writes them):

- int8: torch._int_mm (int8 x int8 -> int32 on the tensor cores) with the dequantize epilogue
  (per-tensor input scale x per-channel weight scale, bias, activation) applied to the int32 result;
- fp8 e4m3 (compute capability 8.9+): torch._scaled_mm with the two scales passed to the kernel, so the
  dequantization happens inside the GEMM, and the bias added there too.

Weights are prepared once at lowering (transposed, padded to the kernels' multiples of 8/16). torch is imported
inside functions, and CUDA is only touched when a kernel runs, so importing this module needs no GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FP8_MAX = 448.0  # largest finite float8 e4m3fn


def fp8_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@dataclass
class Int8Linear:
    """y = activation((quant(x) @ Wq^T) * (x_scale * w_scale) + b): Wq int8 [N, K] kept as [K, N]."""

    weight_t: Any  # int8 [K, N]
    scale: Any  # float32 [N]: x_scale * w_scale, folded once
    bias: Any  # float32 [N] or None
    x_scale: float
    activation: str = ""
    activation_params: tuple = ()

    @classmethod
    def prepare(cls, wq, w_scale, bias, x_scale: float, activation: str = "", activation_params=(), device="cuda"):
        return cls(wq.t().contiguous().to(device), (w_scale.float() * x_scale).to(device),
                   None if bias is None else bias.float().to(device), float(x_scale), activation, tuple(activation_params))

    def __call__(self, x):
        from ...ops.fused import apply_activation
        from ...ops.quantize import int_matmul, quantize_activation

        rows = math.prod(x.shape[:-1])
        xq = quantize_activation(x, self.x_scale).reshape(rows, x.shape[-1])
        y = int_matmul(xq, self.weight_t).float().mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return apply_activation(y.reshape(*x.shape[:-1], -1), self.activation, self.activation_params)


@dataclass
class Fp8Linear:
    """y = (fp8(x / x_scale) @ fp8(W / w_scale)^T) * x_scale * w_scale + b, per-tensor scales, e4m3."""

    weight_t: Any  # float8_e4m3fn [K, N] (column-major view of [N, K], as _scaled_mm wants its second operand)
    w_scale: Any  # float32 scalar tensor
    x_scale: Any  # float32 scalar tensor
    bias: Any
    out_features: int

    @classmethod
    def prepare(cls, weight, bias, x_amax: float, device="cuda"):
        """From the fp32 weight [N, K] and the input's calibrated |x| maximum."""
        import torch
        import torch.nn.functional as F

        weight = weight.float()
        n, k = weight.shape
        w_scale = weight.abs().max().clamp(min=1e-12) / FP8_MAX
        padded = F.pad(weight / w_scale, (0, (-k) % 16, 0, (-n) % 16))
        weight_fp8 = padded.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        x_scale = torch.tensor(max(x_amax, 1e-12) / FP8_MAX)
        padded_bias = None if bias is None else F.pad(bias.float(), (0, (-n) % 16))
        return cls(weight_fp8.to(device).t(), w_scale.to(device), x_scale.to(device),
                   None if padded_bias is None else padded_bias.to(device), n)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        rows, k = math.prod(x.shape[:-1]), x.shape[-1]
        flat = (x.reshape(rows, k).float() / self.x_scale).clamp(-FP8_MAX, FP8_MAX)
        flat = F.pad(flat, (0, (-k) % 16, 0, (-rows) % 16)).to(torch.float8_e4m3fn)
        # the bias joins inside the kernel only where torch allows it (fp32 output with bias is not supported)
        y = torch._scaled_mm(flat, self.weight_t, scale_a=self.x_scale, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        y = y[:rows, :self.out_features].float()
        if self.bias is not None:
            y = y + self.bias[:self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)
