"""The element types kiln knows, and their names in ONNX, numpy and torch."""
from __future__ import annotations

import enum

import numpy as np

from ..errors import ParseError


class DType(enum.Enum):
    """An element type; the value is the ONNX TensorProto enum number."""

    float32 = 1
    uint8 = 2
    int8 = 3
    uint16 = 4
    int16 = 5
    int32 = 6
    int64 = 7
    string = 8
    bool = 9
    float16 = 10
    float64 = 11
    uint32 = 12
    uint64 = 13
    complex64 = 14
    complex128 = 15
    bfloat16 = 16
    float8e4m3fn = 17
    float8e4m3fnuz = 18
    float8e5m2 = 19
    float8e5m2fnuz = 20
    uint4 = 21
    int4 = 22
    float4e2m1 = 23
    float8e8m0 = 24
    uint2 = 25
    int2 = 26

    @property
    def is_float(self) -> bool:
        return self in FLOATS

    @property
    def itemsize(self) -> int:
        return 1 if self in (DType.uint4, DType.int4, DType.float4e2m1, DType.uint2, DType.int2) else to_numpy(self).itemsize

    @staticmethod
    def from_onnx(elem_type: int) -> "DType":
        try:
            return DType(elem_type)
        except ValueError:
            raise ParseError(f"unknown ONNX element type {elem_type}", code="KILN-E104") from None

    @staticmethod
    def parse(name: str) -> "DType":
        try:
            return DType[name]
        except KeyError:
            raise ParseError(f"unknown dtype {name!r}", hint=f"known: {', '.join(d.name for d in DType)}") from None


FLOATS = frozenset({DType.float32, DType.float16, DType.bfloat16, DType.float64, DType.float8e4m3fn,
                    DType.float8e4m3fnuz, DType.float8e5m2, DType.float8e5m2fnuz, DType.float4e2m1})
# The dtypes a kiln engine can bind as inputs and outputs (torch has a native tensor type for each).
BINDABLE = frozenset({DType.float32, DType.float16, DType.bfloat16, DType.float64, DType.int8, DType.uint8,
                      DType.int16, DType.int32, DType.int64, DType.bool,
                      DType.uint16, DType.float8e4m3fn, DType.float8e5m2,  # quantized models' int16/fp8 tensors
                      DType.uint32, DType.uint64, DType.float8e4m3fnuz, DType.float8e5m2fnuz,  # ONNX's test cases
                      DType.int4, DType.uint4, DType.int2, DType.uint2, DType.float4e2m1, DType.float8e8m0,
                      DType.string})  # strings travel as numpy object arrays (kiln/ops/strings.py)
# Element types torch has no tensor type for travel in a wider torch type that holds each of their values exactly;
# Cast converts into them with ml_dtypes' rounding and wrapping, and engines hand outputs back in the real type.
CARRIED = {DType.int4: "int8", DType.int2: "int8", DType.uint4: "uint8", DType.uint2: "uint8",
           DType.float4e2m1: "float32", DType.float8e8m0: "float32"}


def to_numpy(dtype: DType) -> np.dtype:
    import ml_dtypes

    special = {
        DType.bfloat16: ml_dtypes.bfloat16, DType.float8e4m3fn: ml_dtypes.float8_e4m3fn,
        DType.float8e4m3fnuz: ml_dtypes.float8_e4m3fnuz, DType.float8e5m2: ml_dtypes.float8_e5m2,
        DType.float8e5m2fnuz: ml_dtypes.float8_e5m2fnuz, DType.uint4: ml_dtypes.uint4, DType.int4: ml_dtypes.int4,
        DType.float4e2m1: ml_dtypes.float4_e2m1fn, DType.string: np.object_,
        DType.float8e8m0: ml_dtypes.float8_e8m0fnu, DType.uint2: ml_dtypes.uint2, DType.int2: ml_dtypes.int2,
    }
    if dtype in special:
        return np.dtype(special[dtype])
    return np.dtype(dtype.name)


def from_numpy(dtype: np.dtype) -> DType:
    dtype = np.dtype(dtype)
    for candidate in DType:
        if candidate not in (DType.string,) and _safe_to_numpy(candidate) == dtype:
            return candidate
    if dtype.kind in ("U", "S", "O"):
        return DType.string
    raise ParseError(f"numpy dtype {dtype} has no kiln equivalent", code="KILN-E104")


def _safe_to_numpy(dtype: DType):
    try:
        return to_numpy(dtype)
    except TypeError:
        return None


def to_torch(dtype: DType):
    import torch

    table = {
        DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16,
        DType.float64: torch.float64, DType.int8: torch.int8, DType.uint8: torch.uint8, DType.int16: torch.int16,
        DType.int32: torch.int32, DType.int64: torch.int64, DType.bool: torch.bool,
        DType.uint16: torch.uint16, DType.uint32: torch.uint32, DType.uint64: torch.uint64,
        DType.complex64: torch.complex64, DType.complex128: torch.complex128,
        DType.float8e4m3fn: torch.float8_e4m3fn, DType.float8e5m2: torch.float8_e5m2,
        DType.float8e4m3fnuz: torch.float8_e4m3fnuz, DType.float8e5m2fnuz: torch.float8_e5m2fnuz,
    }
    if dtype in CARRIED:
        return getattr(torch, CARRIED[dtype])
    if dtype not in table:
        raise ParseError(f"dtype {dtype.name} has no torch tensor type", code="KILN-E101")
    return table[dtype]


def from_torch(dtype) -> DType:
    name = str(dtype).removeprefix("torch.")
    aliases = {"float8_e4m3fn": "float8e4m3fn", "float8_e5m2": "float8e5m2",
               "float8_e4m3fnuz": "float8e4m3fnuz", "float8_e5m2fnuz": "float8e5m2fnuz"}
    return DType[aliases.get(name, name)]
