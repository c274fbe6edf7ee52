"""Optimization profiles: for each dynamic input, the smallest, the tuned-for (opt) and the largest shape an
engine accepts, as TensorRT's optimization profiles; building resolves them against the model's inputs, running
picks the one that fits the shapes given.

A profile is stored in the plan as plain data, `{input: {"min": [...], "opt": [...], "max": [...]}}`, one dict per
profile, so `kiln inspect` shows it and backends read it without importing this module: tactics are tuned at the
opt shapes and memory is planned for the max shapes (`symbol_sizes(..., "max")` gives each dimension's size there).
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .. import log
from ..errors import BindingError, BuildError

KINDS = ("min", "opt", "max")


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


@dataclass
class Profile:
    """Per input, the (min, opt, max) shapes one profile allows; inputs it does not name keep their fixed shape
    (or take the range of the dimensions they share with inputs it names)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def set_shape(self, name: str, min, opt, max) -> "Profile":  # noqa: A002 (TensorRT's names for the three shapes)
        shapes = tuple(tuple(int(d) for d in shape) for shape in (min, opt, max))
        if len({len(s) for s in shapes}) != 1:
            raise BuildError(f"profile for {name!r}: min {list(shapes[0])}, opt {list(shapes[1])} and max "
                             f"{list(shapes[2])} have different ranks", code="KILN-E203", where=name,
                             hint="give the three shapes of an input with the same number of dimensions")
        for axis, (low, mid, high) in enumerate(zip(*shapes)):
            if not 0 <= low <= mid <= high:
                raise BuildError(f"profile for {name!r}: dimension {axis} must satisfy 0 <= min <= opt <= max, got "
                                 f"{low}, {mid}, {high}", code="KILN-E203", where=f"{name}[{axis}]",
                                 hint="order the shapes smallest (--minShapes), tuned-for (--optShapes), largest (--maxShapes)")
        self.shapes[name] = shapes
        return self

    def shape(self, name: str, kind: str) -> tuple[int, ...]:
        return self.shapes[name][KINDS.index(kind)]

    def range_text(self, name: str) -> str:
        """'[1..32]x3x224x224 (opt 8x3x224x224)': each dimension's range, fixed ones as a number."""
        low, mid, high = self.shapes[name]
        dims = "x".join(str(a) if a == b else f"[{a}..{b}]" for a, b in zip(low, high)) or "scalar"
        return dims if low == high else f"{dims} (opt {_shape_text(mid)})"

    def misfit(self, shapes: Mapping[str, tuple]) -> str | None:
        """The first input of `shapes` this profile does not allow, or None when all fit."""
        for name, (low, _, high) in self.shapes.items():
            if name not in shapes:
                continue
            shape = tuple(shapes[name])
            if len(shape) != len(low) or any(not a <= d <= b for d, a, b in zip(shape, low, high)):
                return name
        return None

    def to_data(self) -> dict:
        return {name: {kind: list(shape) for kind, shape in zip(KINDS, shapes)} for name, shapes in self.shapes.items()}

    @staticmethod
    def from_data(data: Mapping) -> "Profile":
        profile = Profile()
        for name, entry in data.items():
            if not isinstance(entry, Mapping) or any(kind not in entry for kind in KINDS):
                raise BuildError(f"profile entry for {name!r} must give min, opt and max shapes, got {entry!r}",
                                 code="KILN-E203", where=name, hint="write {'input': {'min': [...], 'opt': [...], 'max': [...]}}")
            profile.set_shape(name, entry["min"], entry["opt"], entry["max"])
        return profile

    def __str__(self) -> str:
        return ", ".join(f"{name}: {self.range_text(name)}" for name in self.shapes) or "(no inputs)"


