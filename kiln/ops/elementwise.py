"""Elementwise operators: unary math, activations, binary arithmetic, comparison and logic."""
from __future__ import annotations

import functools

import numpy as np
import torch

from .registry import register

_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos,
    "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Sign": torch.sign, "Not": torch.logical_not,
    "Softsign": torch.nn.functional.softsign, "Softplus": torch.nn.functional.softplus, "IsNaN": torch.isnan,
    "Round": torch.round, "BitwiseNot": torch.bitwise_not, "Mish": torch.nn.functional.mish,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": None, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "Equal": None, "Less": torch.lt, "LessOrEqual": torch.le,
    "Greater": torch.gt, "GreaterOrEqual": torch.ge, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}


# torch stores uint16/32/64 but implements little arithmetic on them: compute in int64 and cast back
# (exact for uint16/32; uint64 keeps its bits through int64's wrap-around for +, -, *, bit operations).
_WIDEN = None


def widen_unsigned(fn):
    """Wrap a kernel so uint16/32/64 tensor inputs are computed in int64 and integer results cast back."""

    @functools.wraps(fn)
    def kernel(*inputs, **attributes):
        global _WIDEN
        if _WIDEN is None:
            _WIDEN = {torch.uint16, torch.uint32, torch.uint64}
        unsigned = next((x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.dtype in _WIDEN), None)
        if unsigned is None:
            return fn(*inputs, **attributes)
        wide = [x.to(torch.int64) if isinstance(x, torch.Tensor) and x.dtype in _WIDEN else x for x in inputs]
        result = fn(*wide, **attributes)
        cast = lambda r: r.to(unsigned) if isinstance(r, torch.Tensor) and r.dtype == torch.int64 else r  # noqa: E731
        return tuple(cast(r) for r in result) if isinstance(result, tuple) else cast(result)

    return kernel


def _register_unary(op: str, fn) -> None:
    register(op, since=1)(widen_unsigned(lambda x: fn(x)))


def _register_binary(op: str, fn) -> None:
    register(op, since=1)(widen_unsigned(lambda a, b: fn(a, b)))


for _op, _fn in _UNARY.items():
    _register_unary(_op, _fn)
for _op, _fn in _BINARY.items():
    if _fn is not None:
        _register_binary(_op, _fn)


@register("Equal", since=1)
@widen_unsigned
def equal(a, b):
    if not isinstance(a, torch.Tensor):  # string tensors are numpy object arrays
        return torch.from_numpy(np.asarray(np.equal(a, b), dtype=bool))
    return torch.eq(a, b)


@register("Div", since=1)
@widen_unsigned
def div(a, b):
    if a.is_floating_point() or a.is_complex():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@register("Pow", since=1)
def pow_(x, y):
    result = torch.pow(x, y)
    return result.to(x.dtype)


@register("Mod", since=10)
@widen_unsigned
def mod(a, b, *, fmod=0):
    # fmod=0 takes the divisor's sign (Python's %), for floats too, as ONNX's reference does.
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


@register("Identity", since=1)
def identity(x):
    return x


@register("IsInf", since=10)
def is_inf(x, *, detect_negative=1, detect_positive=1):
    return (torch.isneginf(x) & bool(detect_negative)) | (torch.isposinf(x) & bool(detect_positive))


@register("LeakyRelu", since=6)
def leaky_relu(x, *, alpha=0.01):
    return torch.nn.functional.leaky_relu(x, alpha)


@register("Elu", since=6)
def elu(x, *, alpha=1.0):
    return torch.nn.functional.elu(x, alpha)


@register("Selu", since=6)
def selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("Celu", since=12)
def celu(x, *, alpha=1.0):
    return torch.nn.functional.celu(x, alpha)


@register("ThresholdedRelu", since=10)
def thresholded_relu(x, *, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@register("HardSigmoid", since=6)
def hard_sigmoid(x, *, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0, 1)


@register("HardSwish", since=14)
def hard_swish(x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@register("Gelu", since=20)
def gelu(x, *, approximate="none"):
    return torch.nn.functional.gelu(x, approximate=approximate)


@register("PRelu", since=9)
def prelu(x, slope):
    if slope.dim() == 1 and x.dim() > 2 and slope.shape[0] == x.shape[1] != x.shape[-1]:
        slope = slope.reshape((-1,) + (1,) * (x.dim() - 2))  # per-channel slope, as opset < 7 exporters wrote it
    return torch.where(x >= 0, x, x * slope)


@register("Clip", since=11)
@widen_unsigned
def clip(x, low=None, high=None):
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


@register("Clip", since=6)
def clip_6(x, *, min=-3.4028234663852886e38, max=3.4028234663852886e38):  # noqa: A002 (ONNX's names)
    return torch.clamp(x, min, max)


def _variadic(fn):
    def kernel(*inputs):
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return result

    return kernel


register("Sum", since=8)(widen_unsigned(_variadic(torch.add)))
register("Max", since=8)(widen_unsigned(_variadic(torch.maximum)))
register("Min", since=8)(widen_unsigned(_variadic(torch.minimum)))


@register("Mean", since=8)
def mean(*inputs):
    return _variadic(torch.add)(*inputs) / len(inputs)


@register("Where", since=9)
@widen_unsigned
def where(condition, x, y):
    return torch.where(condition, x, y)


@register("BitShift", since=11)
@widen_unsigned
def bit_shift(x, y, *, direction):
    return torch.bitwise_left_shift(x, y) if direction == "LEFT" else torch.bitwise_right_shift(x, y)


@register("Shrink", since=9)
def shrink(x, *, bias=0.0, lambd=0.5):
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@register("Swish", since=24)
def swish(x, *, alpha=1.0):
    return x * torch.sigmoid(alpha * x)
