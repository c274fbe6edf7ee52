"""bf16 attention in one native pass a head (native.cpp's kiln_attention_bf16): softmax(q k^T * scale + mask) v with
the scores kept in fp32 in L1, for the [batch, heads, seq, head size] tensors a BERT-like encoder hands kiln::Attention.

Why: as torch calls (two batched products around the native softmax, softmax.py) BERT-base's attention took 17.3 ms of
its 205 in bf16 at b8, and 3.3-3.6 of 31 at b1: about three times its products' multiply-adds at the rate the same
dot products reach in the convolutions.
"""
from __future__ import annotations

import ctypes

from . import native, softmax


class _AttentionArgs(ctypes.Structure):
    """native.cpp's AttentionArgs, field for field."""
    activations = ("q", "k", "v", "mask", "o")
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "mask", "o")] + \
               [(name, ctypes.c_int64) for name in ("batch", "heads", "queries", "keys", "d")] + \
               [(name, ctypes.c_int64 * size) for name, size in (("qs", 3), ("ks", 3), ("vs", 3), ("ms", 4))] + \
               [("scale", ctypes.c_float)]


def available() -> bool:
    """Whether the kernel runs here: the native library with its bf16 kernels."""
    return _kernel() is not None


def takes(q, k, v, mask) -> bool:
    """Whether the kernel runs this attention: bf16 q, k, v of rank 4 ([batch, heads, seq, head size], the head size
    contiguous and a multiple of 16, the keys a multiple of 16), and no mask or a float one of rank <= 4 that
    broadcasts to the scores without enlarging them."""
    import torch

    if _kernel() is None or any(t.dtype != torch.bfloat16 or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    (batch, heads, queries, d), keys = q.shape, k.shape[2]
    if k.shape != (batch, heads, keys, d) or v.shape != k.shape or d % 16 or keys % 16 or not queries:
        return False
    if mask is None:
        return True
    scores = (batch, heads, queries, keys)
    return mask.dtype.is_floating_point and mask.dim() <= 4 and torch.broadcast_shapes(scores, mask.shape) == scores


def attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale + mask) v as a new contiguous bf16 tensor (for inputs `takes` accepts)."""
    import torch

    (batch, heads, queries, d), keys = q.shape, k.shape[2]
    o = torch.empty(batch, heads, queries, d, dtype=torch.bfloat16)
    mask, strides = softmax.broadcast_mask(mask, (batch, heads, queries, keys))
    args = _AttentionArgs(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None,
                          o.data_ptr(), batch, heads, queries, keys, d, (ctypes.c_int64 * 3)(*q.stride()[:3]),
                          (ctypes.c_int64 * 3)(*k.stride()[:3]), (ctypes.c_int64 * 3)(*v.stride()[:3]),
                          (ctypes.c_int64 * 4)(*strides), scale)
    native.launch(_kernel(), args, torch.get_num_threads(), q=q, k=k, v=v, mask=mask, o=o)
    return o


def _kernel():
    """The library's bf16 attention kernel (kiln_attention_bf16), None where the library or its bf16 kernels are absent."""
    import torch

    return native.declared_kernel("kiln_attention", _AttentionArgs, 1, torch.bfloat16)
