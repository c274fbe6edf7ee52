"""Elementwise chain fusion: consecutive elementwise ops where each result is read only by the next
become one kiln::Elementwise, which updates one buffer in place instead of allocating and writing a
new tensor per op. Runs after the Conv/Gemm fusions, so it only takes what they could not absorb."""
from __future__ import annotations

from .. import log
from ..ir import Graph
from ..ops.fused import BINARY, UNARY
from .context import PassContext
from .matching import Neighbours, merged_origin, rewrite


def run(graph: Graph, ctx: PassContext) -> bool:
    near = Neighbours(graph)
    replaced = {}
    taken: set[int] = set()
    for start in graph.nodes:
        if id(start) in taken or not _fusable(graph, start):
            continue
        chain = [start]
        while True:
            user = near.only_user(chain[-1].outputs[0])
            if user is None or id(user) in taken or not _fusable(graph, user) or \
                    (len(user.inputs) == 2 and user.inputs[0] == user.inputs[1]):
                break
            chain.append(user)
        if len(chain) < 2:
            continue
        inputs, ops, operands = [], [], []
        value = None
        for node in chain:
            if value is None:  # the first op: its first input is the chain's start value
                inputs.append(node.inputs[0])
                if len(node.inputs) == 2:
                    inputs.append(node.inputs[1])
                    operands.append(1)
                else:
                    operands.append(0)
            elif len(node.inputs) == 1:
                operands.append(0)
            else:
                mine = 0 if node.inputs[0] == value else 1
                inputs.append(node.inputs[1 - mine])
                operands.append(len(inputs) - 1 if mine == 0 else -(len(inputs) - 1))
            ops.append(node.op)
            value = node.outputs[0]
        last = chain[-1]
        for node in chain[:-1]:
            replaced[id(node)] = None
        replaced[id(last)] = last.replace(op="Elementwise", domain="kiln", inputs=tuple(inputs),
                                          attrs={"ops": ops, "operands": operands}, origin=merged_origin(*chain))
        taken.update(id(n) for n in chain)
        ctx.counters["fuse_elementwise_chain"] += 1
        log.verbose("fuse_elementwise: %s", " -> ".join(n.describe() for n in chain))
    if not replaced:
        return False
    graph.opsets.setdefault("kiln", 1)
    rewrite(graph, replaced)
    return True


def _fusable(graph: Graph, node) -> bool:
    if node.domain or not (node.op in UNARY and len(node.inputs) == 1 or node.op in BINARY and len(node.inputs) == 2):
        return False
    dtype = graph.value(node.outputs[0]).dtype
    if dtype is None or not dtype.is_float or node.attrs:
        return False
    return all(graph.value(name).dtype == dtype for name in node.inputs)
