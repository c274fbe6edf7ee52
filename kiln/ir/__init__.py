"""kiln's intermediate representation."""
from .dtypes import DType
from .graph import Graph, Node, Value, subgraphs
from .printer import format_graph
from .verifier import verify

__all__ = ["DType", "Graph", "Node", "Value", "format_graph", "subgraphs", "verify"]
