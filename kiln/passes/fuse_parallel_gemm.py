"""Horizontal Gemm fusion: kiln::Gemm layers that read the same input with constant weights of the same K and the
same activation (attention's Q, K and V projections) become one kiln::Gemm over the weights concatenated along N,
followed by a Split on the last axis whose outputs keep the original names, so one wide matrix product replaces
several narrow ones (one pass over the input, one launch) and no reader of the results changes."""
from __future__ import annotations

import numpy as np

from .. import log
from ..ir import Graph, Node, Value
from .context import PassContext
from .matching import constant, merged_origin, rewrite


def run(graph: Graph, ctx: PassContext) -> bool:
    if graph.opset < 13:  # Split takes its sizes as an input from opset 13, the form kiln implements
        return False
    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        key = _key(graph, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    replaced = {}
    names = {node.name for node in graph.nodes}
    for group in groups.values():
        if len(group) < 2:
            continue
        fused, split = _fuse(graph, group, names)
        # The fused pair takes the place of the first Gemm: it reads only the shared input and constants, which are
        # defined before that Gemm, and the readers of every Gemm's output come after the first one.
        replaced[id(group[0])] = [fused, split]
        for node in group[1:]:
            replaced[id(node)] = None
        ctx.counters["parallel_gemm_fused"] += len(group)
        log.verbose("fuse_parallel_gemm: %s read %s and become %s + Split", ", ".join(n.describe() for n in group),
                    group[0].inputs[0], fused.describe())
    if not replaced:
        return False
    rewrite(graph, replaced)
    return True


def _key(graph: Graph, node: Node) -> tuple | None:
    """What Gemms must share to run as one: input, K, weight dtype and attributes; None for a Gemm that cannot
    join (not a kiln::Gemm, a computed weight or bias, a residual, which is per output and has no wide form)."""
    if node.domain != "kiln" or node.op != "Gemm" or len(node.inputs) < 2 or (len(node.inputs) > 3 and node.inputs[3]):
        return None
    weight = constant(graph, node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
        return None
    bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
    if bias_name:
        bias = constant(graph, bias_name)
        if bias is None or bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            return None
    attrs = tuple(sorted((name, repr(value)) for name, value in node.attrs.items()))
    return node.inputs[0], weight.shape[1], weight.dtype.str, attrs


def _fuse(graph: Graph, group: list[Node], names: set[str]) -> tuple[Node, Node]:
    first = group[0]
    weights = [graph.initializers[node.inputs[1]] for node in group]
    sizes = [w.shape[0] for w in weights]
    stem = first.name or "gemm"
    inputs = [first.inputs[0], graph.add_initializer(f"{stem}_parallel_weight", np.concatenate(weights, axis=0))]
    if any(len(node.inputs) > 2 and node.inputs[2] for node in group):
        # a Gemm without bias adds zeros, which leaves its columns exactly as they were
        biases = [graph.initializers[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2]
                  else np.zeros(size, weights[0].dtype) for node, size in zip(group, sizes)]
        inputs.append(graph.add_initializer(f"{stem}_parallel_bias", np.concatenate(biases)))
    wide = graph.fresh_name(f"{stem}_parallel")
    source = graph.value(first.outputs[0])
    graph.values[wide] = Value(wide, source.dtype, None if source.shape is None else (*source.shape[:-1], sum(sizes)))
    fused = first.replace(inputs=tuple(inputs), outputs=(wide,), name=_unique(names, f"{stem}_parallel"),
                          origin=merged_origin(*group))
    split = Node("Split", (wide, graph.add_initializer(f"{stem}_parallel_sizes", np.array(sizes, np.int64))),
                 tuple(node.outputs[0] for node in group), {"axis": -1}, name=_unique(names, f"{stem}_parallel_split"),
                 origin=merged_origin(*group))
    return fused, split


def _unique(names: set[str], stem: str) -> str:
    """A node name no other node has (layers are reported and timed by name)."""
    name, count = stem, 0
    while name in names:
        count += 1
        name = f"{stem}_{count}"
    names.add(name)
    return name
