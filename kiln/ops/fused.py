"""Fused operators in domain "kiln": what the optimization passes rewrite ONNX patterns into.

Each is registered with a reference CPU kernel (plain torch, fp32-exact); backends replace them
with fast tactics (kiln/backends/cpu/fast.py on CPU) but must match these kernels' numerics.
Graphs that hold them declare opset "kiln": 1.

kiln::Conv(X, W, B?, R?) -> Y
    Y = activation(conv(X, W) + B + R). Attributes as ONNX Conv, with `pads` always explicit
    (auto_pad resolved by the pass): dilations, group, kernel_shape, pads, strides; plus
    `activation` (str, "" for none; see ACTIVATIONS) and `activation_params` (list of floats).
    R is an optional residual of Y's shape, added before the activation (ResNet's Add + Relu).
    With `pool_kernel_shape` (the fuse_stem_pool pass, CPU bf16 builds), Y is then max-pooled as ONNX MaxPool with
    `pool_strides`, `pool_pads` (symmetric) and `pool_ceil_mode`: a network's stem and the pool after it.

kiln::Gemm(X, W, B?, R?) -> Y
    Y = activation(X @ W^T + B + R), X of any rank >= 2 contracting its last axis, W of shape [N, K]
    (already transposed the way torch.nn.Linear stores it), B of shape [N], R an optional residual
    of Y's shape (a transformer's skip connection). Attributes: `activation`, `activation_params`. Comes from Gemm with a constant B and from MatMul with a
    constant 2-D right operand followed by Add of a constant bias.

kiln::Attention(Q, K, V, M?) -> Y
    Scaled-dot-product attention over [..., S, D] tensors:
    Y = softmax(Q @ K^T * scale + M) @ V, M an optional additive mask of rank 2 up to the scores' rank that
    broadcasts to the scores' shape (torch's SDPA, the CPU and CUDA tactic, takes no 0-d or 1-d mask).
    Attribute `scale` (float). K is given untransposed ([..., S_k, D]).

kiln::Gelu(X) -> Y
    Y = 0.5 * X * (1 + erf(X / sqrt(2))); attribute `approximate` ("none" or "tanh") as ONNX
    Gelu-20. Lets models below opset 20 name GELU as one op.

kiln::Elementwise(X, A1, A2, ...) -> Y
    A chain of elementwise ops applied in order to a running value that starts as X. Attributes:
    `ops` (list of ONNX op names: unary Relu, Sigmoid, Tanh, Erf, Exp, Log, Sqrt, Neg, Abs,
    Reciprocal, Floor, Ceil; binary Add, Sub, Mul, Div, Pow) and `operands` (list of ints, one per
    op: 0 for a unary op; k > 0 for op(value, input k); -k for op(input k, value)). Numpy
    broadcasting as in ONNX. One kernel instead of one pass over memory per op.

Activations (the `activation` attribute, with `activation_params`):
    "relu"; "leaky_relu" [alpha]; "clip" [min, max]; "sigmoid"; "tanh"; "gelu" (erf form);
    "gelu_tanh"; "silu" (x * sigmoid(x), also ONNX Swish with alpha 1); "hardswish".
"""
from __future__ import annotations

from .registry import register

ACTIVATIONS = ("relu", "leaky_relu", "clip", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu", "hardswish")


def apply_activation(y, activation: str, params):
    """The reference activation of a fused op, in place on `y` where torch allows it."""
    import torch
    import torch.nn.functional as F

    if not activation:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, params[0])
    if activation == "clip":
        return torch.clamp(y, params[0], params[1])
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "tanh":
        return torch.tanh(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    if activation == "hardswish":
        return F.hardswish(y)
    raise AssertionError(f"unknown fused activation {activation!r}")


@register("Conv", since=1, domain="kiln")
def conv(x, w, b=None, residual=None, *, dilations=None, group=1, kernel_shape=None, pads=None, strides=None,
         activation="", activation_params=(), pool_kernel_shape=None, pool_strides=None, pool_pads=None,
         pool_ceil_mode=0):
    import torch.nn.functional as F

    spatial = x.dim() - 2
    strides = list(strides or [1] * spatial)
    dilations = list(dilations or [1] * spatial)
    pads = list(pads or [0] * (2 * spatial))
    symmetric = pads[:spatial] == pads[spatial:]
    if not symmetric:
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])])
    convolve = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    y = convolve(x, w, b, strides, pads[:spatial] if symmetric else 0, dilations, group)
    if residual is not None:
        y = y + residual
    y = apply_activation(y, activation, activation_params)
    if pool_kernel_shape:
        y = F.max_pool2d(y, list(pool_kernel_shape), list(pool_strides), list(pool_pads)[:2], ceil_mode=bool(pool_ceil_mode))
    return y


@register("Gemm", since=1, domain="kiln")
def gemm(x, w, b=None, residual=None, *, activation="", activation_params=(), x_amax=None):
    """x_amax: the largest |x| calibration saw, set by --fp8 builds for the GPU's fp8 tactics; unused here."""
    import torch.nn.functional as F

    y = F.linear(x, w, b)
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation, activation_params)


@register("Attention", since=1, domain="kiln")
def attention(q, k, v, mask=None, *, scale=1.0):
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@register("Gelu", since=1, domain="kiln")
def gelu(x, *, approximate="none"):
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh" if approximate == "tanh" else "none")



UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
         "Neg": "neg", "Abs": "abs", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow"}


@register("Elementwise", since=1, domain="kiln")
def elementwise(x, *extra, ops=(), operands=()):
    import torch

    value, start = x, 0
    if tuple(ops[:2]) == ("Mul", "Add"):  # x * s + t (an inference BatchNormalization) in one pass instead of two
        scale, shift = extra[abs(operands[0]) - 1], extra[abs(operands[1]) - 1]
        if scale.dtype == shift.dtype == x.dtype and torch.broadcast_shapes(x.shape, scale.shape, shift.shape) == x.shape:
            value, start = torch.addcmul(shift, x, scale), 2
    for step, (op, operand) in enumerate(zip(ops, operands)):
        if step < start:
            continue
        if op in UNARY:
            # after the first step the running value is ours, so it is updated in place
            value = getattr(value, UNARY[op] + "_")() if step else getattr(torch, UNARY[op])(value)
            continue
        other = extra[abs(operand) - 1]
        left, right = (value, other) if operand > 0 else (other, value)
        function = getattr(torch, BINARY[op])
        in_place = step and other.dtype == value.dtype and torch.broadcast_shapes(value.shape, other.shape) == value.shape
        value = function(left, right, out=value) if in_place else function(left, right)
    return value
