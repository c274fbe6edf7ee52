"""Conv + BatchNormalization folding: an inference BatchNormalization that reads only a Conv's output
scales and shifts each output channel, which the Conv's weights and bias can do themselves."""
from __future__ import annotations

import numpy as np

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, constant, merged_origin, rewrite


def run(graph: Graph, ctx: PassContext) -> bool:
    near = Neighbours(graph)
    replaced = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or node.domain or len([o for o in node.outputs if o]) != 1:
            continue
        if node.attrs.get("training_mode", 0):
            continue
        conv = near.made_by(node.inputs[0], "Conv")
        if conv is None or id(conv) in replaced or near.only_user(conv.outputs[0]) is not node:
            continue
        weight = constant(graph, conv.inputs[1])
        bias = constant(graph, conv.inputs[2]) if len(conv.inputs) > 2 else None
        stats = [constant(graph, name) for name in node.inputs[1:5]]
        if weight is None or (len(conv.inputs) > 2 and conv.inputs[2] and bias is None) or any(s is None for s in stats):
            continue
        scale, shift, mean, var = (s.astype(np.float64) for s in stats)
        factor = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
        folded_weight = (weight.astype(np.float64) * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        base = bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])
        folded_bias = ((base - mean) * factor + shift).astype(weight.dtype)
        w_name = graph.add_initializer(f"{conv.name or 'conv'}_bn_weight", folded_weight)
        b_name = graph.add_initializer(f"{conv.name or 'conv'}_bn_bias", folded_bias)
        replaced[id(conv)] = None
        replaced[id(node)] = conv.replace(inputs=(conv.inputs[0], w_name, b_name), outputs=(node.outputs[0],),
                                          name=conv.name or node.name, origin=merged_origin(conv, node))
        ctx.counters["fold_conv_batchnorm"] += 1
        log.verbose("fold_batchnorm: folded %s into %s", node.describe(), conv.describe())
    if not replaced:
        return False
    rewrite(graph, replaced)
    return True
