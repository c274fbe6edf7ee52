"""Neural-network layers: convolution, pooling, normalization, softmax, dropout."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .registry import register


def resolve_pads(auto_pad: str, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int],
                 pads: list[int] | None, ceil_mode: int = 0) -> list[int]:
    """ONNX pads [begin..., end...] for every spatial axis, honouring auto_pad."""
    rank = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    return list(pads) if pads else [0] * (2 * rank)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] to torch's F.pad order (last axis first)."""
    rank = len(pads) // 2
    order = []
    for axis in reversed(range(rank)):
        order += [pads[axis], pads[axis + rank]]
    return order


def _defaults(x, kernel_shape, strides, dilations):
    rank = x.dim() - 2
    return list(strides or [1] * rank), list(dilations or [1] * rank), list(kernel_shape)


@register("Conv", since=11)
def conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    rank = x.dim() - 2
    kernel_shape = kernel_shape or list(w.shape[2:])
    strides, dilations, kernel_shape = _defaults(x, kernel_shape, strides, dilations)
    full = resolve_pads(auto_pad, list(x.shape[2:]), kernel_shape, strides, dilations, pads)
    begin, end = full[:rank], full[rank:]
    if begin != end:
        x = F.pad(x, _torch_pad(full))
        begin = [0] * rank
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return fn(x, w, b, strides, begin, dilations, group)


@register("ConvTranspose", since=11)
def conv_transpose(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                   output_padding=None, output_shape=None, pads=None, strides=None):
    rank = x.dim() - 2
    kernel_shape = list(kernel_shape or w.shape[2:])
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    output_padding = list(output_padding or [0] * rank)
    spatial = list(x.shape[2:])
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape[-rank:]) if output_shape is not None else [s * st for s, st in zip(spatial, strides)]
        begin, end = [], []
        for i in range(rank):
            total = strides[i] * (spatial[i] - 1) + output_padding[i] + ((kernel_shape[i] - 1) * dilations[i] + 1) - target[i]
            if total < 0:  # output_shape asks for more than the kernel covers: zeros added at the end
                begin.append(0)
                end.append(total)
                continue
            if auto_pad == "SAME_UPPER" or (output_shape is not None and auto_pad != "SAME_LOWER"):
                begin.append(total // 2)
                end.append(total - total // 2)
            else:
                begin.append(total - total // 2)
                end.append(total // 2)
        full = begin + end
    else:
        full = list(pads) if pads else [0] * (2 * rank)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    y = fn(x, w, b, strides, 0, output_padding, group, dilations)
    return F.pad(y, _torch_pad([-p for p in full]))  # negative pads crop, positive ones add zeros


def _pool_output_pads(spatial, kernel, strides, dilations, pads, ceil_mode):
    """Extra end padding so that floor division in torch reproduces ONNX's ceil_mode sizes."""
    rank = len(spatial)
    extra = []
    for i in range(rank):
        effective = (kernel[i] - 1) * dilations[i] + 1
        padded = spatial[i] + pads[i] + pads[i + rank]
        rounding = math.ceil if ceil_mode else math.floor
        out = rounding((padded - effective) / strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= spatial[i] + pads[i]:
            out -= 1  # the last window must start inside the input or the begin padding
        extra.append(max((out - 1) * strides[i] + effective - padded, 0))
    return extra


@register("MaxPool", since=12)
def max_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, pads=None, storage_order=0,
             strides=None, _num_outputs=1):
    rank = x.dim() - 2
    strides, dilations, kernel_shape = _defaults(x, kernel_shape, strides, dilations)
    full = resolve_pads(auto_pad, list(x.shape[2:]), kernel_shape, strides, dilations, pads)
    extra = _pool_output_pads(list(x.shape[2:]), kernel_shape, strides, dilations, full, ceil_mode)
    full = full[:rank] + [e + x for e, x in zip(extra, full[rank:])]
    fill = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
    source = x if x.is_floating_point() else x.to(torch.float64)
    padded = F.pad(source, _torch_pad(full), value=fill)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    if _num_outputs == 1:
        return fn(padded, kernel_shape, strides, 0, dilations).to(x.dtype)
    y, where = fn(padded, kernel_shape, strides, 0, dilations, return_indices=True)
    # torch indexes the padded plane; ONNX indexes the unpadded tensor, batch and channel included.
    plane = list(padded.shape[2:])
    coordinates = []
    for size in reversed(plane):
        coordinates.insert(0, where % size)
        where = where // size
    coordinates = [c - full[i] for i, c in enumerate(coordinates)]
    spatial = list(x.shape[2:])
    order = list(range(rank)) if not storage_order else list(reversed(range(rank)))
    flat = torch.zeros_like(coordinates[0])
    for axis in order:
        flat = flat * spatial[axis] + coordinates[axis]
    channel = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *([1] * rank))
    return y.to(x.dtype), flat + channel * int(np.prod(spatial))


@register("AveragePool", since=19)
def average_pool(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape,
                 pads=None, strides=None):
    rank = x.dim() - 2
    strides, dilations, kernel_shape = _defaults(x, kernel_shape, strides, dilations)
    full = resolve_pads(auto_pad, list(x.shape[2:]), kernel_shape, strides, dilations, pads)
    extra = _pool_output_pads(list(x.shape[2:]), kernel_shape, strides, dilations, full, ceil_mode)
    with_extra = full[:rank] + [e + p for e, p in zip(extra, full[rank:])]
    if dilations == [1] * rank and full[:rank] == full[rank:] and all(p * 2 <= k for p, k in zip(full[:rank], kernel_shape)):
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
        return fn(x, kernel_shape, strides, full[:rank], bool(ceil_mode), bool(count_include_pad))
    # General case: sum over a zero-padded input, divided by the count of the cells that count.
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    counted = F.pad(ones, _torch_pad(full), value=1.0 if count_include_pad else 0.0)
    counted = F.pad(counted, _torch_pad([0] * rank + extra), value=0.0)
    padded = F.pad(x, _torch_pad(with_extra))
    weight = torch.ones((1, 1) + tuple(kernel_shape), dtype=x.dtype)
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    channels = x.shape[1]
    sums = conv_fn(padded.reshape((-1, 1) + tuple(padded.shape[2:])), weight, None, strides, 0, dilations)
    counts = conv_fn(counted, weight, None, strides, 0, dilations)
    sums = sums.reshape((x.shape[0], channels) + tuple(sums.shape[2:]))
    return sums / counts


register("AveragePool", since=11)(average_pool)


@register("GlobalAveragePool", since=1)
def global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register("BatchNormalization", since=15)
def batch_normalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, _num_outputs=1):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if training_mode:  # normalize with the batch's statistics; also return the updated running ones
        dims = [0] + list(range(2, x.dim()))
        batch_mean, batch_var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        y = (x - batch_mean.reshape(shape)) / torch.sqrt(batch_var.reshape(shape) + epsilon) * scale.reshape(shape)
        y = y + bias.reshape(shape)
        running = (mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum))
        return (y,) + running[: _num_outputs - 1] if _num_outputs > 1 else y
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape).to(x.dtype) + epsilon)
    return (x - mean.reshape(shape).to(x.dtype)) * inv + bias.reshape(shape)


