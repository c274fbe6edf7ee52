"""The optimization pipeline: the passes, in order. Each is `run(graph, ctx) -> bool` (changed?)."""
from __future__ import annotations

import os
import time

from .. import log
from ..ir import Graph, verify
from . import constant_folding, dead_code
from .context import PassContext

# The order of optimizations, visible in one place.
PIPELINE = [
    ("constant_folding", constant_folding.run),  # weights built by ConstantOfShape, shape arithmetic
    ("dead_code", dead_code.run),  # what folding left unread
]


def optimize(graph: Graph, ctx: PassContext | None = None, passes=None, config=None) -> PassContext:
    """Run the pipeline over `graph` in place; return the context with its rewrite counters."""
    ctx = ctx or PassContext(validate=os.environ.get("KILN_VALIDATE") == "1")
    for name, run in passes or PIPELINE:
        start = time.perf_counter()
        before = len(graph.nodes)
        changed = run(graph, ctx)
        log.verbose("pass %-22s %s: %d -> %d nodes in %.1f ms", name, "changed" if changed else "no change",
                    before, len(graph.nodes), (time.perf_counter() - start) * 1e3)
        if ctx.validate:
            verify(graph)
    return ctx
