"""Attention's scaled, masked softmax in one native pass (native.cpp's kiln_masked_softmax): softmax(s * scale + mask)
over the last axis of fp32 or bf16 scores, in place.

Why: torch scales, adds the mask and normalises in three passes, and its bf16 softmax is slow here: on BERT-base b8's
[8, 12, 128, 128] scores the three took 0.20, 0.19 and 0.55 ms a layer, about a tenth of the bf16 encoder.
"""
from __future__ import annotations

import ctypes

from . import native


class _SoftmaxArgs(ctypes.Structure):
    """native.cpp's SoftmaxArgs, field for field."""
    activations = ("s", "mask")
    _fields_ = [("s", ctypes.c_void_p), ("mask", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("d0", "d1", "d2", "n", "m0", "m1", "m2", "mn")] + \
               [("scale", ctypes.c_float)]


def takes(scores, mask) -> bool:
    """Whether the kernel runs softmax(scores * scale + mask) here: contiguous fp32 scores (bf16 where the library
    has bf16 kernels) of rank 2 to 4, and no mask or a float one that broadcasts to them without enlarging them."""
    import torch

    if not scores.is_contiguous() or not 2 <= scores.dim() <= 4 or not scores.numel():
        return False
    if scores.dtype not in (torch.float32, torch.bfloat16) or _kernel(scores.dtype) is None:
        return False
    if mask is None:
        return True
    return mask.dtype.is_floating_point and mask.dim() <= scores.dim() \
        and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape


def masked_softmax_(scores, mask, scale: float):
    """softmax(scores * scale + mask) over the last axis, written into `scores` (which `takes` accepts); returns it."""
    import torch

    rows = (1,) * (4 - scores.dim()) + tuple(scores.shape)
    mask, strides = broadcast_mask(mask, scores.shape)
    args = _SoftmaxArgs(scores.data_ptr(), mask.data_ptr() if mask is not None else None, *rows, *strides, scale)
    native.launch(_kernel(scores.dtype), args, torch.get_num_threads(), s=scores, mask=mask)
    return scores


def broadcast_mask(mask, shape) -> tuple:
    """(`mask` as the kernels read it: fp32, its last axis contiguous unless broadcast; its element strides when
    broadcast to `shape`, rank 4 with leading axes of stride 0), or (None, zeros) for no mask."""
    import torch

    if mask is None:
        return None, (0, 0, 0, 0)
    mask = mask.to(torch.float32)
    if mask.dim() and mask.shape[-1] != 1 and mask.stride(-1) != 1:
        mask = mask.contiguous()
    return mask, (0,) * (4 - len(shape)) + tuple(mask.expand(shape).stride())


def _kernel(dtype):
    """The library's softmax kernel for `dtype`, None where the library (or its bf16 kernels, for bf16) is absent."""
    return native.declared_kernel("kiln_masked_softmax", _SoftmaxArgs, 1, dtype)
