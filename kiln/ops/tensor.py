"""Indexing and data-dependent tensor operators: scatter/gather by index, OneHot, EyeLike, NonZero, Unique, Compress, ..."""
from __future__ import annotations

import numpy as np
import torch

from .registry import register


def _positive(indices, size):
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterElements", since=11)
def scatter_elements(x, indices, updates, *, axis=0, reduction="none"):
    axis %= x.dim()
    indices = _positive(indices, x.shape[axis])
    if reduction == "none":
        return x.scatter(axis, indices, updates)
    return x.scatter_reduce(axis, indices, updates, _REDUCE[reduction], include_self=True)


register("Scatter", since=9)(lambda x, indices, updates, *, axis=0: scatter_elements(x, indices, updates, axis=axis))


@register("ScatterND", since=11)
def scatter_nd(x, indices, updates, *, reduction="none"):
    result = x.clone()
    depth = indices.shape[-1]
    flat = _positive(indices.reshape(-1, depth), torch.tensor(x.shape[:depth]))
    updates = updates.reshape((flat.shape[0],) + tuple(x.shape[depth:]))
    for row, update in zip(flat.tolist(), updates):  # in order: later indices win, as ONNX's reference does
        where = tuple(row)
        if reduction == "none":
            result[where] = update
        elif reduction == "add":
            result[where] = result[where] + update
        elif reduction == "mul":
            result[where] = result[where] * update
        elif reduction == "max":
            result[where] = torch.maximum(result[where], update)
        else:
            result[where] = torch.minimum(result[where], update)
    return result


@register("GatherND", since=12)
def gather_nd(x, indices, *, batch_dims=0):
    batch = tuple(x.shape[:batch_dims])
    n = int(np.prod(batch)) if batch else 1
    depth = indices.shape[-1]
    xs = x.reshape((n,) + tuple(x.shape[batch_dims:]))
    idx = indices.reshape((n, -1, depth)).to(torch.int64)
    idx = torch.where(idx < 0, idx + torch.tensor(x.shape[batch_dims:batch_dims + depth]), idx)
    picked = torch.stack([xs[b][tuple(idx[b].T)] for b in range(n)])
    return picked.reshape(tuple(indices.shape[:-1]) + tuple(x.shape[batch_dims + depth:]))


@register("OneHot", since=11)
def one_hot(indices, depth, values, *, axis=-1):
    depth = int(depth.reshape(-1)[0].item())
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices + depth, indices)
    valid = (indices >= 0) & (indices < depth)
    hot = torch.nn.functional.one_hot(torch.where(valid, indices, 0), depth) & valid.unsqueeze(-1)
    axis = axis % (indices.dim() + 1)
    hot = torch.movedim(hot, -1, axis)
    return torch.where(hot.bool(), values[1], values[0])


@register("EyeLike", since=9)
def eye_like(x, *, dtype=None, k=0):
    from ..ir.dtypes import DType, to_torch

    target = to_torch(DType.from_onnx(dtype)) if dtype is not None else x.dtype
    rows, cols = x.shape
    eye = torch.zeros(rows, cols, dtype=torch.float64)
    r = torch.arange(rows)
    c = r + k
    keep = (c >= 0) & (c < cols)
    eye[r[keep], c[keep]] = 1
    return eye.to(target)


@register("NonZero", since=13)
def non_zero(x):
    return torch.nonzero(x.reshape(1) if x.dim() == 0 else x).T.contiguous().to(torch.int64)


@register("Compress", since=11)
def compress(x, condition, *, axis=None):
    keep = torch.nonzero(condition.to(torch.bool).reshape(-1)).reshape(-1)
    if axis is None:
        flat = x.reshape(-1)
        return flat[keep[keep < flat.numel()]]
    axis %= x.dim()
    return torch.index_select(x, axis, keep[keep < x.shape[axis]])


@register("Unique", since=11)
def unique(x, *, axis=None, sorted=1):  # noqa: A002 (ONNX's name)
    """ONNX's Unique: values (sorted, or in first-occurrence order), first indices, inverse indices, counts."""
    array = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()  # numpy has no bfloat16
    values, first, inverse, counts = np.unique(array, return_index=True, return_inverse=True, return_counts=True,
                                               axis=axis)
    if not sorted:  # reorder by first occurrence
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        values = np.take(values, order, axis=0 if axis is None else axis)
        first, counts, inverse = first[order], counts[order], rank[inverse.reshape(-1)]
    as_long = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64).reshape(-1))  # noqa: E731
    return torch.from_numpy(np.ascontiguousarray(values)).to(x.dtype), as_long(first), as_long(inverse), as_long(counts)


@register("ReverseSequence", since=10)
def reverse_sequence(x, lengths, *, batch_axis=1, time_axis=0):
    result = x.clone()
    for b, length in enumerate(lengths.tolist()):
        source = x.select(batch_axis, b)
        target = result.select(batch_axis, b)
        t = time_axis if time_axis < batch_axis else time_axis - 1
        target.narrow(t, 0, length).copy_(torch.flip(source.narrow(t, 0, length), [t]))
    return result


@register("CumProd", since=26)
def cum_prod(x, axis, *, exclusive=0, reverse=0):
    dim = int(axis.reshape(-1)[0])
    source = torch.flip(x, [dim]) if reverse else x
    if exclusive:
        ones = torch.ones_like(source.narrow(dim, 0, 1))
        source = torch.cat([ones, source.narrow(dim, 0, source.shape[dim] - 1)], dim)
    result = torch.cumprod(source, dim=dim).to(x.dtype)
    return torch.flip(result, [dim]) if reverse else result


@register("SpaceToDepth", since=26)
def space_to_depth(x, *, blocksize, mode="DCR"):
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("BitCast", since=26)
def bit_cast(x, *, to):
    from ..ir.dtypes import DType, to_torch

    return x.contiguous().view(to_torch(DType.from_onnx(to)))


@register("Det", since=11)
def det(x):
    return torch.linalg.det(x)


@register("TensorScatter", since=24)
def tensor_scatter(past, update, write_indices=None, *, axis=-2, mode="linear"):
    """Write `update` into the cache `past` along `axis`, from each batch entry's write index (circular: wrap)."""
    axis %= past.dim()
    result = past.clone()
    steps = update.shape[axis]
    size = past.shape[axis]
    for b in range(past.shape[0]):
        start = int(write_indices[b]) if write_indices is not None else 0
        for s in range(steps):
            position = (start + s) % size if mode == "circular" else start + s
            result[b].select(axis - 1, position).copy_(update[b].select(axis - 1, s))
    return result
