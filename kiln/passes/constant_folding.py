"""Constant folding: evaluate nodes whose inputs are all weights, and Shape of statically shaped values."""
from __future__ import annotations

import numpy as np

from .. import log
from ..ir import Graph
from .context import PassContext
from .evaluate import evaluate_node, is_foldable


def run(graph: Graph, ctx: PassContext) -> bool:
    kept = []
    changed = False
    for node in graph.nodes:
        if node.op == "Shape" and not node.domain and _static_shape(graph, node):
            folded = [np.asarray(_static_shape(graph, node), dtype=np.int64)]
            ctx.counters["fold_shape"] += 1
        elif all(not name or name in graph.initializers for name in node.inputs) and is_foldable(node, graph):
            inputs = [graph.initializers[name] if name else None for name in node.inputs]
            folded = evaluate_node(node, inputs, graph.opsets.get(node.domain, graph.opset))
            ctx.counters["fold_constant"] += 1
        else:
            kept.append(node)
            continue
        for name, array in zip(node.outputs, folded):
            if name:
                graph.initializers[name] = array
        log.verbose("constant_folding: folded %s into %s", node.describe(), ", ".join(o for o in node.outputs if o))
        changed = True
    graph.nodes = kept
    return changed


def _static_shape(graph: Graph, node) -> list[int] | None:
    value = graph.value(node.inputs[0])
    if not value.is_static:
        return None
    dims = list(value.shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", None)
    return dims[start:end] if (start, end) != (0, None) else dims