register("BatchNormalization", since=14)(batch_normalization)


@register("InstanceNormalization", since=6)
def instance_normalization(x, scale, bias, *, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


@register("LRN", since=13)
def lrn(x, *, alpha=0.0001, beta=0.75, bias=1.0, size):
    """x / (bias + alpha / size * (sum of x² over `size` neighbouring channels)) ** beta, the window summed by
    adding shifted channel slices into one buffer (in x's own memory format, channels-last included)."""
    channels = x.shape[1]
    before = (size - 1) // 2
    square = x * x
    window = square.clone()
    for offset in range(-before, size - before):
        if 0 < offset < channels:
            window[:, :channels - offset].add_(square[:, offset:])
        elif 0 < -offset < channels:
            window[:, -offset:].add_(square[:, :channels + offset])
    denominator = window.mul_(alpha / size).add_(bias)
    if bias > 0 and alpha >= 0:  # a positive base: x * exp(-beta * log(base)), 4 times faster than torch's pow by a fraction
        return x * denominator.log_().mul_(-beta).exp_()
    return x / denominator ** beta


@register("LayerNormalization", since=17)
def layer_normalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, _num_outputs=1):
    axis = axis % x.dim()
    normalized = tuple(x.shape[axis:])
    if _num_outputs == 1 and scale.shape == normalized and (bias is None or bias.shape == normalized):
        return F.layer_norm(x, normalized, scale, bias, epsilon)
    # The statistics are computed (and returned, when asked for) in the stash type, float32 by default.
    stash = torch.float64 if stash_type == 11 or x.dtype == torch.float64 else torch.float32
    wide = x.to(stash)
    dims = tuple(range(axis, x.dim()))
    mean = wide.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((wide - mean) ** 2).mean(dim=dims, keepdim=True) + epsilon)
    y = ((wide - mean) * inv_std).to(x.dtype) * scale
    y = y + bias if bias is not None else y
    return (y, mean, inv_std)[:_num_outputs] if _num_outputs > 1 else y


@register("GroupNormalization", since=21)
def group_normalization(x, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    return F.group_norm(x, num_groups, scale, bias, epsilon)


def _softmax_13(fn):
    def kernel(x, *, axis=-1):
        return fn(x, dim=axis)

    return kernel


def _softmax_1(fn):
    def kernel(x, *, axis=1):
        axis = axis % x.dim() if x.dim() else 0
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return kernel


for _name, _fn in (("Softmax", torch.softmax), ("LogSoftmax", torch.log_softmax)):
    register(_name, since=1)(_softmax_1(_fn))
    register(_name, since=13)(_softmax_13(_fn))


@register("Hardmax", since=13)
def hardmax(x, *, axis=-1):
    return F.one_hot(x.argmax(dim=axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


@register("Dropout", since=12)
def dropout(x, ratio=None, training_mode=None, *, seed=None):
    return x, torch.ones_like(x, dtype=torch.bool)


@register("Dropout", since=7)
def dropout_7(x, *, ratio=0.5):
    return x, torch.ones_like(x, dtype=torch.bool)


@register("Gemm", since=11)
def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803 (ONNX's names)
    a = a.T if transA else a
    b = b.T if transB else b
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("MatMul", since=13)
def matmul(a, b):
    return torch.matmul(a, b)


@register("MeanVarianceNormalization", since=13)
def mean_variance_normalization(x, *, axes=(0, 2, 3)):
    """(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9), ONNX's function body computed directly."""
    dims = tuple(a % x.dim() for a in axes)
    mean = x.mean(dim=dims, keepdim=True)
    std = torch.sqrt((x * x).mean(dim=dims, keepdim=True) - mean * mean)
    return (x - mean) / (std + 1e-9)
