"""Elementwise chain fusion: consecutive elementwise ops where each result is read only by the next
become one kiln::Elementwise, which updates one buffer in place instead of allocating and writing a
new tensor per op. Runs after the Conv/Gemm fusions, so it only takes what they could not absorb.

Inside a chain, a run of multiplications, divisions, additions and subtractions by constants is one affine map
(x * s + t): it folds into one Mul and one Add, which the kernel runs as a single pass (DenseNet's inference
BatchNormalization followed by the model's own scale layer was two such pairs per layer, 62 layers)."""
from __future__ import annotations

import numpy as np

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
        inputs, ops, operands, folded = _fold_affine_runs(graph, chain[0].name, inputs, ops, operands)
        if folded:
            ctx.counters["fold_affine_run"] += folded
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


_AFFINE = ("Mul", "Div", "Add", "Sub")


def _fold_affine_runs(graph: Graph, stem: str, inputs: list, ops: list, operands: list):
    """(inputs, ops, operands, runs folded): each run of two or more affine steps by float constants replaced by
    at most one Mul and one Add, their constants computed in float64 and stored in the chain's type."""
    new_inputs, new_ops, new_operands, folded = [inputs[0]], [], [], 0
    run: list[tuple[str, int, np.ndarray]] = []

    def emit(op: str, name: str | None, value_first: bool = True) -> None:
        """Append one step: op(value, name), op(name, value) when not value_first, or op(value) without a name."""
        if name is not None:
            new_inputs.append(name)
        new_ops.append(op)
        new_operands.append(0 if name is None else len(new_inputs) - 1 if value_first else -(len(new_inputs) - 1))

    def flush():
        nonlocal folded
        steps = [(op, inputs[abs(operand)], operand > 0) for op, operand, _ in run]
        if len(run) >= 2 and [(op, first) for op, _, first in steps] != [("Mul", True), ("Add", True)]:
            scale, shift = _affine(run)
            dtype = run[0][2].dtype
            kept = [(op, array) for op, array, identity in (("Mul", scale, 1.0), ("Add", shift, 0.0))
                    if not np.all(array == identity)]
            if kept:  # (a run that cancels out entirely stays as it is: the chain must not hand its input on)
                steps = [(op, graph.add_initializer(f"{stem}_{op.lower()}", array.astype(dtype)), True) for op, array in kept]
                folded += 1
        for step in steps:
            emit(*step)
        run.clear()

    for op, operand in zip(ops, operands):
        other = graph.initializers.get(inputs[abs(operand)]) if operand else None
        affine = op in _AFFINE and other is not None and other.dtype.kind == "f" and np.all(np.isfinite(other)) \
            and not (op == "Div" and (operand < 0 or np.any(other == 0)))
        if affine:
            run.append((op, operand, other))
            continue
        flush()
        emit(op, inputs[abs(operand)] if operand else None, operand > 0)
    flush()
    return new_inputs, new_ops, new_operands, folded


def _affine(run) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with run(x) == x * s + t: y = s*x + t, step by step."""
    scale, shift = np.ones((), np.float64), np.zeros((), np.float64)
    for op, operand, constant in run:
        c = constant.astype(np.float64)
        if op == "Mul":
            scale, shift = scale * c, shift * c
        elif op == "Div":
            scale, shift = scale / c, shift / c
        elif op == "Add":
            shift = shift + c
        elif operand > 0:  # value - c
            shift = shift - c
        else:  # c - value
            scale, shift = -scale, c - shift
    return scale, shift
