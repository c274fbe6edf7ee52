"""Attention recognition: MatMul(Q, K^T), a scale (Div or Mul by a constant), an additive mask, Softmax
over the last axis and MatMul by V become one kiln::Attention (scaled-dot-product attention), which
runs as one fused kernel that never writes the whole score matrix out. The transpose of K moves into
a Transpose node that noop_removal then merges with the head transposes before it."""
from __future__ import annotations

from .. import log
from ..ir import Graph, Node, Value
from .context import PassContext
from .matching import Neighbours, merged_origin, rewrite, scalar


def run(graph: Graph, ctx: PassContext) -> bool:
    if graph.opset < 13:  # Softmax before opset 13 normalises over flattened trailing axes
        return False
    near = Neighbours(graph)
    replaced = {}
    for softmax in graph.nodes:
        if softmax.op != "Softmax" or softmax.domain:
            continue
        match = _match(graph, near, softmax)
        if match is None or any(id(n) in replaced for n in match["nodes"]):
            continue
        scores, last = match["scores"], match["last"]
        q, k_transposed = scores.inputs
        rank = graph.value(k_transposed).rank
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        k = graph.fresh_name(f"{k_transposed}_keys")
        source = graph.value(k_transposed)
        graph.values[k] = Value(k, source.dtype, None if source.shape is None else tuple(source.shape[i] for i in perm))
        transpose = Node("Transpose", (k_transposed,), (k,), {"perm": perm}, name=f"{last.name or 'attention'}_keys",
                         origin=merged_origin(scores))
        inputs = (q, k, last.inputs[1]) + ((match["mask"],) if match["mask"] else ())
        fused = last.replace(op="Attention", domain="kiln", inputs=inputs, attrs={"scale": match["scale"]},
                             origin=merged_origin(*match["nodes"]))
        for node in match["nodes"]:
            replaced[id(node)] = None
        replaced[id(last)] = [transpose, fused]
        ctx.counters["recognize_attention"] += 1
        log.verbose("recognize_attention: %s and the nodes before it are scaled-dot-product attention", softmax.describe())
    if not replaced:
        return False
    graph.opsets.setdefault("kiln", 1)
    rewrite(graph, replaced)
    return True


def _match(graph: Graph, near: Neighbours, softmax) -> dict | None:
    rank = graph.value(softmax.inputs[0]).rank
    if rank is None or rank < 3 or softmax.attrs.get("axis", -1) not in (-1, rank - 1):
        return None
    last = near.only_user(softmax.outputs[0])
    if last is None or last.op != "MatMul" or last.domain or last.inputs[0] != softmax.outputs[0]:
        return None
    nodes = [softmax]
    current, mask, scale = softmax.inputs[0], "", 1.0
    producer = near.producer.get(current)
    if producer is not None and producer.op == "Add" and not producer.domain and near.only_user(current) is softmax:
        # The mask is the operand that is not the scaled scores.
        for mine, other in ((0, 1), (1, 0)):
            source = near.producer.get(producer.inputs[mine])
            if source is not None and source.op in ("MatMul", "Div", "Mul") and not source.domain:
                current, mask = producer.inputs[mine], producer.inputs[other]
                nodes.append(producer)
                break
        else:
            return None
    producer = near.producer.get(current)
    if producer is not None and producer.op in ("Div", "Mul") and not producer.domain and near.only_user(current) is nodes[-1]:
        factor = scalar(graph, producer.inputs[1])
        if factor is None or factor == 0:
            return None
        scale = 1.0 / factor if producer.op == "Div" else factor
        current = producer.inputs[0]
        nodes.append(producer)
    scores = near.producer.get(current)
    if scores is None or scores.op != "MatMul" or scores.domain or near.only_user(current) is not nodes[-1]:
        return None
    shapes = [graph.value(name).rank for name in (*scores.inputs, last.inputs[1])]
    if any(r is None or r != rank for r in shapes) or any(name in graph.initializers for name in scores.inputs):
        return None
    if mask and not _fits_scores(graph, mask, nodes[1], rank, softmax):
        return None
    nodes.append(scores)
    return {"nodes": nodes, "scores": scores, "last": last, "mask": mask, "scale": scale}


def _fits_scores(graph: Graph, mask: str, add: Node, rank: int, softmax: Node) -> bool:
    """Whether kiln::Attention's mask input can stand for the other operand of this Add to the scores: same dtype,
    a known rank from 2 up to the scores' (torch's SDPA and kiln's flash kernel index the mask's last two axes, so
    a 0-d or 1-d operand, such as FlexAttention's constant score_mod bias, fails there), not the scores themselves,
    and not broadcasting the scores to a larger shape (the fused op's output shape follows Q and V alone)."""
    value = graph.value(mask)
    if value.dtype != graph.value(softmax.inputs[0]).dtype or value.rank is None or not 2 <= value.rank <= rank:
        return False
    if add.inputs[0] == add.inputs[1]:
        return False
    scores = graph.value(add.inputs[1] if add.inputs[0] == mask else add.inputs[0]).shape
    added = graph.value(add.outputs[0]).shape
    if scores is None or added is None:
        return True
    return all(s == a for s, a in zip(scores, added) if isinstance(s, int) and isinstance(a, int))
