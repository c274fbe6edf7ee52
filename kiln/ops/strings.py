"""String operators. torch holds no strings, so string tensors travel through engines as numpy object arrays
(kiln/tensors.py) and these kernels work on them with Python's str methods."""
from __future__ import annotations

import re

import numpy as np
import torch

from .registry import register


def _strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object)


@register("StringConcat", since=20)
def string_concat(x, y):
    return _strings(np.frompyfunc(lambda a, b: a + b, 2, 1)(x, y))


@register("StringSplit", since=20)
def string_split(x, *, delimiter=None, maxsplit=None):
    """Substrings padded with "" to the longest split, and how many each string had."""
    cut = -1 if maxsplit is None else maxsplit
    parts = [s.split(delimiter or None, cut) for s in x.reshape(-1).tolist()]
    width = max((len(p) for p in parts), default=0)
    padded = _strings([p + [""] * (width - len(p)) for p in parts]).reshape(tuple(x.shape) + (width,))
    counts = torch.tensor([len(p) for p in parts], dtype=torch.int64).reshape(tuple(x.shape))
    return padded, counts


@register("StringNormalizer", since=10)
def string_normalizer(x, *, case_change_action="NONE", is_case_sensitive=0, locale=None, stopwords=None):
    words = x.reshape(-1).tolist()
    if stopwords:
        stop = set(stopwords) if is_case_sensitive else {w.lower() for w in stopwords}
        words = [w for w in words if (w if is_case_sensitive else w.lower()) not in stop]
    if case_change_action == "LOWER":
        words = [w.lower() for w in words]
    elif case_change_action == "UPPER":
        words = [w.upper() for w in words]
    if not words:  # ONNX keeps one empty string when every word was a stopword
        words = [""]
    result = _strings(words)
    return result.reshape(1, -1) if x.ndim == 2 else result


@register("RegexFullMatch", since=20)
def regex_full_match(x, *, pattern):
    compiled = re.compile(pattern)
    flat = [compiled.fullmatch(s) is not None for s in x.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.bool).reshape(tuple(x.shape))


@register("LabelEncoder", since=2, domain="ai.onnx.ml")
def label_encoder(x, *, default_float=-0.0, default_int64=-1, default_string="_Unused", default_tensor=None,
                  keys_floats=None, keys_int64s=None, keys_strings=None, keys_tensor=None, values_floats=None,
                  values_int64s=None, values_strings=None, values_tensor=None):
    """Map each element through keys -> values; anything else takes the default of the values' type."""
    keys = next(k for k in (keys_strings, keys_int64s, keys_floats, keys_tensor) if k is not None)
    values = next(v for v in (values_strings, values_int64s, values_floats, values_tensor) if v is not None)
    keys, values = list(np.asarray(keys).reshape(-1).tolist()), np.asarray(values).reshape(-1)
    if values_tensor is not None:
        default = np.asarray(default_tensor).reshape(-1)[0] if default_tensor is not None else \
            ("_Unused" if values.dtype == object else -1 if values.dtype.kind in "iu" else -0.0)
    elif values_strings is not None:
        default = default_string
    elif values_int64s is not None:
        default = default_int64
    else:
        default = default_float
    table = dict(zip(keys, values.tolist()))
    source = x.reshape(-1).tolist()
    mapped = [table.get(item.decode() if isinstance(item, bytes) else item, default) for item in source]
    if values.dtype == object or values_strings is not None:
        return _strings(mapped).reshape(tuple(x.shape))
    if values_tensor is not None:  # a tensor attribute keeps its own element type (int16, float64, ...)
        return torch.from_numpy(np.asarray(mapped, dtype=values.dtype).reshape(tuple(x.shape)))
    dtype = torch.int64 if values_int64s is not None else torch.float32
    return torch.tensor(mapped, dtype=dtype).reshape(tuple(x.shape))
