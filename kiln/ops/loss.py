"""Training-graph losses that exported models keep: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss."""
from __future__ import annotations

import torch

from .registry import register


def _nll(log_prob, target, weight, reduction, ignore_index):
    """ONNX's NLL: -input[n, target[n, ...], ...] * weight[target]; "mean" divides by the summed weights."""
    target = target.to(torch.int64)
    ignored = target == ignore_index if ignore_index is not None else torch.zeros_like(target, dtype=torch.bool)
    safe = torch.where(ignored, 0, target)
    picked = -torch.gather(log_prob, 1, safe.unsqueeze(1)).squeeze(1)
    w = weight[safe] if weight is not None else torch.ones_like(picked)
    w = torch.where(ignored, torch.zeros_like(w), w)
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


@register("NegativeLogLikelihoodLoss", since=13)
def negative_log_likelihood_loss(x, target, weight=None, *, ignore_index=None, reduction="mean"):
    return _nll(x, target, weight, reduction, ignore_index).to(x.dtype)


@register("SoftmaxCrossEntropyLoss", since=13)
def softmax_cross_entropy_loss(scores, labels, weights=None, *, ignore_index=None, reduction="mean", _num_outputs=1):
    log_prob = torch.log_softmax(scores, dim=1)
    loss = _nll(log_prob, labels, weights, reduction, ignore_index).to(scores.dtype)
    return (loss, log_prob) if _num_outputs > 1 else loss