def as_profile(item) -> Profile:
    """A Profile from a Profile, stored plan data, or {input: (min, opt, max)}."""
    if isinstance(item, Profile):
        return item
    if not isinstance(item, Mapping):
        raise BuildError(f"a profile is a kiln.Profile or a dict of input name to (min, opt, max) shapes, got "
                         f"{type(item).__name__}", code="KILN-E203",
                         hint="config.add_profile({'x': ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))})")
    if all(isinstance(v, Mapping) for v in item.values()):
        return Profile.from_data(item)
    profile = Profile()
    for name, shapes in item.items():
        if not isinstance(shapes, (list, tuple)) or len(shapes) != 3:
            raise BuildError(f"profile for {name!r} must be (min, opt, max) shapes, got {shapes!r}", code="KILN-E203",
                             where=name, hint="give three shapes: ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))")
        profile.set_shape(name, *shapes)
    return profile


# -- the command line ---------------------------------------------------------------------------------------------
def profiles_from_flags(mins: Iterable[str] | None, opts: Iterable[str] | None, maxs: Iterable[str] | None) -> list[Profile]:
    """trtexec's --minShapes/--optShapes/--maxShapes (`input:1x3x224x224,other:1x128`); the k-th use of each flag
    makes profile k. An input given only some of the three takes the others from it: opt from max (else min),
    min and max from opt, as trtexec does when only --optShapes is given."""
    from ..cli.args import parse_shape_list

    mins, opts, maxs = list(mins or []), list(opts or []), list(maxs or [])
    profiles = []
    for index in range(max(len(mins), len(opts), len(maxs))):
        given = [parse_shape_list(flags[index], f"--{kind}Shapes") if index < len(flags) else {}
                 for kind, flags in zip(KINDS, (mins, opts, maxs))]
        profile = Profile()
        for name in dict.fromkeys([*given[0], *given[1], *given[2]]):
            low, mid, high = (shapes.get(name) for shapes in given)
            mid = next(shape for shape in (mid, high, low) if shape is not None)
            profile.set_shape(name, mid if low is None else low, mid, mid if high is None else high)
        profiles.append(profile)
    return profiles


def flags_for(profile: Profile) -> str:
    """The command-line flags that give `profile`."""
    return " ".join(f"--{kind}Shapes " + ",".join(f"{name}:{_shape_text(profile.shape(name, kind))}" for name in profile.shapes)
                    for kind in KINDS)


# -- building -----------------------------------------------------------------------------------------------------
def _dynamic(shape) -> bool:
    return shape is None or any(not isinstance(d, int) for d in shape)


def resolve_profiles(inputs: list, profiles: list, use_model_shapes: bool = False, unbounded: bool = False) -> list[Profile]:
    """Check `profiles` against the engine's `inputs` (Bindings or Values: name and shape) and complete them: every
    dynamic input gets a range in every profile, from the profile itself, from the dimensions it shares with inputs
    the profile names, or (with `use_model_shapes`) from the sizes the model declares. A dynamic input left without a
    range fails with KILN-E202, naming it and the flags to add; with `unbounded` it takes any size instead (tools that
    build for one run at shapes they choose, and ONNX's backend API, which sees the inputs only after building)."""
    declared = {value.name: value.shape for value in inputs if getattr(value, "kind", "tensor") == "tensor"}
    dynamic = [name for name, shape in declared.items() if _dynamic(shape)]
    profiles = [Profile(dict(as_profile(p).shapes)) for p in profiles]  # completed copies: the caller's stay as given
    given = bool(profiles)
    if not profiles:
        if not dynamic or unbounded:
            return []
        profiles = [Profile()]
    for index, profile in enumerate(profiles):
        where = f"profile {index}" if len(profiles) > 1 else "the profile" if given else ""
        unknown = [name for name in profile.shapes if name not in declared]
        if unknown:
            raise BuildError(f"{where} names {', '.join(repr(n) for n in unknown)}, which the model has no tensor input "
                             f"called; its inputs are: {', '.join(declared)}", code="KILN-E203", where=", ".join(unknown),
                             hint="use the input names that `kiln inspect MODEL.onnx` shows")
        for name in profile.shapes:
            _check_against_model(name, declared[name], profile, where)
        sizes = _symbol_ranges(profile, declared, where)
        for name in dynamic:
            if name not in profile.shapes:
                _complete(profile, name, declared[name], sizes, use_model_shapes, unbounded, where)
    return profiles


