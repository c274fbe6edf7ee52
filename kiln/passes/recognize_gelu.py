"""GELU recognition: the erf form exporters write out, 0.5 * x * (1 + erf(x / sqrt 2)) in any of its
usual groupings, becomes one kiln::Gelu, which fuse_activation can then fold into the Gemm before it."""
from __future__ import annotations

import math

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, merged_origin, rewrite, scalar


def run(graph: Graph, ctx: PassContext) -> bool:
    near = Neighbours(graph)
    replaced = {}
    for erf in graph.nodes:
        if erf.op != "Erf" or erf.domain or any(id(n) in replaced for n in (erf,)):
            continue
        match = _match(graph, near, erf)
        if match is None or any(id(n) in replaced for n in match[1]):
            continue
        x, nodes, last = match
        for node in nodes:
            replaced[id(node)] = None
        replaced[id(last)] = last.replace(op="Gelu", domain="kiln", inputs=(x,), outputs=last.outputs,
                                          attrs={"approximate": "none"}, origin=merged_origin(*nodes, last))
        ctx.counters["recognize_gelu"] += 1
        log.verbose("recognize_gelu: %d nodes ending at %s are GELU", len(nodes) + 1, last.describe())
    if not replaced:
        return False
    graph.opsets.setdefault("kiln", 1)
    rewrite(graph, replaced)
    return True


def _match(graph: Graph, near: Neighbours, erf):
    scaled = near.producer.get(erf.inputs[0])
    if scaled is None or scaled.domain or near.only_user(scaled.outputs[0]) is not erf:
        return None
    x = _scaled_by(graph, scaled, 1 / math.sqrt(2))
    if x is None:
        return None
    add = near.only_user(erf.outputs[0])
    if add is None or add.op != "Add" or _other(add, erf.outputs[0]) is None or scalar(graph, _other(add, erf.outputs[0])) != 1.0:
        return None
    # What remains multiplies x, (1 + erf) and 0.5 together, in any grouping.
    first = near.only_user(add.outputs[0])
    if first is None or first.op != "Mul" or first.domain:
        return None
    factor = _other(first, add.outputs[0])
    half_x = near.producer.get(factor)
    if half_x is not None and half_x.op == "Mul" and not half_x.domain and x in half_x.inputs \
            and _is_half(graph, _other(half_x, x)) and near.only_user(factor) is first:
        return x, [scaled, erf, add, half_x], first  # (x * 0.5) * (1 + erf)
    second = near.only_user(first.outputs[0])
    if second is None or second.op != "Mul" or second.domain:
        return None
    factors = (factor, _other(second, first.outputs[0]))
    if (factors[0] == x and _is_half(graph, factors[1])) or (factors[1] == x and _is_half(graph, factors[0])):
        return x, [scaled, erf, add, first], second  # (x * (1 + erf)) * 0.5 or ((1 + erf) * 0.5) * x
    return None


def _scaled_by(graph: Graph, node, factor: float) -> str | None:
    """x when node computes x * factor (as Mul by factor or Div by 1 / factor)."""
    if node.op == "Div" and _close(scalar(graph, node.inputs[1]), 1 / factor):
        return node.inputs[0]
    if node.op == "Mul":
        for mine, other in ((0, 1), (1, 0)):
            if _close(scalar(graph, node.inputs[other]), factor):
                return node.inputs[mine]
    return None


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-4 * abs(target)


def _is_half(graph: Graph, name: str) -> bool:
    return _close(scalar(graph, name), 0.5)


def _other(node, name: str) -> str | None:
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]
