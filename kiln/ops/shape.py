"""Shape and data-movement operators: reshape, transpose, concat, slice, gather, cast, constants."""
from __future__ import annotations

import numpy as np
import torch

from ..ir.dtypes import CARRIED, DType, to_torch
from ..tensors import numpy_to_torch
from .registry import register


def ints(t) -> list[int]:
    """A small tensor of sizes or indices as a Python list."""
    return [int(v) for v in t.reshape(-1).tolist()]


@register("Reshape", since=14)
def reshape(x, shape, *, allowzero=0):
    target = ints(shape)
    if not allowzero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


register("Reshape", since=5)(lambda x, shape: reshape(x, shape))


@register("Flatten", since=13)
def flatten(x, *, axis=1):
    axis = axis + x.dim() if axis < 0 else axis  # axis == rank is valid: (all, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@register("Transpose", since=13)
def transpose(x, *, perm=None):
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


@register("Concat", since=13)
def concat(*inputs, axis):
    return torch.cat(inputs, dim=axis)


@register("Squeeze", since=13)
def squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in ints(axes)))


@register("Squeeze", since=1)
def squeeze_1(x, *, axes=None):
    return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))


@register("Unsqueeze", since=13)
def unsqueeze(x, axes):
    return _unsqueeze(x, ints(axes))


@register("Unsqueeze", since=1)
def unsqueeze_1(x, *, axes):
    return _unsqueeze(x, axes)


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return x.reshape(shape)


@register("Split", since=18)
def split(x, sizes=None, *, axis=0, num_outputs=None, _num_outputs):
    length = x.shape[axis]
    if sizes is not None:
        parts = ints(sizes)
    else:
        count = num_outputs or _num_outputs
        chunk = -(-length // count)
        parts = [chunk] * (length // chunk) + ([length % chunk] if length % chunk else [])
    return tuple(torch.split(x, parts, dim=axis))


@register("Split", since=13)
def split_13(x, sizes=None, *, axis=0, _num_outputs):
    return split(x, sizes, axis=axis, num_outputs=_num_outputs, _num_outputs=_num_outputs)


@register("Slice", since=13)
def slice_(x, starts, ends, axes=None, steps=None):
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, max(start, end), step)
        else:
            # Walk backwards by flipping the axis: position p becomes size - 1 - p.
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            flips.append(axis)
            new_start, new_end = size - 1 - start, size - 1 - end
            index[axis] = slice(new_start, max(new_start, new_end), -step)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def _positive(indices, size):
    return torch.where(indices < 0, indices + size, indices)


@register("Gather", since=13)
def gather(x, indices, *, axis=0):
    axis %= x.dim()
    indices = _positive(indices.to(torch.int64), x.shape[axis])
    picked = torch.index_select(x, axis, indices.reshape(-1))
    return picked.reshape(tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1:]))


@register("GatherElements", since=13)
def gather_elements(x, indices, *, axis=0):
    axis %= x.dim()
    return torch.gather(x, axis, _positive(indices.to(torch.int64), x.shape[axis]))


@register("Shape", since=15)
def shape(x, *, start=0, end=None):
    dims = list(x.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64)


@register("Size", since=13)
def size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@register("Expand", since=13)
def expand(x, shape):
    target = ints(shape)
    rank = max(len(target), x.dim())
    target = [1] * (rank - len(target)) + target
    current = [1] * (rank - x.dim()) + list(x.shape)
    final = [c if t == 1 else t for c, t in zip(current, target)]
    return x.reshape(current).expand(final).contiguous()


@register("Tile", since=13)
def tile(x, repeats):
    return x.repeat(ints(repeats))


@register("ConstantOfShape", since=9)
def constant_of_shape(shape, *, value=None):
    fill = numpy_to_torch(value) if value is not None else torch.zeros(1, dtype=torch.float32)
    return fill.reshape(()).expand(ints(shape)).contiguous() if ints(shape) else torch.full((), fill.item(), dtype=fill.dtype)


@register("Constant", since=13)
def constant(*, value=None, value_float=None, value_floats=None, value_int=None, value_ints=None, sparse_value=None):
    if value is not None:
        return numpy_to_torch(value)
    if value_float is not None:
        return torch.tensor(value_float, dtype=torch.float32)
    if value_floats is not None:
        return torch.tensor(value_floats, dtype=torch.float32)
    if value_int is not None:
        return torch.tensor(value_int, dtype=torch.int64)
    if value_ints is not None:
        return torch.tensor(value_ints, dtype=torch.int64)
    raise AssertionError("Constant without a value")


