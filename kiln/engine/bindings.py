"""Input and output bindings, and the checks that feeds match them before anything runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BindingError
from ..ir import DType, Value
from ..ir.dtypes import from_numpy, from_torch


@dataclass(frozen=True)
class Binding:
    """One engine input or output: its name, dtype and shape (ints, or symbol names for dynamic dims)."""

    name: str
    dtype: DType
    shape: tuple
    kind: str = "tensor"  # or "sequence" (a list of tensors), "optional" (a tensor or None), "optional_sequence"

    @staticmethod
    def of(value: Value) -> "Binding":
        return Binding(value.name, value.dtype, tuple(value.shape) if value.shape is not None else None, value.kind)

    def __str__(self) -> str:
        shape = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"
        text = f"{self.dtype.name if self.dtype else '?'}[{shape}]"
        return f"{self.name}: {text}" if self.kind == "tensor" else f"{self.name}: {self.kind}<{text}>"


def _listing(items: list, limit: int = 8) -> str:
    """At most `limit` items, comma-separated, then how many more."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "shape")


def check_feed(feed: Any, inputs: Sequence[Binding]) -> tuple[dict, bool]:
    """Validate `feed` against `inputs`; return torch tensors by name and whether the caller used torch."""
    if not isinstance(feed, Mapping):
        raise BindingError(f"Engine.run takes a dict of input name to array, got {type(feed).__name__}",
                           code="KILN-E402", hint="engine.run({" + ", ".join(f"'{b.name}': array" for b in inputs) + "})")
    expected = {b.name: b for b in inputs}
    unknown = [name for name in feed if name not in expected]
    if unknown:
        raise BindingError(f"unknown input(s) {_listing([repr(u) for u in unknown])}; the engine's inputs are: "
                           f"{_listing(inputs)}", code="KILN-E402", where=_listing(unknown),
                           hint="use the input names that `kiln inspect` shows")
    missing = [name for name in expected if name not in feed]
    if missing:
        raise BindingError(f"missing input(s): {_listing([expected[n] for n in missing])}", code="KILN-E401",
                           where=_listing(missing), hint="give a value for every input listed by engine.inputs")
    tensors, uses_torch = {}, False
    symbols: dict[str, tuple[int, str]] = {}
    for name, value in feed.items():
        binding = expected[name]
        if binding.kind != "tensor":
            tensors[name], used = _check_container(binding, value, symbols)
            uses_torch = uses_torch or used
            continue
        if _is_torch(value):
            uses_torch = True
            dtype = from_torch(value.dtype)
        elif isinstance(value, np.ndarray) or np.isscalar(value):
            value = np.asarray(value)
            try:
                dtype = from_numpy(value.dtype)
            except Exception:  # noqa: BLE001 (any dtype without a kiln equivalent)
                dtype = None
        else:
            raise BindingError(f"input {name!r} is a {type(value).__name__}; expected a numpy array or torch tensor "
                               f"of {binding}", code="KILN-E403", where=name, hint="convert it with np.asarray(...)")
        if dtype != binding.dtype:
            got = dtype.name if dtype else str(value.dtype)
            raise BindingError(f"input {name!r} has dtype {got}; the engine expects {binding.dtype.name} ({binding})",
                               code="KILN-E403", where=name,
                               hint=f"convert it first, e.g. x.astype(np.{binding.dtype.name})" if binding.dtype.name in np.sctypeDict
                               else f"convert it to {binding.dtype.name} first")
        shape = tuple(value.shape)
        _check_shape(binding, shape, symbols)
        tensors[name] = value if _is_torch(value) else numpy_to_torch_view(value)
    return tensors, uses_torch


def _check_container(binding: Binding, value: Any, symbols: dict):
    """A sequence binding takes a list of tensors; an optional one also takes None (empty)."""
    if value is None and binding.kind.startswith("optional"):
        return None, False
    if binding.kind.endswith("sequence"):
        if not isinstance(value, (list, tuple)):
            raise BindingError(f"input {binding.name!r} is a sequence; expected a list of arrays, got {type(value).__name__}",
                               code="KILN-E403", where=binding.name, hint="pass a Python list of numpy arrays or torch tensors")
        checked = [_check_element(binding, item, None, {}) for item in value]
        return [tensor for tensor, _ in checked], any(used for _, used in checked)
    return _check_element(binding, value, binding.shape, symbols)


def _check_element(binding: Binding, value: Any, shape, symbols: dict):
    if binding.dtype is None:  # element type unknown to the model: take what the caller gives
        binding = Binding(binding.name, from_torch(value.dtype) if _is_torch(value) else from_numpy(np.asarray(value).dtype), shape)
    checked, used = check_feed({binding.name: value}, [Binding(binding.name, binding.dtype, shape)])
    return checked[binding.name], used


def numpy_to_torch_view(array: np.ndarray):
    """Share the caller's memory where possible; copy only when numpy's layout needs it."""
    import torch

    if array.dtype.kind in "fiub" and array.dtype.isnative and array.flags.writeable and array.dtype.name in (
            "float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"):
        return torch.from_numpy(array)
    from ..tensors import numpy_to_torch

    return numpy_to_torch(array)


def _check_shape(binding: Binding, shape: tuple, symbols: dict) -> None:
    if binding.shape is None:
        return
    if len(shape) != len(binding.shape):
        raise BindingError(f"input {binding.name!r} has rank {len(shape)} (shape {list(shape)}); the engine expects rank "
                           f"{len(binding.shape)} ({binding})", code="KILN-E404", where=binding.name,
                           hint="reshape the input; kiln never broadcasts inputs silently")
    for axis, (got, want) in enumerate(zip(shape, binding.shape)):
        if isinstance(want, int) and got != want:
            raise BindingError(f"input {binding.name!r} has shape {list(shape)}; dimension {axis} must be {want} ({binding})",
                               code="KILN-E405", where=f"{binding.name}[{axis}]",
                               hint=f"feed {want} there: the model fixes that dimension, so no optimization profile can "
                                    "change it; to run other sizes, export the model with the dimension dynamic (a named "
                                    "dim_param, or torch.export.Dim) and build with a profile that covers them")
        if isinstance(want, str):
            if want in symbols and symbols[want][0] != got:
                first, where = symbols[want]
                raise BindingError(f"dimension {want!r} is {first} in {where} but {got} in {binding.name}[{axis}]",
                                   code="KILN-E405", where=f"{binding.name}[{axis}]",
                                   hint=f"inputs that share the dimension {want!r} must agree on its size")
            symbols.setdefault(want, (got, f"{binding.name}[{axis}]"))


def check_profiles(tensors: Mapping, profiles: list, selected: int | None = None) -> int | None:
    """The optimization profile that runs these checked inputs: `selected`, or the first whose ranges hold every
    shape (KILN-E406 when none does); None for an engine built without profiles (its shapes are all fixed)."""
    if not profiles and selected is None:
        return None
    from .profiles import choose_profile

    shapes = {name: tuple(value.shape) for name, value in tensors.items() if hasattr(value, "shape")}
    return choose_profile(profiles, shapes, selected)
