"""The memory plan: where each activation lives in one shared arena, so that tensors whose lifetimes
do not overlap share bytes.

Lifetimes run from the step that produces a value to the last step that reads it (graph outputs live
to the end). Offsets come from greedy first-fit placement (each tensor at the lowest offset that no
time-overlapping tensor occupies) in the best of a few orders, which stays close to the lower bound: the most bytes live
at any one step. The plan records the arena size (peak), the naive sum (every activation in its own
buffer) and that lower bound. Dimensions that are symbols (a dynamic batch), or expressions of them (`2*batch`), are
planned at the profiles' largest sizes; one no profile sizes is planned at 1 and listed under "assumed"; `kiln
inspect` reports the plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, subgraphs
from .profiles import dim_size

ALIGNMENT = 64  # bytes; oneDNN and AVX-512 loads want 64-byte aligned rows


@dataclass
class Tensor:
    name: str
    size: int
    first: int
    last: int
    offset: int = -1

    def overlaps(self, other: "Tensor") -> bool:
        return self.first <= other.last and other.first <= self.last


def _aligned(size: int) -> int:
    return (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def lifetimes(graph: Graph, sizes: dict[str, int] | None = None) -> tuple[list[Tensor], list[str], dict[str, int]]:
    """The activations with their sizes and lifetimes; names whose size is unknown; symbols assumed 1 (those
    `sizes` gives, the profiles' max sizes of the inputs' dimensions, take that size)."""
    outputs = set(graph.output_names())
    end = len(graph.nodes)
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.outputs:
            if name and name not in graph.initializers:
                born.setdefault(name, index)
                last.setdefault(name, index)
        reads = [n for n in node.inputs if n]
        for sub in subgraphs(node):
            reads.extend(sub.outer_references())
        for name in reads:
            if name in born:
                last[name] = index
    tensors, unknown, assumed = [], [], {}
    for name, first in born.items():
        value = graph.value(name)
        if value.shape is None or value.dtype is None or value.kind != "tensor":  # sequences, unknown ranks
            unknown.append(name)
            continue
        elements = 1
        for dim in value.shape:
            if isinstance(dim, int):
                elements *= dim
            elif dim is None:
                unknown.append(name)
                break
            elif sizes and (size := dim_size(dim, sizes)) is not None:
                elements *= size
            else:
                assumed[dim] = 1
        else:
            size = _aligned(max(elements * value.dtype.itemsize, 1))
            tensors.append(Tensor(name, size, first, end if name in outputs else last[name]))
    return tensors, unknown, assumed


# Orders to place tensors in; each gives a valid plan, and the smallest arena is kept. Largest first is the
# classic heuristic; which of equal sizes goes first matters: the one that lives longest (DenseNet's growing
# concatenations reach the lower bound only that way), or the one born first (the classic tie-break). By
# size x lifetime puts long-lived large tensors first; by birth is the order a runtime would allocate in.
ORDERS = (
    lambda t: (-t.size, -t.last, t.name),
    lambda t: (-t.size, t.first, t.name),
    lambda t: (-t.size * (t.last - t.first + 1), t.first, t.name),
    lambda t: (t.first, -t.size, t.name),
)


def place(tensors: list[Tensor]) -> int:
    """Give each tensor an offset (greedy first fit, in the best of ORDERS); return the arena size."""
    best: tuple[int, list[int]] | None = None
    for order in ORDERS:
        size = _first_fit(sorted(tensors, key=order))
        if best is None or size < best[0]:
            best = (size, [t.offset for t in tensors])
    for tensor, offset in zip(tensors, best[1] if best else []):
        tensor.offset = offset
    return best[0] if best else 0


def _first_fit(ordered: list[Tensor]) -> int:
    placed: list[Tensor] = []
    for tensor in ordered:
        busy = sorted((t.offset, t.offset + t.size) for t in placed if t.overlaps(tensor))
        offset = 0
        for start, stop in busy:
            if offset + tensor.size <= start:
                break
            offset = max(offset, stop)
        tensor.offset = offset
        placed.append(tensor)
    return max((t.offset + t.size for t in placed), default=0)


def lower_bound(tensors: list[Tensor], steps: int) -> int:
    """The most bytes live at any one step: no arena can be smaller."""
    live = [0] * (steps + 1)
    for tensor in tensors:
        for step in range(tensor.first, tensor.last + 1):
            live[step] += tensor.size
    return max(live, default=0)


def plan_memory(graph: Graph, sizes: dict[str, int] | None = None) -> dict:
    """The memory plan of `graph` as plain data for plan.memory, with dynamic dimensions at `sizes` (the largest
    each optimization profile allows, so the arena holds any shape the engine accepts)."""
    tensors, unknown, assumed = lifetimes(graph, sizes)
    peak = place(tensors)
    return {
        "peak_bytes": peak,
        "naive_bytes": sum(t.size for t in tensors),
        "lower_bound_bytes": lower_bound(tensors, len(graph.nodes)),
        "alignment": ALIGNMENT,
        "assumed": assumed,
        "planned_at": dict(sizes or {}),
        "unplanned": unknown,
        "buffers": [{"value": t.name, "offset": t.offset, "bytes": t.size, "first": t.first, "last": t.last}
                    for t in sorted(tensors, key=lambda t: t.first)],
    }
