"""Classical-ML operators of the ai.onnx.ml domain that exported pipelines carry: Binarizer, ArrayFeatureExtractor,
TreeEnsemble (opset 5's single tree-ensemble operator)."""
from __future__ import annotations

import numpy as np
import torch

from .registry import register

_ML = "ai.onnx.ml"


@register("Binarizer", since=1, domain=_ML)
def binarizer(x, *, threshold=0.0):
    return (x > threshold).to(x.dtype)


@register("ArrayFeatureExtractor", since=1, domain=_ML)
def array_feature_extractor(x, indices):
    return x[..., indices.reshape(-1).to(torch.int64)]


# Node modes of TreeEnsemble: how a node compares the feature with its split value.
_COMPARE = {
    0: lambda v, s: v <= s, 1: lambda v, s: v < s, 2: lambda v, s: v >= s, 3: lambda v, s: v > s,
    4: lambda v, s: v == s, 5: lambda v, s: v != s,
}


def _members(modes, membership_values):
    """The value set of each BRANCH_MEMBER node (mode 6), from the NaN-separated membership_values list."""
    sets, current, groups = {}, [], []
    for value in (membership_values if membership_values is not None else []):
        if np.isnan(value):
            groups.append(set(current))
            current = []
        else:
            current.append(float(value))
    if current:
        groups.append(set(current))
    members = iter(groups)
    for node, mode in enumerate(modes):
        if mode == 6:
            sets[node] = next(members, set())
    return sets


@register("TreeEnsemble", since=5, domain=_ML)
def tree_ensemble(x, *, aggregate_function=1, leaf_targetids, leaf_weights, membership_values=None, n_targets,
                  nodes_falseleafs, nodes_falsenodeids, nodes_featureids, nodes_hitrates=None,
                  nodes_missing_value_tracks_true=None, nodes_modes, nodes_splits, nodes_trueleafs, nodes_truenodeids,
                  post_transform=0, tree_roots):
    data = x.double().numpy()
    modes = np.asarray(nodes_modes).reshape(-1).astype(int).tolist()
    splits = np.asarray(nodes_splits, dtype=np.float64).reshape(-1)
    weights = np.asarray(leaf_weights, dtype=np.float64).reshape(-1)
    members = _members(modes, np.asarray(membership_values, dtype=np.float64).reshape(-1)
                       if membership_values is not None else None)
    missing_true = list(nodes_missing_value_tracks_true or [0] * len(modes))
    result = np.zeros((data.shape[0], n_targets))
    for row in range(data.shape[0]):
        per_tree = []
        for root in tree_roots:
            node, leaf = root, None
            while leaf is None:
                value = data[row, nodes_featureids[node]]
                if np.isnan(value):
                    goes_true = bool(missing_true[node])
                elif modes[node] == 6:
                    goes_true = value in members[node]
                else:
                    goes_true = bool(_COMPARE[modes[node]](value, splits[node]))
                target, is_leaf = (nodes_truenodeids[node], nodes_trueleafs[node]) if goes_true else \
                    (nodes_falsenodeids[node], nodes_falseleafs[node])
                if is_leaf:
                    leaf = target
                else:
                    node = target
            per_tree.append((leaf_targetids[leaf], weights[leaf]))
        for target in range(n_targets):
            values = [w for t, w in per_tree if t == target]
            if not values:
                continue
            result[row, target] = {0: np.mean, 1: np.sum, 2: np.min, 3: np.max}[aggregate_function](values)
    scores = torch.from_numpy(result)
    if post_transform == 1:
        scores = torch.softmax(scores, -1)
    elif post_transform == 2:
        scores = torch.sigmoid(scores)
    elif post_transform == 3:
        scores = torch.where(scores == 0, scores, torch.softmax(torch.where(scores == 0, -torch.inf, scores), -1))
    elif post_transform == 4:
        scores = torch.special.ndtri(scores)
    return scores.to(x.dtype)
