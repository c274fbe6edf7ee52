"""Bias + residual + activation fusion: the elementwise work right after a kiln::Conv or kiln::Gemm
runs inside it (oneDNN post-ops on CPU), instead of as separate passes over memory.

kiln::Conv and kiln::Gemm take a residual Add or two-input Sum (same shape, before any activation) and
then an activation. Activations: Relu, LeakyRelu, Clip with constant bounds, Sigmoid,
Tanh, Gelu (ONNX or kiln), HardSwish, Swish, and x * Sigmoid(x) (SiLU)."""
from __future__ import annotations

import math

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, constant, known_shape, merged_origin, rewrite

FUSABLE = ("Conv", "Gemm")


def run(graph: Graph, ctx: PassContext) -> bool:
    changed = False
    while _fuse_once(graph, ctx):
        changed = True
    return changed


def _fuse_once(graph: Graph, ctx: PassContext) -> bool:
    near = Neighbours(graph)
    replaced = {}
    for node in graph.nodes:
        if node.domain != "kiln" or node.op not in FUSABLE or node.attrs.get("activation") or id(node) in replaced:
            continue
        user = near.only_user(node.outputs[0])
        silu = _silu_pair(near, node)
        if silu is not None:
            sigmoid, mul = silu
            replaced[id(sigmoid)] = None
            replaced[id(node)] = None
            replaced[id(mul)] = node.replace(outputs=mul.outputs, origin=merged_origin(node, sigmoid, mul),
                                             attrs={**node.attrs, "activation": "silu", "activation_params": []})
            ctx.counters["fuse_activation_silu"] += 1
            continue
        if user is None or id(user) in replaced:
            continue
        if user.op in ("Add", "Sum") and len(user.inputs) == 2 and not user.domain and len(node.inputs) < 4:
            other = user.inputs[1] if user.inputs[0] == node.outputs[0] else user.inputs[0]
            mine = known_shape(graph, node.outputs[0])  # a symbolic batch fuses too
            if other != node.outputs[0] and other not in graph.initializers and mine is not None and known_shape(graph, other) == mine \
                    and graph.value(other).dtype == graph.value(node.outputs[0]).dtype:
                bias = node.inputs[2] if len(node.inputs) > 2 else ""
                replaced[id(node)] = None
                replaced[id(user)] = node.replace(inputs=(node.inputs[0], node.inputs[1], bias, other), outputs=user.outputs,
                                                  origin=merged_origin(node, user))
                ctx.counters[f"fuse_{node.op.lower()}_residual"] += 1
                log.verbose("fuse_activation: residual %s into %s", user.describe(), node.describe())
            continue
        activation = _activation(graph, user)
        if activation is None:
            continue
        kind, params = activation
        replaced[id(node)] = None
        replaced[id(user)] = node.replace(outputs=user.outputs, origin=merged_origin(node, user),
                                          attrs={**node.attrs, "activation": kind, "activation_params": params})
        ctx.counters[f"fuse_activation_{kind}"] += 1
        log.verbose("fuse_activation: %s into %s", user.describe(), node.describe())
    if not replaced:
        return False
    rewrite(graph, replaced)
    return True


def _activation(graph: Graph, node) -> tuple[str, list[float]] | None:
    if node.domain == "kiln" and node.op == "Gelu":
        return ("gelu_tanh" if node.attrs.get("approximate") == "tanh" else "gelu"), []
    if node.domain:
        return None
    simple = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish"}
    if node.op in simple:
        return simple[node.op], []
    if node.op == "LeakyRelu":
        return "leaky_relu", [float(node.attrs.get("alpha", 0.01))]
    if node.op == "Gelu":
        return ("gelu_tanh" if node.attrs.get("approximate") == "tanh" else "gelu"), []
    if node.op == "Swish" and float(node.attrs.get("alpha", 1.0)) == 1.0:
        return "silu", []
    if node.op == "Clip":
        if "min" in node.attrs or "max" in node.attrs:  # opset 6 form
            return "clip", [float(node.attrs.get("min", -math.inf)), float(node.attrs.get("max", math.inf))]
        bounds = []
        for index, default in ((1, -math.inf), (2, math.inf)):
            name = node.inputs[index] if len(node.inputs) > index else ""
            if not name:
                bounds.append(default)
                continue
            array = constant(graph, name)
            if array is None or array.size != 1:
                return None
            bounds.append(float(array.reshape(())))
        return "clip", bounds
    return None


def _silu_pair(near: Neighbours, node):
    """(Sigmoid, Mul) when node's output y is read only by Sigmoid(y) and Mul(y, Sigmoid(y))."""
    users = near.users.get(node.outputs[0], [])
    if len(users) != 2 or node.outputs[0] in near.outputs:
        return None
    sigmoid = next((u for u in users if u.op == "Sigmoid" and not u.domain), None)
    mul = next((u for u in users if u.op == "Mul" and not u.domain), None)
    if sigmoid is None or mul is None or sorted(mul.inputs) != sorted((node.outputs[0], sigmoid.outputs[0])):
        return None
    return (sigmoid, mul) if near.only_user(sigmoid.outputs[0]) is mul else None
