"""Triton kernels for kiln's int8 layers on the GPU: an implicit-GEMM int8 convolution (and matrix product)
that quantizes its input as it loads it and dequantizes in its epilogue, and the two passes that surround
torch._int_mm (quantize the input; dequantize, add bias and residual, activate).

The products are int8 x int8 with int32 accumulation on the tensor cores (tl.dot with out_dtype int32): exact,
like kiln::QConv's reference. Both operands are read K-contiguous (channels-last pixels, weight rows [N, K]), the
layout Hopper's int8 tensor-core instructions take from shared memory, and the reduction over (kh, kw, channel
block) is one loop, so Triton pipelines its loads. Imported only when a CUDA engine is lowered (it needs triton);
under TRITON_INTERPRET=1 the same kernels run on the CPU, which is how their arithmetic is tested without a GPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import triton
import triton.language as tl

from .triton_kernels import ACTIVATION_CODES, _activate

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the tactic chooser times for each int8 convolution or matrix layer
# (benchmarks/int8_conv.py on ResNet-50's convolutions: each of these is the fastest on some shape and batch)
CONV_CONFIGS = ((32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4),
                (128, 128, 64, 8, 3), (128, 256, 64, 8, 3))
# A convolution over fewer channels than this (an image stem's 3) packs its reduction: each block of BLOCK_K lanes
# runs over the weight's (kh, kw, c) columns in order, so a 3-channel 7x7 reduces over 147 lanes in 5 blocks of 32
# instead of 49 blocks of which 61 of every 64 lanes are padding; its configurations are these.
PACKED_CHANNELS = 16
# A convolution whose output tiles are too few to fill the GPU (batch 1's deep layers: layer4's 3x3 at 7x7 has 49
# pixels) also gets split-K configurations (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits): each split sums its
# share of the reduction into an int32 buffer, and one more pass adds them and runs the epilogue.
FEW_TILES = 132  # an H100's or H200's streaming multiprocessors
SPLIT_CONFIGS = ((32, 64, 64, 4, 3, 4), (32, 64, 64, 4, 3, 8), (64, 64, 64, 4, 3, 4), (32, 128, 64, 4, 3, 8))
SPLIT_EPILOGUE = (32, 64)  # the adding pass's tile
PACKED_CONFIGS = ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 64, 64, 4, 3), (256, 64, 32, 8, 3))


def packs(channels: int, kernel: tuple[int, int]) -> bool:
    """Whether a convolution with this many input channels and this kernel reduces over packed columns."""
    return channels < PACKED_CHANNELS and tuple(kernel) != (1, 1)


def conv_configs(channels: int, kernel: tuple[int, int]) -> tuple:
    """The block configurations the tactic chooser times for a convolution of this shape."""
    return PACKED_CONFIGS if packs(channels, kernel) else CONV_CONFIGS


_COMPILE_ONLY: ContextVar[bool] = ContextVar("kiln_int8_compile_only", default=False)


@contextmanager
def compiling_only():
    """Inside it, the kernels below are compiled for the arguments they are called with but not launched: within
    triton.AsyncCompileMode each compile goes to that mode's executor, so a layer's configurations compile at once."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def _start(kernel, grid, *args, **kwargs):
    """Launch a Triton kernel on `grid`, or under compiling_only() only compile it."""
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@triton.jit
def _round_int8(v):
    """Clamp to [-128, 127], then round half to even (torch.round's rule) by the 1.5 * 2^23 trick: adding it leaves
    no fraction bits, so the fp32 add rounds to the nearest even integer."""
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    return ((v + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _epilogue(acc, cols, col_ok, scale_ptr, bias_ptr, residual, inverse_out_scale, residual_scale,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr,
              ACTIVATION: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr):
    """An int32 product tile dequantized (per-column scale), bias, residual (dequantized when int8) and activation
    added, and requantized into the next layer's scale when its output is int8."""
    y = acc.to(tl.float32) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        if QUANTIZED_RESIDUAL:  # handed on in int8 by its producer, in residual_scale
            y += residual.to(tl.float32) * residual_scale
        else:
            y += residual.to(tl.float32)
    y = _activate(y, ACTIVATION)
    if QUANTIZED_OUTPUT:  # handed to the next int8 layer as int8, in its input scale
        y = _round_int8(y * inverse_out_scale)
    return y


@triton.jit
def _finish(acc, offsets, mask, cols, col_ok, scale_ptr, bias_ptr, residual_ptr, y_ptr, inverse_out_scale,
            residual_scale, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr,
            ACTIVATION: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr):
    """The epilogue of a tile at these row-major [pixels, out_channels] offsets: residual read, output stored."""
    residual = acc  # read only with HAS_RESIDUAL
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0)
    y = _epilogue(acc, cols, col_ok, scale_ptr, bias_ptr, residual, inverse_out_scale, residual_scale, HAS_BIAS,
                  HAS_RESIDUAL, QUANTIZED_RESIDUAL, ACTIVATION, QUANTIZED_OUTPUT)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_int8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, residual_ptr, y_ptr, partial_ptr,
                      pixels, height, width, out_h, out_w, channels, out_channels, k_total,
                      sx_n, sx_c, sx_h, sx_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, inverse_scale,
                      inverse_out_scale, residual_scale, KH: tl.constexpr, KW: tl.constexpr,
                      CHANNEL_STEPS: tl.constexpr, PACKED: tl.constexpr, STEPS: tl.constexpr,
                      SPLIT_K: tl.constexpr, SPLIT_STEPS: tl.constexpr,
                      QUANTIZED_INPUT: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr,
                      ACTIVATION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # output-channel tiles run fastest, so the programs that share a tile of pixels run together (read once from DRAM)
    column_tiles = tl.cdiv(out_channels, BLOCK_N)
    rows = (tl.program_id(0) // column_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow) flattened
    cols = (tl.program_id(0) % column_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    row_ok = rows < pixels
    col_ok = cols < out_channels
    ow = rows % out_w
    oh = (rows // out_w) % out_h
    image = (rows // (out_w * out_h)).to(tl.int64) * sx_n
    top = oh * stride_h - pad_h
    left = ow * stride_w - pad_w
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    split = 0
    if SPLIT_K > 1:  # this program sums SPLIT_STEPS of the STEPS reduction steps; a second pass adds the splits
        split = tl.program_id(1)
    for i in range(SPLIT_STEPS):  # (kh, kw, channel block), or PACKED blocks of (kh, kw, c) columns: one loop, pipelined
        step = i
        if SPLIT_K > 1:
            step = split * SPLIT_STEPS + i
        if PACKED:  # each lane its own column k = (kh * KW + kw) * channels + c
            k = step * BLOCK_K + ks
            lane_ok = k < k_total
            if SPLIT_K > 1:
                lane_ok = lane_ok & (step < STEPS)  # the last split's tail
            tap = k // channels
            c = k - tap * channels
            kh = tap // KW
            ih = top[:, None] + (kh * dil_h)[None, :]
            iw = left[:, None] + ((tap - kh * KW) * dil_w)[None, :]
            inside = row_ok[:, None] & lane_ok[None, :] & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            a = tl.load(x_ptr + image[:, None] + ih * sx_h + iw * sx_w + (c * sx_c)[None, :], mask=inside, other=0)
        else:
            tap = step // CHANNEL_STEPS
            c = (step - tap * CHANNEL_STEPS) * BLOCK_K + ks
            kh = tap // KW
            ih = top + kh * dil_h
            iw = left + (tap - kh * KW) * dil_w
            inside = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            lane_ok = c < channels
            if SPLIT_K > 1:
                lane_ok = lane_ok & (step < STEPS)
            a = tl.load(x_ptr + (image + ih * sx_h + iw * sx_w)[:, None] + c[None, :] * sx_c,
                        mask=inside[:, None] & lane_ok[None, :], other=0)
            k = tap * channels + c  # the weight's columns run (kh, kw, c)
        if not QUANTIZED_INPUT:
            a = _round_int8(a.to(tl.float32) * inverse_scale)  # padding and tails load 0, which stays 0
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * k_total + k[:, None], mask=lane_ok[:, None] & col_ok[None, :],
                    other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    offsets = rows[:, None].to(tl.int64) * out_channels + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:  # the partial sum, for _split_k_epilogue_kernel
        tl.store(partial_ptr + split.to(tl.int64) * pixels * out_channels + offsets, acc, mask=mask)
    else:
        _finish(acc, offsets, mask, cols, col_ok, scale_ptr, bias_ptr, residual_ptr, y_ptr, inverse_out_scale,
                residual_scale, HAS_BIAS, HAS_RESIDUAL, QUANTIZED_RESIDUAL, ACTIVATION, QUANTIZED_OUTPUT)


@triton.jit
def _split_k_epilogue_kernel(partial_ptr, scale_ptr, bias_ptr, residual_ptr, y_ptr, pixels, out_channels,
                             inverse_out_scale, residual_scale, SPLIT_K: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr,
                             ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    column_tiles = tl.cdiv(out_channels, BLOCK_N)
    rows = (tl.program_id(0) // column_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % column_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_channels
    offsets = rows[:, None].to(tl.int64) * out_channels + cols[None, :]
    mask = (rows < pixels)[:, None] & col_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for split in range(SPLIT_K):
        acc += tl.load(partial_ptr + split * pixels * out_channels + offsets, mask=mask, other=0)
    _finish(acc, offsets, mask, cols, col_ok, scale_ptr, bias_ptr, residual_ptr, y_ptr, inverse_out_scale,
            residual_scale, HAS_BIAS, HAS_RESIDUAL, QUANTIZED_RESIDUAL, ACTIVATION, QUANTIZED_OUTPUT)


def conv_int8(x, weight_nk, scale, bias, residual, x_scale: float, geometry, activation: str, out_dtype, config,
              out_scale: float | None = None, residual_scale: float | None = None):
    """y = activation(conv(quant(x), Wq) * scale + bias + residual) for a 4-D x in any layout, one kernel; an int8
    x is taken as already quantized (by x_scale), an int8 residual as quantized by residual_scale; with out_scale,
    y is quantized by it and returned as int8.

    weight_nk: int8 [C_out, KH * KW * C] (columns in (kh, kw, c) order); scale: float32 [C_out] (x_scale * w_scale);
    geometry: (kernel (KH, KW), strides, pads (top, left), dilations). The result is NCHW in shape and
    channels-last in memory; residual is read channels-last (made so when it is not)."""
    import torch

    (kh, kw), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geometry
    batch, channels, height, width = x.shape
    out_h = (height + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    out_channels = weight_nk.shape[0]
    y = torch.empty((batch, out_h, out_w, out_channels), dtype=torch.int8 if out_scale else out_dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    _launch(x, weight_nk, scale, bias, residual, y, (batch * out_h * out_w, height, width, out_h, out_w, channels),
            x.stride(), (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w), x_scale, (kh, kw), activation, config,
            out_scale, residual_scale)
    return y.permute(0, 3, 1, 2)


def gemm_int8(x, weight_nk, scale, bias, residual, x_scale: float, activation: str, out_dtype, config):
    """y = activation((quant(x) @ Wq^T) * scale + bias + residual) in one kernel; weight_nk int8 [N, K]."""
    import torch

    x = x if x.stride(-1) == 1 else x.contiguous()
    inner, out_features = x.shape[-1], weight_nk.shape[0]
    rows = x.numel() // inner if inner else 0
    flat = x.reshape(rows, inner)
    y = torch.empty((rows, out_features), dtype=out_dtype, device=x.device)
    if residual is not None:
        residual = residual.reshape(rows, out_features).contiguous()
    _launch(flat, weight_nk, scale, bias, residual, y, (rows, 1, 1, 1, 1, inner), (flat.stride(0), 1, 0, 0),
            (1, 1, 0, 0, 1, 1), x_scale, (1, 1), activation, config)
    return y.reshape(*x.shape[:-1], out_features)


def _launch(x, weight_nk, scale, bias, residual, y, sizes, strides, geometry, x_scale, kernel, activation, config,
            out_scale=None, residual_scale=None):
    import torch

    block_m, block_n, block_k, warps, stages = config[:5]
    split_k = config[5] if len(config) > 5 else 1
    pixels, height, width, out_h, out_w, channels = sizes
    out_channels, k_total = weight_nk.shape
    tiles = triton.cdiv(pixels, block_m) * triton.cdiv(out_channels, block_n)
    packed = packs(channels, kernel)
    steps = triton.cdiv(k_total, block_k) if packed else kernel[0] * kernel[1] * triton.cdiv(channels, block_k)
    partial = torch.empty((split_k, pixels, out_channels), dtype=torch.int32, device=y.device) if split_k > 1 else y
    bias_arg, residual_arg = bias if bias is not None else scale, residual if residual is not None else y
    flags = {"QUANTIZED_OUTPUT": y.dtype == torch.int8, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
             "QUANTIZED_RESIDUAL": residual is not None and residual.dtype == torch.int8,
             "ACTIVATION": ACTIVATION_CODES[activation]}
    scales = (1.0 / out_scale if out_scale else 1.0, residual_scale or 1.0)
    _start(_conv_int8_kernel, (tiles, split_k), x, weight_nk, scale, bias_arg, residual_arg, y, partial, pixels, height,
           width, out_h, out_w, channels, out_channels, k_total, *strides, *geometry, 1.0 / x_scale, *scales,
           KH=kernel[0], KW=kernel[1], CHANNEL_STEPS=triton.cdiv(channels, block_k), PACKED=packed, STEPS=steps,
           SPLIT_K=split_k, SPLIT_STEPS=triton.cdiv(steps, split_k), QUANTIZED_INPUT=x.dtype == torch.int8, **flags,
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    if split_k > 1:
        grid = (triton.cdiv(pixels, SPLIT_EPILOGUE[0]) * triton.cdiv(out_channels, SPLIT_EPILOGUE[1]),)
        _start(_split_k_epilogue_kernel, grid, partial, scale, bias_arg, residual_arg, y, pixels, out_channels, *scales,
               SPLIT_K=split_k, **flags, BLOCK_M=SPLIT_EPILOGUE[0], BLOCK_N=SPLIT_EPILOGUE[1], num_warps=4)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the TMA pointwise kernel below
POINTWISE_CONFIGS = ((128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3))


@triton.jit
def _pointwise_int8_kernel(a_desc, b_desc, y_desc, r_desc, scale_ptr, bias_ptr, out_channels, inverse_out_scale,
                           residual_scale, K_STEPS: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a 1x1 convolution on int8 channels-last pixels is a plain [pixels, C] x [C, C_out] product: every operand,
    # the residual and the output move by TMA (tiles past the edges load zeros and are not stored)
    column_tiles = tl.cdiv(out_channels, BLOCK_N)
    row = (tl.program_id(0) // column_tiles) * BLOCK_M
    col = (tl.program_id(0) % column_tiles) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(K_STEPS):
        a = a_desc.load([row, step * BLOCK_K])
        b = b_desc.load([col, step * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    cols = col + tl.arange(0, BLOCK_N)
    residual = acc  # read only with HAS_RESIDUAL
    if HAS_RESIDUAL:
        residual = r_desc.load([row, col])
    y = _epilogue(acc, cols, cols < out_channels, scale_ptr, bias_ptr, residual, inverse_out_scale, residual_scale,
                  HAS_BIAS, HAS_RESIDUAL, QUANTIZED_RESIDUAL, ACTIVATION, QUANTIZED_OUTPUT)
    y_desc.store([row, col], y.to(y_desc.dtype))


def pointwise_applies(channels: int, out_channels: int, out_dtype) -> bool:
    """TMA needs 16-byte aligned rows: int8 pixels of `channels`, outputs of `out_channels` in out_dtype."""
    import torch

    width = 1 if out_dtype == torch.int8 else torch.empty((), dtype=out_dtype).element_size()
    return channels % 16 == 0 and (out_channels * width) % 16 == 0 and out_channels % 16 == 0


def pointwise_int8(x, weight_nk, scale, bias, residual, x_scale: float, geometry, activation: str, out_dtype, config,
                   out_scale: float | None = None, residual_scale: float | None = None):
    """conv_int8 for an int8 x (already quantized: x_scale is in `scale`) and a stride-1 unpadded 1x1 geometry, as one
    TMA int8 GEMM over its pixels: y = activation(x @ Wq^T * scale + bias + residual), int8 in out_scale when given.
    The result is NCHW in shape and channels-last in memory, as conv_int8's."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, warps, stages = config
    batch, channels, height, width = x.shape
    out_channels = weight_nk.shape[0]
    pixels = batch * height * width
    rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(pixels, channels)
    y = torch.empty((pixels, out_channels), dtype=torch.int8 if out_scale else out_dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(pixels, out_channels)
    a_desc = TensorDescriptor.from_tensor(rows, [block_m, block_k])
    b_desc = TensorDescriptor.from_tensor(weight_nk, [block_n, block_k])
    y_desc = TensorDescriptor.from_tensor(y, [block_m, block_n])
    r_desc = TensorDescriptor.from_tensor(residual, [block_m, block_n]) if residual is not None else y_desc
    grid = (triton.cdiv(pixels, block_m) * triton.cdiv(out_channels, block_n),)
    _start(_pointwise_int8_kernel, grid, a_desc, b_desc, y_desc, r_desc, scale, bias if bias is not None else scale,
           out_channels, 1.0 / out_scale if out_scale else 1.0, residual_scale or 1.0,
           K_STEPS=triton.cdiv(channels, block_k), QUANTIZED_OUTPUT=y.dtype == torch.int8, HAS_BIAS=bias is not None,
           HAS_RESIDUAL=residual is not None, QUANTIZED_RESIDUAL=residual is not None and residual.dtype == torch.int8,
           ACTIVATION=ACTIVATION_CODES[activation], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
           num_warps=warps, num_stages=stages)
    return y.view(batch, height, width, out_channels).permute(0, 3, 1, 2)


# (TILE_H, TILE_W, BLOCK_N, BLOCK_K, warps, stages) of the TMA convolution below: a tile of output pixels is a
# TILE_H x TILE_W window of one image
WINDOW_CONFIGS = ((8, 16, 64, 64, 4, 3), (8, 16, 128, 64, 8, 3), (16, 8, 128, 64, 8, 3), (8, 8, 128, 64, 4, 3))


@triton.jit
def _window_conv_int8_kernel(x_desc, w_desc, y_desc, r_desc, scale_ptr, bias_ptr, out_h, out_w, channels, out_channels,
                             pad_h, pad_w, inverse_out_scale, residual_scale, KH: tl.constexpr, KW: tl.constexpr,
                             CHANNEL_STEPS: tl.constexpr, QUANTIZED_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, QUANTIZED_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                             TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    # a stride-1 convolution on int8 channels-last pixels, each tap's operand a 4-D TMA box of the input
    # [1, TILE_H, TILE_W, BLOCK_K] shifted by the tap: the box's parts outside the image (the padding) and past the
    # channels load as zeros, so no masks; weight columns past a tap's channels meet those zeros
    column_tiles = tl.cdiv(out_channels, BLOCK_N)
    tiles_w = tl.cdiv(out_w, TILE_W)
    tiles_h = tl.cdiv(out_h, TILE_H)
    pid = tl.program_id(0)
    col = (pid % column_tiles) * BLOCK_N
    tile = pid // column_tiles
    ow = (tile % tiles_w) * TILE_W
    oh = ((tile // tiles_w) % tiles_h) * TILE_H
    image = tile // (tiles_w * tiles_h)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for step in range(KH * KW * CHANNEL_STEPS):
        tap = step // CHANNEL_STEPS
        c = (step - tap * CHANNEL_STEPS) * BLOCK_K
        kh = tap // KW
        a = x_desc.load([image, oh + kh - pad_h, ow + (tap - kh * KW) - pad_w, c]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([col, tap * channels + c])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    cols = col + tl.arange(0, BLOCK_N)
    residual = acc  # read only with HAS_RESIDUAL
    if HAS_RESIDUAL:
        residual = r_desc.load([image, oh, ow, col]).reshape(BLOCK_M, BLOCK_N)
    y = _epilogue(acc, cols, cols < out_channels, scale_ptr, bias_ptr, residual, inverse_out_scale, residual_scale,
                  HAS_BIAS, HAS_RESIDUAL, QUANTIZED_RESIDUAL, ACTIVATION, QUANTIZED_OUTPUT)
    y_desc.store([image, oh, ow, col], y.to(y_desc.dtype).reshape(1, TILE_H, TILE_W, BLOCK_N))


def window_applies(channels: int, out_channels: int, out_dtype, geometry) -> bool:
    """The TMA window convolution runs stride-1, undilated convolutions whose rows are 16-byte aligned."""
    (kh, kw), strides, _, dilations = geometry
    return tuple(strides) == (1, 1) and tuple(dilations) == (1, 1) and (kh, kw) != (1, 1) \
        and pointwise_applies(channels, out_channels, out_dtype) and (kh * kw * channels) % 16 == 0


def window_conv_int8(x, weight_nk, scale, bias, residual, x_scale: float, geometry, activation: str, out_dtype, config,
                     out_scale: float | None = None, residual_scale: float | None = None):
    """conv_int8 for an int8 x (already quantized: x_scale is in `scale`) and a stride-1 geometry, by TMA windows."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    tile_h, tile_w, block_n, block_k, warps, stages = config
    (kh, kw), _, (pad_h, pad_w), _ = geometry
    batch, channels, height, width = x.shape
    out_h, out_w = height + 2 * pad_h - kh + 1, width + 2 * pad_w - kw + 1
    out_channels = weight_nk.shape[0]
    pixels = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    y = torch.empty((batch, out_h, out_w, out_channels), dtype=torch.int8 if out_scale else out_dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    x_desc = TensorDescriptor.from_tensor(pixels, [1, tile_h, tile_w, block_k])
    w_desc = TensorDescriptor.from_tensor(weight_nk, [block_n, block_k])
    y_desc = TensorDescriptor.from_tensor(y, [1, tile_h, tile_w, block_n])
    r_desc = TensorDescriptor.from_tensor(residual, [1, tile_h, tile_w, block_n]) if residual is not None else y_desc
    grid = (batch * triton.cdiv(out_h, tile_h) * triton.cdiv(out_w, tile_w) * triton.cdiv(out_channels, block_n),)
    _start(_window_conv_int8_kernel, grid, x_desc, w_desc, y_desc, r_desc, scale, bias if bias is not None else scale,
           out_h, out_w, channels, out_channels, pad_h, pad_w, 1.0 / out_scale if out_scale else 1.0,
           residual_scale or 1.0, KH=kh, KW=kw, CHANNEL_STEPS=triton.cdiv(channels, block_k),
           QUANTIZED_OUTPUT=y.dtype == torch.int8, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
           QUANTIZED_RESIDUAL=residual is not None and residual.dtype == torch.int8,
           ACTIVATION=ACTIVATION_CODES[activation], TILE_H=tile_h, TILE_W=tile_w, BLOCK_M=tile_h * tile_w,
           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y.permute(0, 3, 1, 2)


def conv_kernels(channels: int, out_channels: int, geometry, int8_input: bool, out_dtype,
                 pixels: int | None = None) -> list[tuple]:
    """(kind, block configuration, kernel) of each Triton int8 convolution the tactic chooser times for this shape:
    the implicit-GEMM kernel, split-K where its output (pixels of it) makes fewer tiles than the GPU has
    multiprocessors and the reduction is long; on int8 input at stride 1, the TMA 1x1 GEMM or window convolution
    where rows are 16-byte aligned. Every kernel takes conv_int8's arguments."""
    kernel, strides, pads, _ = geometry
    kinds = [("implicit-gemm", conv_configs(channels, kernel))]
    reduction = kernel[0] * kernel[1] * channels
    if pixels is not None and -(-pixels // 64) * -(-out_channels // 64) < FEW_TILES and reduction >= 1024 \
            and not packs(channels, kernel):
        kinds.append(("split-k", SPLIT_CONFIGS))
    if int8_input and tuple(kernel) == (1, 1) and tuple(strides) == (1, 1) and not any(pads) \
            and pointwise_applies(channels, out_channels, out_dtype):
        kinds.append(("tma-1x1", POINTWISE_CONFIGS))
    if int8_input and window_applies(channels, out_channels, out_dtype, geometry):
        kinds.append(("tma-window", WINDOW_CONFIGS))
    return [(kind, config, CONV_KERNELS[kind]) for kind, configs in kinds for config in configs]


CONV_KERNELS = {"implicit-gemm": conv_int8, "split-k": conv_int8, "tma-1x1": pointwise_int8, "tma-window": window_conv_int8}


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
