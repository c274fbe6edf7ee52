"""Moving tensors between numpy (including ml_dtypes' bfloat16 and float8) and torch without loss."""
from __future__ import annotations

import numpy as np

from .ir.dtypes import CARRIED, DType, from_numpy, from_torch, to_numpy, to_torch

_BIT_VIEWS = {DType.bfloat16: np.uint16, DType.float8e4m3fn: np.uint8, DType.float8e5m2: np.uint8,
              DType.float8e4m3fnuz: np.uint8, DType.float8e5m2fnuz: np.uint8}


def numpy_to_device(array: np.ndarray, device: str):
    """`array` as a torch tensor on `device` (a GPU), copied once, by the transfer: numpy_to_torch's host copy
    before it would be a second pass over every weight (a BERT-base's 440 MB) for nothing."""
    array = np.asarray(array)
    dtype = from_numpy(array.dtype)
    if dtype == DType.string or dtype in _BIT_VIEWS or dtype in CARRIED or not _viewable(array):
        return numpy_to_torch(array).to(device)
    order = tuple(int(axis) for axis in np.argsort([-stride for stride in array.strides], kind="stable"))
    stored = array.transpose(order)  # a transposed view (a MatMul weight) as its bytes lie: goes up in one copy
    if not stored.flags.c_contiguous:
        stored, order = np.ascontiguousarray(array), tuple(range(array.ndim))
    inverse = tuple(int(axis) for axis in np.argsort(order))
    return _torch_view(stored).to(device).permute(inverse).contiguous()


def _viewable(array: np.ndarray) -> bool:
    """Whether torch.from_numpy can share `array`'s memory: native byte order and no negative strides."""
    return array.dtype.isnative and all(stride >= 0 for stride in array.strides)


def _torch_view(array: np.ndarray):
    """torch.from_numpy(array) for a caller that only reads it: a weight read from a model is a read-only array,
    which torch warns about sharing."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def numpy_to_torch(array: np.ndarray):
    """A torch tensor holding a C-contiguous copy of `array`."""
    import torch

    array = np.asarray(array)
    dtype = from_numpy(array.dtype)
    if dtype == DType.string:  # torch holds no strings: string tensors stay numpy object arrays
        return np.array(array, dtype=object, copy=True)
    if dtype in _BIT_VIEWS:
        bits = np.ascontiguousarray(array).reshape(array.shape).view(_BIT_VIEWS[dtype])  # ascontiguousarray makes 0-d 1-d
        return torch.from_numpy(bits.copy()).view(to_torch(dtype))
    if dtype in CARRIED:  # no torch type: carried in a wider one that holds every value exactly
        return torch.from_numpy(np.asarray(array).astype(CARRIED[dtype]))
    if array.flags.c_contiguous or array.ndim < 2 or not _viewable(array):
        return torch.from_numpy(np.array(array, copy=True, order="C"))
    return _torch_view(array).contiguous()  # a strided view: torch's blocked copy is about twice numpy's


def tensor_to_numpy(tensor) -> np.ndarray:
    """A numpy array holding `tensor`'s values (sharing memory where the dtype allows)."""
    if isinstance(tensor, np.ndarray):  # a string tensor
        return tensor
    tensor = tensor.detach().cpu()
    dtype = from_torch(tensor.dtype)
    if dtype in _BIT_VIEWS:
        import torch

        bits = tensor.contiguous().view(torch.uint16 if dtype == DType.bfloat16 else torch.uint8).numpy()
        return bits.view(to_numpy(dtype))
    return tensor.numpy()


def restore_carried(array: np.ndarray, dtype: DType) -> np.ndarray:
    """An output computed in a carrier type (int4 in int8, ...) as an array of its real element type."""
    return array.astype(to_numpy(dtype)) if dtype in CARRIED and isinstance(array, np.ndarray) else array
