"""What the rewrite passes share: looking at a node's neighbours and its constant inputs."""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node


class Neighbours:
    """Producers and consumers of every value, computed once per pass over an unchanging node list."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer = graph.producers()
        self.users = graph.consumers()
        self.outputs = set(graph.output_names())

    def only_user(self, name: str) -> Node | None:
        """The one node reading `name`, when exactly one does and `name` is not a graph output."""
        users = self.users.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def made_by(self, name: str, op: str, domain: str = "") -> Node | None:
        node = self.producer.get(name)
        return node if node is not None and node.op == op and node.domain == domain else None


def constant(graph: Graph, name: str) -> np.ndarray | None:
    return graph.initializers.get(name) if name else None


def scalar(graph: Graph, name: str) -> float | None:
    """The value of a constant holding a single number, else None."""
    array = constant(graph, name)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


def merged_origin(*nodes: Node) -> tuple[str, ...]:
    """The model nodes a fused node stands for, in order, without repeats."""
    seen: dict[str, None] = {}
    for node in nodes:
        for name in node.origin or ((node.name,) if node.name else ()):
            seen.setdefault(name)
    return tuple(seen)


def rewrite(graph: Graph, replaced: dict[int, Node | list[Node] | None]) -> None:
    """Apply edits by node identity: id(node) -> its replacement (or several, in order), or None to drop it."""
    kept = []
    for node in graph.nodes:
        if id(node) in replaced:
            replacement = replaced[id(node)]
            if isinstance(replacement, list):
                kept.extend(replacement)
            elif replacement is not None:
                kept.append(replacement)
        else:
            kept.append(node)
    graph.nodes = kept


def rename_uses(graph: Graph, renames: dict[str, str]) -> None:
    """Make every reader of a key read its value instead (after a node is removed as a no-op).
    Graph outputs are never renamed here; passes keep the node that produces an output."""
    def resolve(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    from ..ir import subgraphs

    for index, node in enumerate(graph.nodes):
        inputs = tuple(resolve(n) if n else n for n in node.inputs)
        if inputs != node.inputs:
            graph.nodes[index] = node.replace(inputs=inputs)
        for sub in subgraphs(node):
            _rename_outer(sub, renames, resolve)


def _rename_outer(sub: Graph, renames: dict[str, str], resolve) -> None:
    from ..ir import subgraphs

    defined = set(sub.input_names()) | set(sub.initializers) | {o for n in sub.nodes for o in n.outputs}
    for index, node in enumerate(sub.nodes):
        inputs = tuple(resolve(n) if n and n not in defined else n for n in node.inputs)
        if inputs != node.inputs:
            sub.nodes[index] = node.replace(inputs=inputs)
        for inner in subgraphs(node):
            _rename_outer(inner, renames, resolve)
    from ..ir import Value

    sub.outputs = [Value(resolve(v.name), v.dtype, v.shape) if v.name not in defined and v.name in renames else v
                   for v in sub.outputs]


def known_shape(graph: Graph, name: str) -> tuple | None:
    """The shape with every dimension a size or a symbol (None where any is unknown). Two equal known shapes are
    the same at every run: a symbol is one size wherever it appears, so a dynamic batch still compares equal."""
    if name in graph.initializers:
        return tuple(graph.initializers[name].shape)
    shape = graph.value(name).shape
    return tuple(shape) if shape is not None and all(d is not None for d in shape) else None


def static_shape(graph: Graph, name: str) -> tuple[int, ...] | None:
    if name in graph.initializers:
        return tuple(graph.initializers[name].shape)
    value = graph.value(name)
    return tuple(value.shape) if value.is_static else None