@register("Cast", since=13)
def cast(x, *, to, saturate=1, round_mode="up"):
    dtype = DType.from_onnx(to)
    if dtype in CARRIED or dtype in _FLOAT8:
        return _cast_through_numpy(x, dtype, saturate, round_mode)
    target = to_torch(dtype)
    if x.is_floating_point() and not target.is_floating_point and target != torch.bool:
        x = torch.trunc(x)
    return x.to(target)


_FLOAT8 = (DType.float8e4m3fn, DType.float8e4m3fnuz, DType.float8e5m2, DType.float8e5m2fnuz)


def _cast_through_numpy(x, dtype: DType, saturate, round_mode):
    """Casts into float8 and the carried types (int4, float4, ...) with ml_dtypes' rounding, as ONNX's reference casts.

    saturate=1 clamps out-of-range values (infinities included) to the type's largest finite value first.
    """
    import ml_dtypes

    from ..ir.dtypes import to_numpy
    from ..tensors import numpy_to_torch

    target = to_numpy(dtype)
    source = x.to(torch.float32) if x.is_floating_point() and x.dtype != torch.float64 else x
    array = source.numpy()
    if dtype == DType.float8e8m0:
        return numpy_to_torch(_to_e8m0(array.astype(np.float32), saturate, round_mode))
    if saturate and dtype in _FLOAT8 + (DType.float4e2m1,) and array.dtype.kind == "f":
        largest = float(ml_dtypes.finfo(target).max)
        array = np.where(np.isnan(array), array, np.clip(array, -largest, largest))
    return numpy_to_torch(array.astype(target))


def _to_e8m0(array, saturate, round_mode):
    """float32 to float8 e8m0 (a bare exponent): ONNX rounds the mantissa up, down or to nearest."""
    import ml_dtypes

    bits = array.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint32)
    mantissa = bits & 0x7FFFFF
    if round_mode == "up":
        exponent = exponent + ((mantissa > 0) & (exponent < 254))
    elif round_mode == "nearest":
        exponent = exponent + (((mantissa >> 22) & 1).astype(bool) & (exponent < 254))
    special = np.isnan(array) | (np.isinf(array) & (not saturate))
    exponent = np.where(np.isinf(array) & bool(saturate), 254, exponent)
    exponent = np.where(special, 255, exponent)
    return exponent.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


@register("CastLike", since=15)
def cast_like(x, like, *, saturate=1, round_mode="up"):
    if like.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz):
        from ..ir.dtypes import from_torch

        return _cast_through_numpy(x, from_torch(like.dtype), saturate, round_mode)
    return x.to(like.dtype)


@register("Range", since=11)
def range_(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@register("Pad", since=18)
def pad(x, pads, constant_value=None, axes=None, *, mode="constant"):
    pads = ints(pads)
    rank = x.dim()
    axes = [a % rank for a in ints(axes)] if axes is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
    order = []
    for axis in reversed(range(rank)):
        order += [full[axis], full[axis + rank]]
    if mode == "constant":
        fill = constant_value.item() if constant_value is not None and constant_value.numel() else 0
        return torch.nn.functional.pad(x, order, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    # torch pads only the trailing spatial axes in these modes; move padded axes last via a batch view.
    source = x if x.is_floating_point() else x.to(torch.float64)
    padded_axes = [a for a in range(rank) if full[a] or full[a + rank]]
    if not padded_axes:
        return x.clone()
    keep = [a for a in range(rank) if a not in padded_axes]
    moved = source.permute(keep + padded_axes)
    lead = moved.shape[:len(keep)]
    flat = moved.reshape((1, -1) + tuple(moved.shape[len(keep):]))
    flat_order = []
    for axis in reversed(padded_axes):
        flat_order += [full[axis], full[axis + rank]]
    result = torch.nn.functional.pad(flat, flat_order, mode=torch_mode)
    result = result.reshape(tuple(lead) + tuple(result.shape[2:]))
    inverse = np.argsort(keep + padded_axes).tolist()
    return result.permute(inverse).to(x.dtype).contiguous()


@register("Trilu", since=14)
def trilu(x, k=None, *, upper=1):
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


@register("Einsum", since=12)
def einsum(*inputs, equation):
    return torch.einsum(equation.replace(" ", ""), *inputs)


@register("DepthToSpace", since=13)
def depth_to_space(x, *, blocksize, mode="DCR"):
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("SpaceToDepth", since=13)
def space_to_depth(x, *, blocksize):
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)
