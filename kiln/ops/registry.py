"""The operator registry: the one list of what kiln supports.

An operator is declared once, by decorating its reference CPU kernel:

    @register("Relu", since=6)
    def relu(x):
        return torch.relu(x)

The kernel takes the node's inputs (torch tensors, or None for an omitted optional input)
positionally and its attributes as keyword arguments, whose defaults are the ONNX defaults;
it returns a tensor or a tuple of tensors. Several versions of one operator are registered
with different `since` opsets; the newest one not above the model's opset is used.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from ..ir import Graph, Node


@dataclass(frozen=True)
class OpDef:
    op: str
    domain: str
    since: int
    kernel: Callable[..., Any]
    dtypes: frozenset[str] | None = None  # element types of the first input it accepts; None: any
    check: Callable[[Node, Graph], str | None] | None = None  # returns why a node is unsupported, or None
    infer: Callable | None = None  # (input Values, attrs) -> [(DType, shape)]; for ops ONNX cannot infer
    nondeterministic: bool = False  # never constant-folded (RandomNormal, ...)
    plugin: "PluginInfo | None" = None
    attributes: frozenset[str] = field(default_factory=frozenset)
    takes_any_attribute: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.domain, self.op)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str


_REGISTRY: dict[tuple[str, str], list[OpDef]] = {}


def _normalize_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def register(op: str, since: int = 1, *, domain: str = "", dtypes=None, check=None, infer=None,
             nondeterministic: bool = False, plugin: PluginInfo | None = None):
    """Decorator: register `kernel` as the implementation of `op` from opset `since` on."""

    def decorate(kernel):
        params = inspect.signature(kernel).parameters.values()
        # Keyword-only parameters are the ONNX attributes; those starting with "_" ask the runtime
        # for context (_num_outputs: how many outputs the node has; _env: the values in scope).
        keyword = frozenset(p.name for p in params if p.kind == p.KEYWORD_ONLY and not p.name.startswith("_"))
        any_attribute = any(p.kind == p.VAR_KEYWORD for p in params)
        definition = OpDef(op, _normalize_domain(domain), since, kernel,
                           frozenset(dtypes) if dtypes else None, check, infer, nondeterministic, plugin,
                           keyword, any_attribute)
        versions = [d for d in _REGISTRY.get(definition.key, []) if d.since != since]
        _REGISTRY[definition.key] = sorted(versions + [definition], key=lambda d: d.since)
        return kernel

    return decorate


def unregister(op: str, domain: str = "") -> None:
    _REGISTRY.pop((_normalize_domain(domain), op), None)


def versions(op: str, domain: str = "") -> list[OpDef]:
    _load_families()
    return list(_REGISTRY.get((_normalize_domain(domain), op), []))


def lookup(op: str, domain: str, opset: int) -> OpDef | None:
    """The newest registered version of `op` not above `opset`, or None."""
    chosen = None
    for definition in versions(op, domain):
        if definition.since <= opset:
            chosen = definition
    return chosen


def all_ops() -> list[OpDef]:
    _load_families()
    return [d for key in sorted(_REGISTRY) for d in _REGISTRY[key]]


def why_unsupported(node: Node, graph: Graph, opset: int) -> str | None:
    """None when kiln can run `node`; otherwise one line saying what is missing."""
    known = versions(node.op, node.domain)
    if not known:
        return "no kernel registered"
    definition = lookup(node.op, node.domain, opset)
    if definition is None:
        return f"kiln implements {node.op_key} from opset {known[0].since}, the model uses opset {opset}"
    if definition.dtypes is not None and node.inputs and node.inputs[0]:
        dtype = graph.value(node.inputs[0]).dtype
        if dtype is not None and dtype.name not in definition.dtypes:
            return f"no kernel for {node.op_key} in {dtype.name}; available: {', '.join(sorted(definition.dtypes))}"
    if not definition.takes_any_attribute:
        unknown = sorted(set(node.attrs) - definition.attributes)
        if unknown:
            return f"attribute(s) {', '.join(unknown)} not supported by kiln's {node.op_key}"
    if definition.check is not None:
        return definition.check(node, graph)
    return None


_loaded = False


def _load_families() -> None:
    """Import every operator family module once, so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    from .. import ops

    for module in pkgutil.iter_modules(ops.__path__):
        if module.name not in ("registry",):
            importlib.import_module(f"{ops.__name__}.{module.name}")
