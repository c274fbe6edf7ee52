"""LayerNormalization recognition: the decomposed form exporters write (ReduceMean, Sub, Pow or Mul,
ReduceMean, Add epsilon, Sqrt, Div, then Mul by a scale and Add of a bias) over the last axis
becomes one ONNX LayerNormalization, which runs as a single pass over the row."""
from __future__ import annotations

import numpy as np

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, constant, merged_origin, rewrite, scalar


def run(graph: Graph, ctx: PassContext) -> bool:
    near = Neighbours(graph)
    replaced = {}
    for div in graph.nodes:
        if div.op != "Div" or div.domain:
            continue
        match = _match(graph, near, div)
        if match is None or any(id(n) in replaced for n in match[3]):
            continue
        x, epsilon, width, nodes = match
        chain, scale, bias = nodes + [div], None, None
        mul = near.only_user(div.outputs[0])
        if mul is not None and mul.op == "Mul" and not mul.domain:
            scale = _row_constant(graph, _other(mul, div.outputs[0]), width)
            if scale is not None:
                chain.append(mul)
                add = near.only_user(mul.outputs[0])
                if add is not None and add.op == "Add" and not add.domain:
                    bias = _row_constant(graph, _other(add, mul.outputs[0]), width)
                    if bias is not None:
                        chain.append(add)
        tail = chain[-1]
        dtype = graph.value(x).dtype
        if dtype is None or not dtype.is_float:
            continue
        from ..ir.dtypes import to_numpy

        scale_name = scale if scale is not None else graph.add_initializer("layernorm_scale", np.ones(width, to_numpy(dtype)))
        inputs = (x, scale_name) + ((bias,) if bias is not None else ())
        for node in chain[:-1]:
            replaced[id(node)] = None
        replaced[id(tail)] = tail.replace(op="LayerNormalization", domain="", inputs=inputs, outputs=tail.outputs,
                                          attrs={"axis": -1, "epsilon": epsilon, "stash_type": 1}, origin=merged_origin(*chain))
        ctx.counters["recognize_layernorm"] += 1
        log.verbose("recognize_layernorm: %d nodes ending at %s are LayerNormalization", len(chain), tail.describe())
    if not replaced:
        return False
    rewrite(graph, replaced)
    return True


def _match(graph: Graph, near: Neighbours, div):
    centered = near.made_by(div.inputs[0], "Sub")
    sqrt = near.made_by(div.inputs[1], "Sqrt")
    if centered is None or sqrt is None or near.only_user(sqrt.outputs[0]) is not div:
        return None
    mean = near.made_by(centered.inputs[1], "ReduceMean")
    x = centered.inputs[0]
    if mean is None or mean.inputs[0] != x or not _last_axis(graph, mean) or near.only_user(mean.outputs[0]) is not centered:
        return None
    add = near.made_by(sqrt.inputs[0], "Add")
    if add is None or near.only_user(add.outputs[0]) is not sqrt:
        return None
    variance = near.producer.get(add.inputs[0])
    epsilon = scalar(graph, add.inputs[1])
    if variance is None or variance.op != "ReduceMean" or epsilon is None or not _last_axis(graph, variance):
        return None
    square = near.producer.get(variance.inputs[0])
    if square is None or near.only_user(square.outputs[0]) is not variance:
        return None
    d = centered.outputs[0]
    is_square = (square.op == "Pow" and square.inputs[0] == d and scalar(graph, square.inputs[1]) == 2.0) or \
                (square.op == "Mul" and square.inputs == (d, d))
    if not is_square or sorted(id(u) for u in near.users.get(d, [])) != sorted((id(square), id(div))):
        return None
    shape = graph.value(x).shape
    if shape is None or not isinstance(shape[-1], int):
        return None
    return x, epsilon, shape[-1], [mean, centered, square, variance, add, sqrt]


def _last_axis(graph: Graph, reduce) -> bool:
    if not reduce.attrs.get("keepdims", 1):
        return False
    axes = reduce.attrs.get("axes")
    if axes is None and len(reduce.inputs) > 1 and reduce.inputs[1]:
        array = constant(graph, reduce.inputs[1])
        axes = None if array is None else array.reshape(-1).tolist()
    rank = graph.value(reduce.inputs[0]).rank
    return axes is not None and len(axes) == 1 and rank is not None and axes[0] in (-1, rank - 1)


def _row_constant(graph: Graph, name: str | None, width: int) -> str | None:
    """A constant of shape [width] (or broadcasting as one), as the name of a 1-D weight."""
    array = constant(graph, name) if name else None
    if array is None or array.size != width or array.shape[-1] != width:
        return None
    if array.ndim == 1:
        return name
    return graph.add_initializer(f"{name}_row", array.reshape(width).copy())


def _other(node, name: str) -> str | None:
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]
