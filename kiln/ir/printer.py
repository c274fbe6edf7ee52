"""A readable text form of a Graph, one node per line, for logs and `kiln inspect --graph`."""
from __future__ import annotations

import numpy as np


def _attr(value) -> str:
    from .graph import Graph

    if isinstance(value, Graph):
        return f"<graph {value.name}: {len(value.nodes)} nodes>"
    if isinstance(value, np.ndarray):
        return f"tensor<{value.dtype}{list(value.shape)}>" if value.size > 4 else repr(value.tolist())
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def format_graph(graph, indent: str = "") -> str:
    from .graph import subgraphs

    lines = [f"{indent}graph {graph.name} (opset {graph.opset}, {len(graph.nodes)} nodes, "
             f"{len(graph.initializers)} weights)"]
    lines += [f"{indent}  in  {graph.value(v.name).describe()}" for v in graph.inputs]
    for node in graph.nodes:
        outs = ", ".join(graph.value(o).describe() if o else "-" for o in node.outputs)
        args = ", ".join(i or "-" for i in node.inputs)
        attrs = " ".join(f"{k}={_attr(v)}" for k, v in sorted(node.attrs.items()))
        lines.append(f"{indent}  {outs} = {node.op_key}({args}){' ' + attrs if attrs else ''}  # {node.name}")
        for sub in subgraphs(node):
            lines.append(format_graph(sub, indent + "    "))
    lines += [f"{indent}  out {graph.value(v.name).describe()}" for v in graph.outputs]
    return "\n".join(lines)
