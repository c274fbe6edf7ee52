"""Inputs for running engines: fixed-seed random feeds for bindings, and feeds read from .npy/.npz files."""
from __future__ import annotations

import numpy as np

from ..errors import BindingError
from ..ir import DType
from ..ir.dtypes import to_numpy


def concrete_shape(binding, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
    """A runnable shape for `binding`: symbolic dims from `sizes`, else 1."""
    sizes = sizes or {}
    if binding.shape is None:
        raise BindingError(f"input {binding.name!r} has unknown rank; give it as a file", code="KILN-E404", where=binding.name,
                           hint=f"--input {binding.name}=array.npy")
    return tuple(d if isinstance(d, int) else sizes.get(d, 1) if isinstance(d, str) else 1 for d in binding.shape)


def random_array(dtype: DType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == DType.bool:
        return rng.random(shape) < 0.5
    if dtype.is_float:
        return rng.standard_normal(shape).astype(to_numpy(dtype))
    # Small non-negative integers: valid as indices, token ids and counts in most models.
    return rng.integers(0, 4, size=shape).astype(to_numpy(dtype))


def random_feed(bindings, seed: int = 0, sizes: dict[str, int] | None = None, shapes: dict[str, tuple] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    return {b.name: random_array(b.dtype, tuple(shapes.get(b.name) or concrete_shape(b, sizes)), rng) for b in bindings}


def load_inputs(named_paths: dict[str, str]) -> dict[str, np.ndarray]:
    feed = {}
    for name, path in named_paths.items():
        try:
            feed[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise BindingError(f"cannot read input {name!r} from {path!r}: {error}", code="KILN-E402", where=name,
                               hint="give a .npy file written by numpy.save") from None
    return feed
