"""Triton kernels for kiln's int8 layers on the GPU: an implicit-GEMM int8 convolution (and matrix product)
that quantizes its input as it loads it and dequantizes in its epilogue, and the two passes that surround
torch._int_mm (quantize the input; dequantize, add bias and residual, activate).

The products are int8 x int8 with int32 accumulation on the tensor cores (tl.dot with out_dtype int32): exact,
like kiln::QConv's reference. Imported only when a CUDA engine is lowered (it needs triton); under
TRITON_INTERPRET=1 the same kernels run on the CPU, which is how their arithmetic is tested without a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import ACTIVATION_CODES, _activate

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the tactic chooser times for each int8 convolution or matrix layer
CONV_CONFIGS = ((64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 128, 4, 4))


@triton.jit
def _round_int8(v):
    """Clamp to [-128, 127], then round half to even (torch.round's rule) by the 1.5 * 2^23 trick: adding it leaves
    no fraction bits, so the fp32 add rounds to the nearest even integer."""
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    return ((v + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _conv_int8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, residual_ptr, y_ptr,
                      batch, height, width, out_h, out_w, out_channels,
                      sx_n, sx_c, sx_h, sx_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, inverse_scale,
                      CHANNELS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow) flattened
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    row_ok = rows < batch * out_h * out_w
    col_ok = cols < out_channels
    ow = rows % out_w
    oh = (rows // out_w) % out_h
    n = (rows // (out_w * out_h)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            inside = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            base = n * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
            for c0 in range(0, CHANNELS, BLOCK_K):  # a compile-time count: one kernel per channel count
                c = c0 + ks
                a = tl.load(x_ptr + base[:, None] + c[None, :] * sx_c, mask=inside[:, None] & (c[None, :] < CHANNELS),
                            other=0.0)
                a = _round_int8(a.to(tl.float32) * inverse_scale)  # padding and tails load 0, which stays 0
                k = (kh * KW + kw) * CHANNELS + c  # the weight's rows run (kh, kw, c)
                b = tl.load(w_ptr + k[:, None].to(tl.int64) * out_channels + cols[None, :],
                            mask=(c[:, None] < CHANNELS) & col_ok[None, :], other=0)
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    y = acc.to(tl.float32) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offsets = rows[:, None].to(tl.int64) * out_channels + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = _activate(y, ACTIVATION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def conv_int8(x, weight_k, scale, bias, residual, x_scale: float, geometry, activation: str, out_dtype, config):
    """y = activation(conv(quant(x), Wq) * scale + bias + residual) for a 4-D x in any layout, one kernel.

    weight_k: int8 [KH * KW * C, C_out] (rows in (kh, kw, c) order); scale: float32 [C_out] (x_scale * w_scale);
    geometry: (kernel (KH, KW), strides, pads (top, left), dilations). The result is NCHW in shape and
    channels-last in memory; residual is read channels-last (made so when it is not)."""
    import torch

    (kh, kw), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geometry
    batch, channels, height, width = x.shape
    out_h = (height + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    out_channels = weight_k.shape[1]
    y = torch.empty((batch, out_h, out_w, out_channels), dtype=out_dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    sx_n, sx_c, sx_h, sx_w = x.stride()
    _launch(x, weight_k, scale, bias, residual, y, (batch, height, width, channels, out_h, out_w, out_channels),
            (sx_n, sx_c, sx_h, sx_w), (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w), x_scale, (kh, kw), activation,
            config)
    return y.permute(0, 3, 1, 2)


def gemm_int8(x, weight_k, scale, bias, residual, x_scale: float, activation: str, out_dtype, config):
    """y = activation((quant(x) @ Wq^T) * scale + bias + residual) in one kernel; weight_k int8 [K, N]."""
    import torch

    x = x if x.stride(-1) == 1 else x.contiguous()
    inner, out_features = x.shape[-1], weight_k.shape[1]
    rows = x.numel() // inner if inner else 0
    flat = x.reshape(rows, inner)
    y = torch.empty((rows, out_features), dtype=out_dtype, device=x.device)
    if residual is not None:
        residual = residual.reshape(rows, out_features).contiguous()
    _launch(flat, weight_k, scale, bias, residual, y, (rows, 1, 1, inner, 1, 1, out_features),
            (flat.stride(0), 1, 0, 0), (1, 1, 0, 0, 1, 1), x_scale, (1, 1), activation, config)
    return y.reshape(*x.shape[:-1], out_features)


def _launch(x, weight_k, scale, bias, residual, y, sizes, strides, geometry, x_scale, kernel, activation, config):
    block_m, block_n, block_k, warps, stages = config
    batch, height, width, channels, out_h, out_w, out_channels = sizes
    grid = (triton.cdiv(batch * out_h * out_w, block_m), triton.cdiv(out_channels, block_n))
    _conv_int8_kernel[grid](x, weight_k, scale, bias if bias is not None else scale, residual if residual is not None else y,
                            y, batch, height, width, out_h, out_w, out_channels, *strides, *geometry, 1.0 / x_scale,
                            CHANNELS=channels, KH=kernel[0], KW=kernel[1],
                            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                            ACTIVATION=ACTIVATION_CODES[activation], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            num_warps=warps, num_stages=stages)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, total, inverse_scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + offsets, _round_int8(x * inverse_scale), mask=mask)


def quantize(x, x_scale: float, block: int = 1024):
    """clamp(round(x / x_scale), -128, 127) as int8, one pass over a contiguous x."""
    import torch

    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    _quantize_kernel[(triton.cdiv(x.numel(), block),)](x, q, x.numel(), 1.0 / x_scale, BLOCK=block, num_warps=4)
    return q


@triton.jit
def _dequantize_kernel(acc_ptr, scale_ptr, bias_ptr, residual_ptr, y_ptr, total, channels, acc_row_stride,
                       HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    col = offsets % channels
    acc = tl.load(acc_ptr + (offsets // channels) * acc_row_stride + col, mask=mask, other=0)
    y = acc.to(tl.float32) * tl.load(scale_ptr + col, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = _activate(y, ACTIVATION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def dequantize(acc, scale, bias, residual, activation: str, out_dtype, block: int = 1024):
    """activation(acc * scale + bias + residual) for an int32 [M, N] product whose rows may be a padded
    buffer's (row stride >= N); residual is a contiguous [M, N]. Returns a new contiguous [M, N]."""
    import torch

    rows, channels = acc.shape
    assert acc.stride(1) == 1
    y = torch.empty((rows, channels), dtype=out_dtype, device=acc.device)
    total = rows * channels
    _dequantize_kernel[(triton.cdiv(total, block),)](acc, scale, bias if bias is not None else scale,
                                                     residual if residual is not None else y, y, total, channels,
                                                     acc.stride(0), HAS_BIAS=bias is not None,
                                                     HAS_RESIDUAL=residual is not None,
                                                     ACTIVATION=ACTIVATION_CODES[activation], BLOCK=block, num_warps=4)
    return y
