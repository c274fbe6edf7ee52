"""Checks the IR's invariants: topological order, every use defined once, outputs produced."""
from __future__ import annotations

from ..errors import ParseError
from .graph import Graph, subgraphs


def verify(graph: Graph, outer: frozenset[str] = frozenset()) -> None:
    """Raise ParseError (KILN-E105) naming the first broken invariant."""
    defined = set(outer) | set(graph.input_names()) | set(graph.initializers)
    for node in graph.nodes:
        for name in node.inputs:
            if name and name not in defined:
                raise ParseError(f"node {node.describe()} reads {name!r}, which no earlier node, input or weight defines",
                                 code="KILN-E105", where=node.describe(),
                                 hint="the graph is not topologically sorted or a value is missing; check the exporter")
        for sub in subgraphs(node):
            verify(sub, frozenset(defined))
        for name in node.outputs:
            if name and name in defined and name not in outer:
                raise ParseError(f"value {name!r} is defined twice (second time by {node.describe()})",
                                 code="KILN-E105", where=node.describe(), hint="the model is not in SSA form")
            if name:
                defined.add(name)
    for value in graph.outputs:
        if value.name not in defined:
            raise ParseError(f"graph output {value.name!r} is never produced", code="KILN-E105",
                             hint="the model's outputs do not match its nodes")
