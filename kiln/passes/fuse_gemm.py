"""Gemm / MatMul + bias lowering to kiln::Gemm (y = x @ W^T + b): ONNX Gemm with a constant right
operand, and MatMul by a constant 2-D matrix followed by Add of a constant bias, become one
fully-connected layer whose weight is stored [N, K] as oneDNN's and torch's linear layers want it."""
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
        if node.domain or id(node) in replaced:
            continue
        if node.op == "Gemm":
            fused = _from_gemm(graph, node)
            if fused is not None:
                replaced[id(node)] = fused
                ctx.counters["lower_gemm"] += 1
                log.verbose("fuse_gemm: %s becomes kiln::Gemm", node.describe())
        elif node.op == "MatMul":
            weight = constant(graph, node.inputs[1])
            if weight is None or weight.ndim != 2 or weight.dtype.kind != "f" or graph.value(node.inputs[0]).rank in (None, 1):
                continue
            w_name = graph.add_initializer(f"{node.name or 'matmul'}_weight", transposed(weight))
            fused = node.replace(op="Gemm", domain="kiln", inputs=(node.inputs[0], w_name),
                                 attrs={"activation": "", "activation_params": []}, origin=merged_origin(node))
            add = near.only_user(node.outputs[0])
            if add is not None and add.op == "Add" and not add.domain:
                other = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
                bias = constant(graph, other)
                if bias is not None and bias.dtype == weight.dtype and bias.size == weight.shape[1] and bias.ndim >= 1 \
                        and all(d == 1 for d in bias.shape[:-1]) and bias.ndim <= graph.value(node.inputs[0]).rank:
                    b_name = graph.add_initializer(f"{node.name or 'matmul'}_bias", bias.reshape(-1).copy())
                    fused = fused.replace(inputs=(node.inputs[0], w_name, b_name), outputs=add.outputs,
                                          origin=merged_origin(node, add))
                    replaced[id(add)] = fused
                    replaced[id(node)] = None
                    ctx.counters["fuse_matmul_bias"] += 1
                    log.verbose("fuse_gemm: %s + %s become kiln::Gemm", node.describe(), add.describe())
                    continue
            replaced[id(node)] = fused
            ctx.counters["lower_matmul"] += 1
            log.verbose("fuse_gemm: %s becomes kiln::Gemm", node.describe())
    if not replaced:
        return False
    graph.opsets.setdefault("kiln", 1)
    rewrite(graph, replaced)
    return True


def _from_gemm(graph: Graph, node):
    a = graph.value(node.inputs[0])
    weight = constant(graph, node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype.kind != "f" or node.attrs.get("transA", 0) or a.rank != 2:
        return None
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    w = weight if node.attrs.get("transB", 0) else transposed(weight)
    w = (w * alpha if alpha != 1.0 else w).astype(weight.dtype, copy=False)
    inputs = [node.inputs[0], graph.add_initializer(f"{node.name or 'gemm'}_weight", w)]
    if len(node.inputs) > 2 and node.inputs[2]:
        bias = constant(graph, node.inputs[2])
        if bias is None or bias.size not in (1, w.shape[0]) or (bias.ndim == 2 and bias.shape[0] != 1):
            return None
        bias = np.broadcast_to((bias * beta).reshape(-1), (w.shape[0],)).astype(weight.dtype)
        inputs.append(graph.add_initializer(f"{node.name or 'gemm'}_bias", np.ascontiguousarray(bias)))
    return node.replace(domain="kiln", inputs=tuple(inputs), attrs={"activation": "", "activation_params": []},
                        origin=merged_origin(node))


def transposed(matrix: np.ndarray) -> np.ndarray:
    """matrix.T as a view: no pass copies it here. The backend that takes the weight lays it out (numpy_to_torch
    with torch's blocked copy on the CPU, the GPU after the transfer), so the build copies a BERT-base's 72 weight
    matrices (340 MB) once, not twice."""
    return matrix.T
