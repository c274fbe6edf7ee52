"""Quantization operators: ONNX's QuantizeLinear/DequantizeLinear (per-tensor, per-axis, blocked; int8, uint8,
int16, uint16, int4, uint4, int2, uint2, float8), the integer and QLinear operators that quantized models use,
and kiln's own int8 layers.

kiln::QGemm(X, Wq, Ws, B?, R?) -> Y
    Y = activation(dequant(quant(X) @ Wq^T) + B + R). X float, quantized per tensor, symmetric int8 with the
    attribute `x_scale` (clamp(round(X / x_scale), -128, 127)); Wq int8 [N, K] quantized per output channel,
    symmetric, with scales Ws [N] (float32); B float [N]. The product accumulates in int32 (torch._int_mm),
    exactly. R is kiln::Gemm's fused residual. Attributes `activation`, `activation_params` and `x_amax` (the
    largest |X| calibration saw, for the GPU's fp8 tactics; absent without --fp8) as kiln::Gemm. Written by
    kiln/quant/lower.py.

kiln::QConv(X, Wq, Ws, B?, R?) -> Y
    kiln::Conv with X quantized as above and Wq int8 [C_out, C_in/group, kH, kW] with per-output-channel
    scales Ws. Attributes as kiln::Conv plus `x_scale`.
"""
from __future__ import annotations

import math

from .registry import register

# ONNX element type number -> torch dtype name, for `output_dtype` attributes
_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 10: "float16",
               16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz"}


# Integer types torch has no tensor type for: carried in int8/uint8 (kiln/ir/dtypes.py CARRIED), saturated to
# their own range. ONNX element type number -> (carrier, smallest, largest)
_CARRIED_INTEGERS = {21: ("uint8", 0, 15), 22: ("int8", -8, 7), 25: ("uint8", 0, 3), 26: ("int8", -2, 1)}


def _torch_dtype(number: int):
    import torch

    return getattr(torch, _ONNX_TYPES[number])


def _expand_scale(scale, x, axis: int, block_size: int):
    """Bring a per-tensor, per-axis or blocked scale (or zero point) to a shape that broadcasts against x."""
    if scale.dim() == 0 or scale.numel() == 1 and block_size == 0:
        return scale.reshape(())
    axis = axis % x.dim()
    if block_size > 0:  # same rank as x; the axis dimension counts blocks
        return scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = scale.numel()
    return scale.reshape(shape)


def _float8_limits(dtype) -> float:
    import torch

    return float(torch.finfo(dtype).max)


def quantize_tensor(x, scale, zero_point, dtype, saturate: bool = True, limits: tuple[int, int] | None = None):
    """ONNX QuantizeLinear's arithmetic: round half to even, add the zero point, saturate to the type (or to
    `limits`, the range of a narrower type carried in `dtype`)."""
    import torch

    scaled = x.to(torch.float32) / scale.to(torch.float32)
    if dtype.is_floating_point:  # float8: the cast rounds; saturate clamps to the largest finite value
        if zero_point is not None:
            scaled = scaled + zero_point.to(torch.float32)
        if saturate:
            limit = _float8_limits(dtype)
            scaled = torch.where(scaled.isnan(), scaled, scaled.clamp(-limit, limit))
        return scaled.to(dtype)
    rounded = torch.round(scaled)
    if zero_point is not None:
        rounded = rounded + zero_point.to(torch.float32)
    low, high = limits or (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    return rounded.clamp(low, high).to(dtype)


@register("QuantizeLinear", since=10)
def quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, block_size=0, output_dtype=0, saturate=1, precision=0):
    import torch

    limits = None
    if output_dtype in _CARRIED_INTEGERS:  # int4/int2 (the frontend writes it for such zero points)
        carrier, low, high = _CARRIED_INTEGERS[output_dtype]
        dtype, limits = getattr(torch, carrier), (low, high)
    elif y_zero_point is not None:
        dtype = y_zero_point.dtype
    elif output_dtype:
        dtype = _torch_dtype(output_dtype)
    else:
        dtype = torch.uint8
    scale = _expand_scale(y_scale, x, axis, block_size)
    zero = None if y_zero_point is None else _expand_scale(y_zero_point, x, axis, block_size)
    return quantize_tensor(x, scale, zero, dtype, bool(saturate), limits)


@register("DequantizeLinear", since=10)
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    import torch

    scale = _expand_scale(x_scale, x, axis, block_size)
    values = x.to(torch.float32)
    if x_zero_point is not None:
        values = values - _expand_scale(x_zero_point, x, axis, block_size).to(torch.float32)
    result = values * scale.to(torch.float32)
    return result.to(_torch_dtype(output_dtype) if output_dtype else x_scale.dtype)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(x):
    """uint8 with the range of x widened to include 0, as the spec computes it."""
    import torch

    low = torch.clamp(x.min(), max=0.0).to(torch.float32)
    high = torch.clamp(x.max(), min=0.0).to(torch.float32)
    scale = (high - low) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.round(torch.clamp(-low / safe, 0, 255)).to(torch.uint8)
    y = torch.clamp(torch.round(x.to(torch.float32) / safe) + zero_point.to(torch.float32), 0, 255).to(torch.uint8)
    return y, scale, zero_point


def _centered(x, zero_point, axis: int | None = None):
    """x - zero_point in float64, where integer products of int8/uint8/int16 operands stay exact."""
    import torch

    values = x.to(torch.float64)
    if zero_point is None:
        return values
    zero = zero_point.to(torch.float64)
    if zero.dim() == 1 and zero.numel() > 1 and axis is not None:
        shape = [1] * x.dim()
        shape[axis] = zero.numel()
        zero = zero.reshape(shape)
    return values - zero