def _check_against_model(name: str, shape, profile: Profile, where: str) -> None:
    low, _, high = profile.shapes[name]
    if shape is None:
        return
    if len(low) != len(shape):
        raise BuildError(f"{where} gives {name!r} rank {len(low)} ({profile.range_text(name)}); the model declares rank "
                         f"{len(shape)} ({_declared_text(shape)})", code="KILN-E203", where=name,
                         hint="give one size per dimension the model declares")
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and not low[axis] == high[axis] == dim:
            raise BuildError(f"{where} lets {name}[{axis}] range over {low[axis]}..{high[axis]}, but the model fixes it "
                             f"at {dim} ({_declared_text(shape)})", code="KILN-E203", where=f"{name}[{axis}]",
                             hint=f"give {dim} for that dimension in all three shapes; only the model's dynamic "
                                  "dimensions can vary")


def _symbol_ranges(profile: Profile, declared: dict, where: str) -> dict[str, tuple[int, int, int]]:
    """Each named dimension's (min, opt, max) in this profile; inputs sharing a name must agree on it, since the
    model says those dimensions are always equal."""
    sizes: dict[str, tuple[tuple[int, int, int], str]] = {}
    for name, shapes in profile.shapes.items():
        for axis, dim in enumerate(declared[name] or ()):
            if not isinstance(dim, str):
                continue
            size = tuple(shape[axis] for shape in shapes)
            if dim in sizes and sizes[dim][0] != size:
                other_size, other = sizes[dim]
                raise BuildError(f"{where} gives dimension {dim!r} min/opt/max {list(other_size)} in {other} but "
                                 f"{list(size)} in {name}[{axis}]", code="KILN-E203", where=f"{name}[{axis}]",
                                 hint=f"the model names both dimensions {dim!r}, so they are always equal: give them the same range")
            sizes.setdefault(dim, (size, f"{name}[{axis}]"))
    return {dim: size for dim, (size, _) in sizes.items()}


def _complete(profile: Profile, name: str, shape, sizes: dict, use_model_shapes: bool, unbounded: bool, where: str) -> None:
    missing = shape is None or any(not isinstance(d, int) and d not in sizes for d in shape)
    if missing and unbounded:
        return
    if shape is None:
        raise BuildError(f"input {name!r} has no declared rank, so {where or 'a profile'} must give its shapes", code="KILN-E202",
                         where=name, hint=f"add --minShapes {name}:... --optShapes {name}:... --maxShapes {name}:... "
                                          "(one size per dimension)")
    missing = [(axis, dim) for axis, dim in enumerate(shape) if not isinstance(dim, int) and dim not in sizes]
    if missing:
        dims = ", ".join(f"{name}[{axis}]" + (f" ({dim!r})" if dim else "") for axis, dim in missing)
        example = lambda size: f"{name}:" + "x".join(str(d) if isinstance(d, int) else size(d) for d in shape)  # noqa: E731
        flags = f"--minShapes {example(lambda d: '1')} --optShapes {example(_placeholder)} --maxShapes {example(_placeholder)}"
        if use_model_shapes:
            # as Polygraphy does without shapes: what the model leaves open is 1, said out loud
            log.warning("--useModelShapes: input %r (%s) is built for size 1 in %s, which the model gives no size; "
                        "for other sizes give a profile (%s)", name, _declared_text(shape), dims, flags)
            sizes.update({dim: (1, 1, 1) for _, dim in missing if dim})
            shape = [1 if not isinstance(d, int) and d not in sizes else d for d in shape]
        else:
            message = (f"input {name!r} ({_declared_text(shape)}) is dynamic and " +
                       (f"{where} gives no shapes for it" if where else "has no optimization profile"))
            python = lambda size: _tuple_text([str(d) if isinstance(d, int) else size(d) for d in shape])  # noqa: E731
            low, high = python(lambda d: "1"), python(_placeholder)
            raise BuildError(message, code="KILN-E202", where=dims,
                             hint=f"add {flags}, with the sizes to tune for (opt) and the largest to accept (max) in "
                                  f"place of the <names>; in Python, config.add_profile({{{name!r}: ({low}, {high}, "
                                  f"{high})}}); or --useModelShapes (BuilderConfig(use_model_shapes=True)) to build "
                                  "for size 1 where the model gives none")
    shapes = [tuple(d if isinstance(d, int) else sizes[d][k] for d in shape) for k in range(3)]
    profile.set_shape(name, *shapes)


