"""Dead-code elimination: drop nodes whose outputs nobody reads, and weights nobody uses."""
from __future__ import annotations

from .. import log
from ..ir import Graph, subgraphs
from .context import PassContext


def run(graph: Graph, ctx: PassContext) -> bool:
    live = set(graph.output_names())
    kept = []
    for node in reversed(graph.nodes):
        if any(name in live for name in node.outputs if name):
            kept.append(node)
            live.update(name for name in node.inputs if name)
            for sub in subgraphs(node):
                live.update(sub.outer_references())
        else:
            ctx.counters["remove_dead_node"] += 1
            log.verbose("dead_code: removed %s (no output is used)", node.describe())
    kept.reverse()
    unused = [name for name in graph.initializers if name not in live]
    for name in unused:
        del graph.initializers[name]
    ctx.counters["remove_dead_weight"] += len(unused)
    changed = len(kept) != len(graph.nodes) or bool(unused)
    graph.nodes = kept
    return changed