@register("MatMulInteger", since=10)
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    import torch

    # a's zero point may be per row (shape [M]), b's per column (shape [N])
    left = _centered(a, a_zero_point, axis=a.dim() - 2 if a.dim() >= 2 else None)
    right = _centered(b, b_zero_point, axis=b.dim() - 1)
    return torch.matmul(left, right).round().to(torch.int32)


def _conv_float64(x, w, b, auto_pad, dilations, group, kernel_shape, pads, strides):
    from .nn import conv

    return conv(x, w, b, auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
                strides=strides)


@register("ConvInteger", since=10)
def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET", dilations=None, group=1,
                 kernel_shape=None, pads=None, strides=None):
    import torch

    y = _conv_float64(_centered(x, x_zero_point), _centered(w, w_zero_point, axis=0), None, auto_pad, dilations, group,
                      kernel_shape, pads, strides)
    return y.round().to(torch.int32)


def _requantize(accumulated, multiplier, y_zero_point, dtype):
    import torch

    y = torch.round(accumulated * multiplier)
    if y_zero_point is not None:
        y = y + y_zero_point.to(torch.float64)
    info = torch.iinfo(dtype)
    return y.clamp(info.min, info.max).to(dtype)


@register("QLinearConv", since=10)
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, b=None, *,
                 auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    import torch

    bias = None if b is None else b.to(torch.float64)
    accumulated = _conv_float64(_centered(x, x_zero_point), _centered(w, w_zero_point, axis=0), bias, auto_pad,
                                dilations, group, kernel_shape, pads, strides)
    w_scale = w_scale.to(torch.float64)
    if w_scale.numel() > 1:
        w_scale = w_scale.reshape([1, -1] + [1] * (accumulated.dim() - 2))
    multiplier = x_scale.to(torch.float64) * w_scale / y_scale.to(torch.float64)
    return _requantize(accumulated, multiplier, y_zero_point, y_zero_point.dtype if y_zero_point is not None else x.dtype)


@register("QLinearMatMul", since=10)
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    import torch

    left = _centered(a, a_zero_point, axis=a.dim() - 2)
    right = _centered(b, b_zero_point, axis=b.dim() - 1)
    accumulated = torch.matmul(left, right)
    a_scale = a_scale.to(torch.float64)
    if a_scale.numel() > 1:  # per row
        a_scale = a_scale.reshape(-1, 1)
    # the scales may be float16: the spec computes in their own type, then rounds
    multiplier = (a_scale * b_scale.to(torch.float64) / y_scale.to(torch.float64)).to(a_scale.dtype)
    return _requantize(accumulated, multiplier, y_zero_point, y_zero_point.dtype)


# -- kiln's int8 layers --------------------------------------------------------------------------------------

def quantize_activation(x, x_scale: float):
    """Per-tensor symmetric int8, as kiln's int8 layers read their input."""
    import torch

    return torch.clamp(torch.round(x.to(torch.float32) * (1.0 / x_scale)), -128, 127).to(torch.int8)


def int_matmul(a, b):
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N]. On CUDA, torch._int_mm wants M > 16 and K, N multiples of 8:
    zero rows and columns are added and cut off again (zeros add nothing to the sums)."""
    import torch
    import torch.nn.functional as F

    if not a.is_cuda:
        return torch._int_mm(a, b)
    rows, inner, cols = a.shape[0], a.shape[1], b.shape[1]
    pad_rows = max(17 - rows, (-rows) % 8)
    pad_inner, pad_cols = (-inner) % 8, (-cols) % 8
    if pad_rows or pad_inner:
        a = F.pad(a, (0, pad_inner, 0, pad_rows))
    if pad_inner or pad_cols:
        b = F.pad(b, (0, pad_cols, 0, pad_inner))
    return torch._int_mm(a, b)[:rows, :cols]


@register("QGemm", since=1, domain="kiln")
def qgemm(x, wq, w_scale, b=None, residual=None, *, x_scale, activation="", activation_params=(), x_amax=None):
    import torch

    from .fused import apply_activation

    rows = math.prod(x.shape[:-1])
    xq = quantize_activation(x, x_scale).reshape(rows, x.shape[-1])
    accumulated = int_matmul(xq, wq.t())  # int8 x int8 -> int32, exact
    y = accumulated.to(torch.float32) * (w_scale * x_scale)
    if b is not None:
        y = y + b
    y = y.reshape(*x.shape[:-1], wq.shape[0])
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation, activation_params)


@register("QConv", since=1, domain="kiln")
def qconv(x, wq, w_scale, b=None, residual=None, *, x_scale, dilations=None, group=1, kernel_shape=None, pads=None,
          strides=None, activation="", activation_params=()):
    import torch

    from .fused import conv

    # int8 values carried in float32: products and sums stay exact while they fit fp32's 24-bit mantissa
    # (reduction lengths up to ~1000 at full scale); torch has no int8 convolution on the CPU to call
    xq = quantize_activation(x, x_scale).to(torch.float32)
    y = conv(xq, wq.to(torch.float32), None, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
             strides=strides)
    y = y * (w_scale * x_scale).reshape(1, -1, *([1] * (y.dim() - 2)))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * (y.dim() - 2)))
    if residual is not None:
        y = y + residual
    from .fused import apply_activation

    return apply_activation(y, activation, activation_params)