def _tuple_text(items: list[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _placeholder(dim) -> str:
    return f"<{dim}>" if dim else "<size>"


def _declared_text(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def symbol_sizes(inputs: list, profile: Mapping | Profile, kind: str = "max") -> dict[str, int]:
    """Each named dimension of the inputs at the profile's min, opt or max shapes: what memory planning (max) and
    tactic timing (opt) substitute for the symbols of the graph."""
    profile = as_profile(profile)
    sizes = {}
    for value in inputs:
        if value.name in profile.shapes and value.shape is not None:
            for dim, size in zip(value.shape, profile.shape(value.name, kind)):
                if isinstance(dim, str):
                    sizes.setdefault(dim, size)
    return sizes


_FUNCTIONS = {"floor": math.floor, "ceiling": math.ceil, "ceil": math.ceil, "Max": max, "max": max, "Min": min,
              "min": min, "Mod": operator.mod}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Div: operator.truediv, ast.Mod: operator.mod}


def dim_size(dim: str, sizes: Mapping[str, int]) -> int | None:
    """The size of a named dimension at `sizes`: the symbol's own size, or the value of an arithmetic expression of
    symbols that shape inference wrote for a derived dimension (`2*batch`, `batch*seq`, `floor(N/2) + 1`); None where
    it names a symbol `sizes` lacks or is no such expression. Expressions are evaluated on their syntax tree, never
    run as code."""
    if dim in sizes:
        return sizes[dim]
    try:
        tree = ast.parse(dim, mode="eval").body
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return sizes[node.id]  # KeyError: a symbol without a size
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            return _FUNCTIONS[node.func.id](*(value(a) for a in node.args))
        raise ValueError(ast.dump(node))

    try:
        result = value(tree)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
    return int(round(result)) if abs(result - round(result)) < 1e-9 and result >= 0 else None


def largest_sizes(inputs: list, profiles: list) -> dict[str, int]:
    """Each named dimension's largest size over all profiles: memory planned at these holds any accepted shape."""
    sizes: dict[str, int] = {}
    for profile in profiles:
        for dim, size in symbol_sizes(inputs, profile, "max").items():
            sizes[dim] = max(size, sizes.get(dim, 0))
    return sizes


# -- running ------------------------------------------------------------------------------------------------------
def choose_profile(profiles: list, shapes: Mapping[str, tuple], selected: int | None = None) -> int:
    """The index of the profile to run `shapes` (input name -> shape) with: `selected` when the caller chose one,
    else the first that allows every shape. A shape no candidate allows raises KILN-E406."""
    profiles = [as_profile(p) for p in profiles]
    if selected is not None:
        if not isinstance(selected, int) or not 0 <= selected < len(profiles):
            raise BindingError(f"profile {selected!r} does not exist; the engine has {len(profiles)} profile(s)",
                               code="KILN-E406", hint=f"choose 0..{len(profiles) - 1}, or None to pick the one that fits")
        candidates = [selected]
    else:
        candidates = list(range(len(profiles)))
    misfits = {index: profiles[index].misfit(shapes) for index in candidates}
    for index, name in misfits.items():
        if name is None:
            return index
    name = misfits[candidates[0]]
    ranges = "; ".join(f"profile {index}: {misfit} {profiles[index].range_text(misfit)}" for index, misfit in misfits.items())
    what = f"profile {selected}" if selected is not None else "every optimization profile"
    raise BindingError(f"input {name!r} has shape {list(shapes[name])}, outside {what} ({ranges})", code="KILN-E406",
                       where=name, hint="feed a shape inside a profile" + (", or let the engine choose (profile=None)"
                                                                             if selected is not None and len(profiles) > 1 else "")
                       + "; or rebuild with a profile that covers it (--minShapes/--optShapes/--maxShapes)")
