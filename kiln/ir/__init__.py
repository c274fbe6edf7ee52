"""kiln's intermediate representation."""
from .dtypes import DType
from .graph import Graph, Node, Value, last_uses, subgraphs
from .printer import format_graph
from .verifier import verify

__all__ = ["DType", "Graph", "Node", "Value", "format_graph", "last_uses", "subgraphs", "verify"]
