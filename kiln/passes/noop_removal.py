"""No-op removal: Identity, inference Dropout, Cast to the type it already has, Reshape to the shape
it already has, Transpose with the identity permutation; consecutive Transposes compose into one
(so inverse pairs vanish)."""
from __future__ import annotations

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, merged_origin, rename_uses, static_shape


def run(graph: Graph, ctx: PassContext) -> bool:
    changed = _compose_transposes(graph, ctx)
    renames: dict[str, str] = {}
    outputs = set(graph.output_names())
    read = outputs | set(graph.consumers())
    kept = []
    for node in graph.nodes:
        reason = _why_noop(graph, node)
        # A graph output keeps the node that names it, so outputs keep their names; a Dropout whose mask is read stays.
        mask_read = node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1] in read
        if reason is None or node.outputs[0] in outputs or mask_read:
            kept.append(node)
            continue
        renames[node.outputs[0]] = node.inputs[0]
        ctx.counters[f"remove_{reason}"] += 1
        log.verbose("noop_removal: removed %s (%s)", node.describe(), reason.replace("_", " "))
    if renames:
        graph.nodes = kept
        rename_uses(graph, renames)
    return changed or bool(renames)


def _why_noop(graph: Graph, node) -> str | None:
    if node.domain:
        return None
    if node.op == "Identity":
        return "identity"
    if node.op == "Dropout":
        # In inference Dropout passes its input through; a training_mode input other than a constant
        # false could mean it is meant to drop, so that one stays.
        training = node.inputs[2] if len(node.inputs) > 2 else ""
        if training and not (training in graph.initializers and not graph.initializers[training].any()):
            return None
        return "dropout"
    if node.op == "Cast":
        source = graph.value(node.inputs[0]).dtype
        return "cast_to_same_type" if source is not None and source.value == node.attrs.get("to") else None
    if node.op == "Reshape":
        before, after = static_shape(graph, node.inputs[0]), static_shape(graph, node.outputs[0])
        return "reshape_to_same_shape" if before is not None and before == after else None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return "identity_transpose" if perm is not None and list(perm) == sorted(perm) else None
    return None


def _compose_transposes(graph: Graph, ctx: PassContext) -> bool:
    """Transpose(Transpose(x, p), q) -> Transpose(x, p[q]) when the first has no other reader."""
    changed = False
    while True:
        near = Neighbours(graph)
        for index, node in enumerate(graph.nodes):
            if node.op != "Transpose" or node.domain or node.attrs.get("perm") is None:
                continue
            first = near.made_by(node.inputs[0], "Transpose")
            if first is None or first.attrs.get("perm") is None or near.only_user(first.outputs[0]) is not node:
                continue
            perm = [first.attrs["perm"][axis] for axis in node.attrs["perm"]]
            graph.nodes[index] = node.replace(inputs=first.inputs, attrs={**node.attrs, "perm": perm},
                                              origin=merged_origin(first, node))
            graph.nodes.remove(first)
            ctx.counters["fold_transpose_pair"] += 1
            log.verbose("noop_removal: composed %s into %s", first.describe(), node.describe())
            changed = True
            break
        else:
            return changed
