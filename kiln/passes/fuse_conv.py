"""Conv lowering to kiln::Conv: ONNX Conv with constant weights becomes the fused convolution with
its padding made explicit, so that later passes can give it a residual and an activation."""
from __future__ import annotations

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import merged_origin


def run(graph: Graph, ctx: PassContext) -> bool:
    changed = False
    for index, node in enumerate(graph.nodes):
        if node.op != "Conv" or node.domain or node.inputs[1] not in graph.initializers:
            continue
        if len(node.inputs) > 2 and node.inputs[2] and node.inputs[2] not in graph.initializers:
            continue
        weight = graph.initializers[node.inputs[1]]
        x = graph.value(node.inputs[0])
        spatial = weight.ndim - 2
        if spatial not in (1, 2, 3) or weight.dtype.kind != "f":
            continue
        attrs = _explicit(node.attrs, weight, x.shape)
        if attrs is None:
            continue
        graph.nodes[index] = node.replace(domain="kiln", attrs=attrs, origin=merged_origin(node))
        graph.opsets.setdefault("kiln", 1)
        ctx.counters["lower_conv"] += 1
        log.verbose("fuse_conv: %s becomes kiln::Conv", node.describe())
        changed = True
    return changed


def _explicit(attrs: dict, weight, input_shape) -> dict | None:
    """kiln::Conv's attributes for an ONNX Conv's, or None when auto_pad needs a shape we do not know."""
    from ..ops.nn import resolve_pads

    spatial = weight.ndim - 2
    kernel = list(attrs.get("kernel_shape") or weight.shape[2:])
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(attrs.get("pads") or [0] * (2 * spatial)) if auto_pad == "NOTSET" else [0] * (2 * spatial)
    else:
        if input_shape is None or not all(isinstance(d, int) for d in input_shape[2:]):
            return None
        pads = resolve_pads(auto_pad, list(input_shape[2:]), kernel, strides, dilations, None)
    return {"dilations": dilations, "group": int(attrs.get("group", 1)), "kernel_shape": kernel, "pads": list(pads),
            "strides": strides, "activation": "", "activation_params": []}
