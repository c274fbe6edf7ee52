"""Random operators (RandomUniform/Normal and their -Like forms, Bernoulli, Multinomial), drawn with torch's generator.

They are registered nondeterministic, so constant folding never evaluates them at build time. A `seed` attribute
makes one node repeatable from run to run; the values differ from numpy's generator, which ONNX's test cases use.
"""
from __future__ import annotations

import torch

from .registry import register


def _generator(seed):
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def _dtype(dtype, default):
    if dtype is None:
        return default
    from ..ir.dtypes import DType, to_torch

    return to_torch(DType.from_onnx(dtype))


@register("RandomUniform", since=1, nondeterministic=True)
def random_uniform(*, dtype=1, high=1.0, low=0.0, seed=None, shape):
    values = torch.rand(list(shape), generator=_generator(seed), dtype=torch.float64)
    return (low + (high - low) * values).to(_dtype(dtype, torch.float32))


@register("RandomNormal", since=1, nondeterministic=True)
def random_normal(*, dtype=1, mean=0.0, scale=1.0, seed=None, shape):
    values = torch.randn(list(shape), generator=_generator(seed), dtype=torch.float64)
    return (mean + scale * values).to(_dtype(dtype, torch.float32))


@register("RandomUniformLike", since=1, nondeterministic=True)
def random_uniform_like(x, *, dtype=None, high=1.0, low=0.0, seed=None):
    values = torch.rand(tuple(x.shape), generator=_generator(seed), dtype=torch.float64)
    return (low + (high - low) * values).to(_dtype(dtype, x.dtype))


@register("RandomNormalLike", since=1, nondeterministic=True)
def random_normal_like(x, *, dtype=None, mean=0.0, scale=1.0, seed=None):
    values = torch.randn(tuple(x.shape), generator=_generator(seed), dtype=torch.float64)
    return (mean + scale * values).to(_dtype(dtype, x.dtype))


@register("Bernoulli", since=15, nondeterministic=True)
def bernoulli(x, *, dtype=None, seed=None):
    return torch.bernoulli(x.double(), generator=_generator(seed)).to(_dtype(dtype, x.dtype))


@register("Multinomial", since=7, nondeterministic=True)
def multinomial(x, *, dtype=6, sample_size=1, seed=None):
    """`sample_size` class draws per batch row from the unnormalized log-probabilities `x`."""
    probabilities = torch.softmax(x.double(), dim=-1)
    draws = torch.multinomial(probabilities, sample_size, replacement=True, generator=_generator(seed))
    return draws.to(_dtype(dtype, torch.int32))
