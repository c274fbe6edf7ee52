"""Reading an ONNX file's weights without protobuf: one read of the file, each large float weight a numpy view
of those bytes.

Through protobuf every weight byte is copied three times (the file read, the parse into protobuf's own memory,
and `raw_data` into numpy): for a BERT-base that is 1.3 GB of copying, about a second of a build. Here the file
is read once, the wire format of the model's graph is walked to find each initializer's `raw_data`, and protobuf
parses only the skeleton: the model without those initializers, each declared as a graph input instead, as
`split_weights` leaves it. The views are read-only, as numpy's arrays of a parsed model's weights are.

Only the top-level graph's float initializers with raw data are taken out; everything else (small or integer
tensors, typed-field data, external data, subgraphs) stays in the skeleton for protobuf.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from onnx import TensorProto, helper

# ModelProto.graph, GraphProto.initializer, and the TensorProto fields read here (onnx.proto's field numbers)
MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_SEGMENT, TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_DATA_LOCATION = 1, 2, 3, 8, 9, 14
# the initializers taken out of the skeleton (here and by onnx.split_weights) are of these types
FLOAT_WEIGHTS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_skeleton(data: bytes, min_elements: int) -> tuple[bytes, dict[str, tuple[np.ndarray, list[int], int]]]:
    """(the serialized skeleton, {name: (weight as a view of `data`, dims, ONNX data type)}) for the float
    initializers of more than `min_elements` elements that keep their values in raw_data."""
    if sys.byteorder != "little":  # raw_data is little-endian: a big-endian host reads it through onnx
        return data, {}
    view = memoryview(data)
    weights: dict = {}
    pieces = []
    for number, wire, start, value_start, end, _ in _fields(view, 0, len(view)):
        if number == MODEL_GRAPH and wire == LENGTH_DELIMITED:
            graph = _graph_without_weights(data, view, value_start, end, min_elements, weights)
            pieces.append(_key(MODEL_GRAPH, LENGTH_DELIMITED) + _varint_bytes(len(graph)) + graph)
        else:
            pieces.append(data[start:end])
    return (b"".join(pieces) if weights else data), weights


def _graph_without_weights(data: bytes, view: memoryview, start: int, end: int, min_elements: int, weights: dict) -> bytes:
    kept = []
    for number, wire, field_start, value_start, field_end, _ in _fields(view, start, end):
        if number == GRAPH_INITIALIZER and wire == LENGTH_DELIMITED:
            weight = _raw_float_weight(data, view, value_start, field_end, min_elements)
            if weight is not None and weight[0] not in weights:
                name, array, dims, data_type = weight
                weights[name] = (array, dims, data_type)
                continue
        kept.append(data[field_start:field_end])
    return b"".join(kept)


def _raw_float_weight(data: bytes, view: memoryview, start: int, end: int, min_elements: int):
    """(name, array, dims, data type) of a TensorProto that is a large float weight in raw_data, else None."""
    dims: list[int] = []
    data_type = TensorProto.UNDEFINED
    name = raw = None
    for number, wire, _, value_start, field_end, value in _fields(view, start, end):
        if number == TENSOR_DIMS:
            if wire == VARINT:
                dims.append(value)
            elif wire == LENGTH_DELIMITED:  # packed
                dims.extend(_packed_varints(view, value_start, field_end))
        elif number == TENSOR_DATA_TYPE and wire == VARINT:
            data_type = value
        elif number == TENSOR_NAME and wire == LENGTH_DELIMITED:
            name = bytes(view[value_start:field_end]).decode("utf-8", errors="replace")
        elif number == TENSOR_RAW_DATA and wire == LENGTH_DELIMITED:
            raw = (value_start, field_end)
        elif number == TENSOR_SEGMENT or (number == TENSOR_DATA_LOCATION and value != TensorProto.DEFAULT):
            return None  # a segment, or data kept in another file
    if name is None or raw is None or data_type not in FLOAT_WEIGHTS or math.prod(dims) <= min_elements:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    count = math.prod(dims)
    if count * dtype.itemsize != raw[1] - raw[0]:
        return None  # inconsistent: leave it to onnx, which reports it
    return name, np.frombuffer(data, dtype=dtype, count=count, offset=raw[0]).reshape(dims), dims, data_type


def _fields(view: memoryview, start: int, end: int):
    """(field number, wire type, field start, value start, field end, varint value or None) of each field of the
    message in view[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        value = None
        if wire == VARINT:
            value, pos = _varint(view, pos)
            value_start = pos
        elif wire == LENGTH_DELIMITED:
            length, value_start = _varint(view, pos)
            pos = value_start + length
        elif wire in (FIXED64, FIXED32):
            value_start = pos
            pos += 8 if wire == FIXED64 else 4
        else:
            raise WireError(f"wire type {wire} (groups are not written by ONNX)")
        if pos > end or number == 0:
            raise WireError("truncated or damaged message")
        yield number, wire, field_start, value_start, pos, value


def _packed_varints(view: memoryview, start: int, end: int):
    pos = start
    while pos < end:
        value, pos = _varint(view, pos)
        yield value


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise WireError("truncated varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def release_file_bytes(initializers: dict[str, np.ndarray]) -> None:
    """Copy out, in place in `initializers`, the weights that still view a model file's bytes when together they
    hold less than half of them, so that the file's bytes can be freed: after the optimizer has folded most weights
    into new arrays (a ResNet-50's convolutions), the few it left as they were (its 8 MB classifier) would otherwise
    keep the whole 98 MB file in memory for the engine's lifetime."""
    by_file: dict[int, tuple[bytes, list[str]]] = {}
    for name, array in initializers.items():
        base = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, bytes):
            by_file.setdefault(id(base), (base, []))[1].append(name)
    for data, names in by_file.values():
        if sum(initializers[name].nbytes for name in names) < len(data) / 2:
            for name in names:
                copy = np.array(initializers[name])
                copy.flags.writeable = False  # read-only, as the view was
                initializers[name] = copy
