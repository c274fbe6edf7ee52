"""Reductions and index-returning reductions: ReduceSum/Mean/Max/..., ArgMax/ArgMin, TopK."""
from __future__ import annotations

import math

import torch

from .registry import register
from .shape import ints


def _axes(x, axes, noop_with_empty_axes):
    if axes is None or len(axes) == 0:
        return None if not noop_with_empty_axes else ()
    return tuple(a % max(x.dim(), 1) for a in axes)


def _reduction(fn):
    """An ONNX reduction from a torch function over `dims` (None: every axis)."""

    def from_input(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return _apply(x, _axes(x, ints(axes) if axes is not None else None, noop_with_empty_axes), keepdims)

    def from_attribute(x, *, axes=None, keepdims=1):
        return _apply(x, _axes(x, axes, 0), keepdims)

    def _apply(x, dims, keepdims):
        if dims == ():
            return x
        if dims is None:
            dims = tuple(range(x.dim()))
        if x.dim() == 0:
            return fn(x, ())
        result = fn(x, dims)
        return result if not keepdims else result.reshape([1 if i in dims else s for i, s in enumerate(x.shape)])

    return from_input, from_attribute


_REDUCTIONS = {
    "ReduceSum": (lambda x, d: torch.sum(x, dim=d) if d else x, 13),
    "ReduceMean": (lambda x, d: torch.mean(x, dim=d) if d else x, 18),
    "ReduceMax": (lambda x, d: _extreme(x, d, torch.amax, -1), 18),
    "ReduceMin": (lambda x, d: _extreme(x, d, torch.amin, 1), 18),
    "ReduceProd": (lambda x, d: _prod(x, d), 18),
    "ReduceL1": (lambda x, d: torch.sum(torch.abs(x), dim=d) if d else torch.abs(x), 18),
    "ReduceL2": (lambda x, d: torch.sqrt(torch.sum(x * x, dim=d)) if d else torch.abs(x), 18),
    "ReduceSumSquare": (lambda x, d: torch.sum(x * x, dim=d) if d else x * x, 18),
    "ReduceLogSum": (lambda x, d: torch.log(torch.sum(x, dim=d)) if d else torch.log(x), 18),
    "ReduceLogSumExp": (lambda x, d: torch.logsumexp(x, dim=d) if d else x, 18),
}


def _extreme(x, dims, fn, sign):
    """Max/min; over an empty set ONNX gives the identity (-inf for max, +inf for min; the type's limit for ints)."""
    if not dims:
        return x
    if any(x.shape[d] == 0 for d in dims):
        shape = [s for i, s in enumerate(x.shape) if i not in dims]
        if x.dtype == torch.bool:
            return torch.full(shape, sign > 0, dtype=torch.bool)
        limit = (torch.finfo if x.is_floating_point() else torch.iinfo)(x.dtype)
        value = (math.inf * sign) if x.is_floating_point() else (limit.max if sign > 0 else limit.min)
        return torch.full(shape, value, dtype=x.dtype)
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return fn(x.to(torch.int64), dim=dims).to(x.dtype)
    return fn(x, dim=dims)


def _prod(x, dims):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d)
    return x


for _op, (_fn, _since) in _REDUCTIONS.items():
    _from_input, _from_attribute = _reduction(_fn)
    register(_op, since=_since)(_from_input)
    register(_op, since=1)(_from_attribute)


def _arg(fn):
    def kernel(x, *, axis=0, keepdims=1, select_last_index=0):
        source = torch.flip(x, [axis]) if select_last_index else x
        index = fn(source, dim=axis, keepdim=bool(keepdims))
        if select_last_index:
            index = x.shape[axis] - 1 - index
        return index.to(torch.int64)

    return kernel


register("ArgMax", since=13)(_arg(torch.argmax))
register("ArgMin", since=13)(_arg(torch.argmin))


@register("TopK", since=11)
def top_k(x, k, *, axis=-1, largest=1, sorted=1):  # noqa: A002 (ONNX's name)
    # A stable sort keeps equal values in index order, as ONNX requires (torch.topk does not promise it).
    count = int(k.reshape(-1)[0])
    source = x.to(torch.int64) if x.dtype in (torch.uint16, torch.uint32, torch.uint64) else x
    values, indices = torch.sort(source, dim=axis, descending=bool(largest), stable=True)
    return values.narrow(axis, 0, count).to(x.dtype), indices.narrow(axis, 0, count).to(torch.int64)


@register("CumSum", since=14)
def cum_sum(x, axis, *, exclusive=0, reverse=0):
    dim = int(axis.reshape(-1)[0])
    source = torch.flip(x, [dim]) if reverse else x
    result = torch.cumsum(source, dim=dim).to(x.dtype)
    if exclusive:
        result = result - source
    return torch.flip(result, [dim]) if reverse else result
