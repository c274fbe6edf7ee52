"""kiln's IR: a topologically ordered list of nodes over named, typed values, plus weights.

A Value is a name with a dtype and a shape whose dims are ints, symbol names ("batch") or None
(unknown), and a kind: a tensor, or a sequence or optional of tensors (dtype and shape then describe the
tensors inside). A Node is immutable; `node.replace(**changes)` returns a new one. A Graph owns its
nodes, its input and output bindings, the types of every value it knows, and its weights
(numpy arrays). Attributes are plain Python values; a subgraph attribute (If, Loop, Scan) is a Graph.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .dtypes import DType

Dim = int | str | None
Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class Value:
    name: str
    dtype: DType | None = None
    shape: Shape | None = None  # None: rank unknown
    # What the name holds: "tensor"; "sequence" (a list of tensors); "optional" (a tensor or nothing);
    # "optional_sequence". For the others, dtype and shape describe the tensors inside.
    kind: str = "tensor"

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.kind == "tensor" and self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype else "?"
        shape = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"
        text = f"{dtype}[{shape}]"
        if self.kind != "tensor":
            text = f"{self.kind}<{text}>"
        return f"{self.name}: {text}"


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    name: str = ""
    domain: str = ""
    origin: tuple[str, ...] = ()  # names of the model nodes this node stands for (after fusion)

    def replace(self, **changes) -> "Node":
        return dataclasses.replace(self, **changes)

    @property
    def op_key(self) -> str:
        return f"{self.domain}::{self.op}" if self.domain else self.op

    def describe(self) -> str:
        return f"{self.name or '<unnamed>'} ({self.op_key})"


class Graph:
    def __init__(self, nodes: list[Node], inputs: list[Value], outputs: list[Value], *,
                 values: dict[str, Value] | None = None, initializers: dict[str, np.ndarray] | None = None,
                 opsets: dict[str, int] | None = None, name: str = "graph"):
        self.nodes = list(nodes)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.values: dict[str, Value] = dict(values or {})
        for v in itertools.chain(self.inputs, self.outputs):
            self.values.setdefault(v.name, v)
        self.initializers: dict[str, np.ndarray] = dict(initializers or {})
        self.opsets = dict(opsets or {"": 18})
        self.name = name
        self._names = itertools.count()

    # -- queries -------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.opsets.get("", 0)

    def value(self, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.initializers:
            array = self.initializers[name]
            from .dtypes import from_numpy

            return Value(name, from_numpy(array.dtype), tuple(array.shape))
        return Value(name)

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
            for sub in subgraphs(node):
                for name in sub.outer_references():
                    users.setdefault(name, []).append(node)
        return users

    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    def outer_references(self) -> set[str]:
        """Names this (sub)graph reads but does not define: values captured from an enclosing scope."""
        defined = set(self.input_names()) | set(self.initializers)
        used: set[str] = set()
        for node in self.nodes:
            used.update(n for n in node.inputs if n and n not in defined)
            for sub in subgraphs(node):
                used.update(n for n in sub.outer_references() if n not in defined)
            defined.update(node.outputs)
        used.update(n for n in self.output_names() if n not in defined)
        return used

    def walk(self) -> Iterator[tuple["Graph", Node]]:
        """Every node in this graph and its subgraphs, with the graph that holds it."""
        for node in self.nodes:
            yield self, node
            for sub in subgraphs(node):
                yield from sub.walk()

    # -- edits ---------------------------------------------------------------------------------
    def fresh_name(self, stem: str) -> str:
        taken = set(self.values) | set(self.initializers) | {o for n in self.nodes for o in n.outputs}
        while True:
            name = f"{stem}__{next(self._names)}"
            if name not in taken:
                return name

    def add_initializer(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh_name(stem)
        self.initializers[name] = array
        return name

    def copy(self) -> "Graph":
        clone = Graph(list(self.nodes), list(self.inputs), list(self.outputs), values=self.values,
                      initializers=self.initializers, opsets=self.opsets, name=self.name)
        return clone

    def __repr__(self) -> str:
        from .printer import format_graph

        return format_graph(self)


def subgraphs(node: Node) -> list[Graph]:
    found = []
    for value in node.attrs.values():
        if isinstance(value, Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, Graph))
    return found


def last_uses(nodes: list[Node]) -> dict[str, int]:
    """{value name: index of the last node in `nodes` that reads it}, a subgraph's reads of outer values counted
    at the node that holds it; a value nobody reads is last used where it is made. Runtimes free values there."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                last[name] = index
        for sub in subgraphs(node):
            for name in sub.outer_references():
                last[name] = index
        for name in node.outputs:
            if name and name not in last:
                last[name] = index
    return last
