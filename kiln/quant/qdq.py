"""Explicit quantization: fold a model's own QuantizeLinear -> DequantizeLinear pair in front of a convolution or
matrix layer into kiln's int8 layer, keeping the model's scale.

After constant folding a QDQ model's weights are fp32 constants (DequantizeLinear of int8 weights, folded), and
each activation passes through Q -> DQ with the model's scale. Where that pair is symmetric int8 (zero point 0,
one scale: what nvidia-modelopt and onnxruntime with ActivationSymmetric write), the layer becomes kiln::QConv /
kiln::QGemm reading the unquantized input with the model's scale: the same int8 values, computed as int8.
Asymmetric pairs stay as written (their numerics are exact either way, through the Q/DQ kernels).
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node
from .weights import quantize_per_channel

LAYERS = {("kiln", "Conv"): "QConv", ("kiln", "Gemm"): "QGemm"}


def fold(graph: Graph) -> list[str]:
    """Rewrite every foldable layer in place; return the names of the layers now int8."""
    producers = graph.producers()
    folded = []
    nodes = []
    for node in graph.nodes:
        scale = _symmetric_int8_pair(graph, producers, node)
        if scale is None:
            nodes.append(node)
            continue
        dequantize = producers[node.inputs[0]]
        source = producers[dequantize.inputs[0]].inputs[0]
        quantized, weight_scale = quantize_per_channel(graph.initializers[node.inputs[1]])
        wq = graph.add_initializer(f"{node.name}.weight_int8", quantized)
        ws = graph.add_initializer(f"{node.name}.weight_scale", weight_scale)
        nodes.append(node.replace(op=LAYERS[(node.domain, node.op)], inputs=(source, wq, ws, *node.inputs[2:]),
                                  attrs=dict(node.attrs, x_scale=scale)))
        folded.append(node.name)
    graph.nodes = nodes
    return folded


def _symmetric_int8_pair(graph: Graph, producers: dict, node: Node) -> float | None:
    if (node.domain, node.op) not in LAYERS or node.inputs[1] not in graph.initializers:
        return None
    dequantize = producers.get(node.inputs[0])
    if dequantize is None or dequantize.op != "DequantizeLinear":
        return None
    quantize = producers.get(dequantize.inputs[0])
    if quantize is None or quantize.op != "QuantizeLinear" or quantize.attrs.get("block_size", 0):
        return None
    scales = [graph.initializers.get(n.inputs[1]) for n in (quantize, dequantize)]
    zeros = [graph.initializers.get(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None for n in (quantize, dequantize)]
    if any(s is None or s.size != 1 for s in scales) or float(scales[0].reshape(())) != float(scales[1].reshape(())):
        return None
    if any(z is None or z.dtype != np.int8 or np.any(z != 0) for z in zeros):
        return None  # asymmetric, uint8 or typed by output_dtype: kiln's int8 layers are symmetric int8
    return float(scales[0].reshape(()))
