"""Triton kernels kiln owns for the GPU: the epilogue of a matrix or convolution step (bias, residual
add and activation in one pass over the output), LayerNorm and Softmax over the last axis. Flash attention
and elementwise chains live beside it, in triton_attention.py and triton_elementwise.py.

Imported only when a CUDA engine is lowered (it needs triton). Each kernel has a few launch
variants (block size, warps); the tactic chooser times them against torch's own kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Activation codes shared by the kernels and their launchers.
ACTIVATION_CODES = {"": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "sigmoid": 5}


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 4:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 5:
        x = tl.sigmoid(x)
    return x


@triton.jit
def _epilogue_kernel(y_ptr, bias_ptr, residual_ptr, total, channels, inner, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    y = tl.load(y_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + (offsets // inner) % channels, mask=mask).to(tl.float32)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=mask).to(tl.float32)
    y = _activate(y, ACTIVATION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def epilogue(y, bias, residual, activation: str, block: int = 1024, warps: int = 4, inner: int = 1):
    """In place: y = activation(y + bias + residual), bias[(i // inner) % len(bias)] at flat index i (inner
    is 1 for channels-last or a matrix, H*W for NCHW).

    y and residual must be dense with the same strides, so one flat index walks both."""
    total = y.numel()
    channels = bias.numel() if bias is not None else 1
    grid = (triton.cdiv(total, block),)
    _epilogue_kernel[grid](y, bias if bias is not None else y, residual if residual is not None else y, total, channels, inner,
                           HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                           ACTIVATION=ACTIVATION_CODES[activation], BLOCK=block, num_warps=warps)
    return y


@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, columns, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < columns
    x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / columns
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / columns
    y = centered * tl.math.rsqrt(variance + eps)
    y = y * tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * columns + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def layernorm(x, weight, bias, eps: float, warps: int = 4):
    """LayerNorm over the last axis of a contiguous x, one program per row (rows up to 16K columns)."""
    import torch

    columns = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // columns
    _layernorm_kernel[(rows,)](x, weight, bias if bias is not None else weight, y, columns, eps,
                               HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(columns), num_warps=warps)
    return y


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, columns, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < columns
    x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=-float("inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * columns + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax(x, warps: int = 4):
    """Softmax over the last axis of a contiguous x, one program per row."""
    import torch

    columns = x.shape[-1]
    y = torch.empty_like(x)
    _softmax_kernel[(x.numel() // columns,)](x, y, columns, BLOCK=triton.next_power_of_2(columns), num_warps=warps)
    return y


@triton.jit
def _add_layernorm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, columns, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < columns
    x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(r_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / columns
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / columns
    y = centered * tl.math.rsqrt(variance + eps)
    y = y * tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * columns + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_layernorm(x, residual, weight, bias, eps: float, warps: int = 4):
    """LayerNorm(x + residual) over the last axis in one pass (a transformer's residual add and norm);
    x and residual contiguous, of one shape."""
    import torch

    columns = x.shape[-1]
    y = torch.empty_like(x)
    _add_layernorm_kernel[(x.numel() // columns,)](x, residual, weight, bias if bias is not None else weight, y, columns, eps,
                                                   HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(columns),
                                                   num_warps=warps)
    return y


@triton.jit
def _maxpool_nhwc_kernel(x_ptr, y_ptr, total, C, H, W, OH, OW, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                         BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    c = offsets % C
    rest = offsets // C
    ow = rest % OW
    rest = rest // OW
    oh = rest % OH
    n = rest // OH
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * SH - PH + kh
            iw = ow * SW - PW + kw
            inside = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            value = tl.load(x_ptr + ((n * H + ih) * W + iw) * C + c, mask=inside, other=0)  # any dtype, int8 too
            best = tl.maximum(best, tl.where(inside, value.to(tl.float32), float("-inf")))
    tl.store(y_ptr + offsets, best.to(y_ptr.dtype.element_ty), mask=mask)


def maxpool_nhwc(x, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                 block: int = 1024, warps: int = 4):
    """2-D max pooling of a channels-last x (ONNX MaxPool, no dilation, floor mode) in its own dtype (int8
    included): one pass, no index output (torch's CUDA max_pool2d writes an int64 index per output as well)."""
    import torch

    n, c, h, w = x.shape
    oh = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    total = y.numel()
    _maxpool_nhwc_kernel[(triton.cdiv(total, block),)](x, y, total, c, h, w, oh, ow, strides[0], strides[1], pads[0], pads[1],
                                                        KH=kernel[0], KW=kernel[1], BLOCK=block, num_warps=warps)
    return y
