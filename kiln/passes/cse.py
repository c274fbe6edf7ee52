"""Common-subexpression elimination: two nodes with the same operator, attributes and inputs compute
the same values, so the second one's readers read the first one's outputs."""
from __future__ import annotations

import numpy as np

from .. import log
from ..ir import Graph, subgraphs
from .context import PassContext
from .matching import rename_uses


def run(graph: Graph, ctx: PassContext) -> bool:
    from ..ops import registry

    seen: dict[tuple, tuple[str, ...]] = {}
    renames: dict[str, str] = {}
    outputs = set(graph.output_names())
    kept = []
    for node in graph.nodes:
        inputs = tuple(_resolve(renames, n) for n in node.inputs)
        node = node.replace(inputs=inputs) if inputs != node.inputs else node
        definition = registry.lookup(node.op, node.domain, graph.opsets.get(node.domain, graph.opset))
        if subgraphs(node) or definition is None or definition.nondeterministic or any(o in outputs for o in node.outputs):
            kept.append(node)
            continue
        key = (node.domain, node.op, inputs, len(node.outputs), _attr_key(node.attrs))
        if key in seen:
            for mine, theirs in zip(node.outputs, seen[key]):
                if mine:
                    renames[mine] = theirs
            ctx.counters["merge_common_subexpression"] += 1
            log.verbose("cse: %s computes what an earlier %s node does", node.describe(), node.op_key)
            continue
        seen[key] = node.outputs
        kept.append(node)
    if not renames:
        return False
    graph.nodes = kept
    rename_uses(graph, renames)
    return True


def _resolve(renames: dict[str, str], name: str) -> str:
    while name in renames:
        name = renames[name]
    return name


def _attr_key(attrs: dict) -> tuple:
    return tuple(sorted((k, _hashable(v)) for k, v in attrs.items()))


def _hashable(value):
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value
