"""Optimizer update rules of ai.onnx.preview.training (Adagrad, Momentum, Adam): one step on each tensor given."""
from __future__ import annotations

import torch

from .registry import register

_DOMAIN = "ai.onnx.preview.training"


def _groups(tensors, count):
    n = len(tensors) // count
    return [tensors[i * n:(i + 1) * n] for i in range(count)]


@register("Adagrad", since=1, domain=_DOMAIN)
def adagrad(rate, step, *tensors, decay_factor=0.0, epsilon=1e-6, norm_coefficient=0.0):
    r = rate / (1 + step * decay_factor)
    xs, gs, hs = _groups(tensors, 3)
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        g = norm_coefficient * x + g
        h = h + g * g
        new_x.append(x - r * g / (torch.sqrt(h) + epsilon))
        new_h.append(h)
    return tuple(new_x + new_h)


@register("Momentum", since=1, domain=_DOMAIN)
def momentum(rate, step, *tensors, alpha, beta, mode, norm_coefficient):
    xs, gs, vs = _groups(tensors, 3)
    scale = beta if int(step) > 0 else 1.0  # the first step takes the whole gradient
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        g = norm_coefficient * x + g
        v = alpha * v + scale * g
        new_x.append(x - rate * (g + alpha * v) if mode == "nesterov" else x - rate * v)
        new_v.append(v)
    return tuple(new_x + new_v)


@register("Adam", since=1, domain=_DOMAIN)
def adam(rate, step, *tensors, alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.0, norm_coefficient_post=0.0):
    xs, gs, vs, hs = _groups(tensors, 4)
    t = float(step)
    r = rate * (1 - beta ** t) ** 0.5 / (1 - alpha ** t) if t > 0 else rate  # bias correction
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs):
        g = norm_coefficient * x + g
        v = alpha * v + (1 - alpha) * g
        h = beta * h + (1 - beta) * g * g
        new_x.append((1 - norm_coefficient_post) * (x - r * v / (torch.sqrt(h) + epsilon)))
        new_v.append(v)
        new_h.append(h)
    return tuple(new_x + new_v + new_h)
