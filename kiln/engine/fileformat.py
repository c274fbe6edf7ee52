"""The .kiln engine file: data only, checked end to end.

Layout (little-endian):
    8 bytes   magic b"KILNENG\\0"
    4 bytes   format version (uint32)
    8 bytes   header length H (uint64), then H bytes of UTF-8 JSON (the plan, bindings, build info)
    8 bytes   weights length W (uint64), then W bytes of safetensors
    32 bytes  SHA-256 of everything before it
Loading parses JSON and safetensors only: nothing in the file is ever executed or unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import EngineFileError
from ..ir.dtypes import DType, from_numpy, to_numpy
from .plan import Plan, plan_from_data, plan_to_data

MAGIC = b"KILNENG\0"
FORMAT_VERSION = 1
_DIGEST = 32
_FIXED = len(MAGIC) + 4 + 8 + 8 + _DIGEST
_RAW_DTYPES = (DType.int4, DType.uint4, DType.float4e2m1)  # no torch type: stored as their bytes


def _weights_to_bytes(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    import safetensors.torch

    from ..tensors import numpy_to_torch

    tensors, raw = {}, {}
    for key, array in arrays.items():
        dtype = from_numpy(array.dtype)
        if dtype == DType.string:
            raise EngineFileError(f"weight {key} holds strings, which an engine cannot store", code="KILN-E500",
                                  hint="remove string constants from the model")
        if dtype in _RAW_DTYPES:
            raw[key] = dtype.name
            array = np.ascontiguousarray(array).view(np.uint8)
        tensors[key] = numpy_to_torch(np.ascontiguousarray(array).reshape(array.shape))  # ascontiguousarray makes 0-d 1-d
    return safetensors.torch.save(tensors), raw


def _weights_from_bytes(blob: bytes, raw: dict[str, str]) -> dict[str, np.ndarray]:
    import safetensors.torch

    from ..tensors import tensor_to_numpy

    arrays = {key: tensor_to_numpy(t) for key, t in safetensors.torch.load(blob).items()}
    for key, dtype in raw.items():
        arrays[key] = arrays[key].view(to_numpy(DType[dtype]))
    return arrays


def serialize(plan: Plan) -> bytes:
    data, arrays = plan_to_data(plan)
    weights, raw = _weights_to_bytes(arrays)
    data["raw_weights"] = raw
    header = json.dumps(data, separators=(",", ":"), allow_nan=True).encode("utf-8")
    body = b"".join([MAGIC, struct.pack("<I", FORMAT_VERSION), struct.pack("<Q", len(header)), header,
                     struct.pack("<Q", len(weights)), weights])
    return body + hashlib.sha256(body).digest()


def save(plan: Plan, path: str | os.PathLike) -> None:
    blob = serialize(plan)
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(blob)
    os.replace(temporary, path)


def read_header(blob: bytes, source: str = "engine") -> tuple[dict, int, int]:
    """Validate framing, version and checksum; return the header dict and the weights' span."""
    if len(blob) < len(MAGIC):
        if MAGIC.startswith(blob) and blob:
            raise EngineFileError(f"{source} is truncated ({len(blob)} bytes)", code="KILN-E502",
                                  hint="the file was cut short while copying or writing; rebuild or copy it again")
        raise EngineFileError(f"{source} is not a kiln engine file (it is {len(blob)} bytes long)", code="KILN-E501",
                              hint="pass a file written by `kiln build --saveEngine` or Engine.save")
    if blob[:len(MAGIC)] != MAGIC:
        raise EngineFileError(f"{source} is not a kiln engine file (wrong magic bytes {blob[:8]!r})", code="KILN-E501",
                              hint="pass a file written by `kiln build --saveEngine`; to build from a model use `kiln build model.onnx`")
    if len(blob) < len(MAGIC) + 4:
        raise _truncated(source, len(MAGIC) + 4, len(blob))
    (version,) = struct.unpack_from("<I", blob, len(MAGIC))
    if version > FORMAT_VERSION:
        raise EngineFileError(f"{source} uses engine format version {version}; this kiln reads versions up to {FORMAT_VERSION}",
                              code="KILN-E504", hint="upgrade kiln, or rebuild the engine with this kiln")
    if version < 1:
        raise EngineFileError(f"{source} has an invalid format version {version}", code="KILN-E503",
                              hint="the file is corrupted; rebuild it")
    offset = len(MAGIC) + 4
    if len(blob) < _FIXED:
        raise _truncated(source, _FIXED, len(blob))
    (header_length,) = struct.unpack_from("<Q", blob, offset)
    offset += 8
    if offset + header_length + 8 + _DIGEST > len(blob):
        raise _truncated(source, offset + header_length + 8 + _DIGEST, len(blob))
    header_bytes = blob[offset:offset + header_length]
    offset += header_length
    (weights_length,) = struct.unpack_from("<Q", blob, offset)
    offset += 8
    expected = offset + weights_length + _DIGEST
    if expected != len(blob):
        if expected > len(blob):
            raise _truncated(source, expected, len(blob))
        raise EngineFileError(f"{source} has {len(blob) - expected} unexpected trailing bytes", code="KILN-E503",
                              hint="the file is corrupted; rebuild it or copy it again")
    digest = blob[-_DIGEST:]
    if hashlib.sha256(blob[:-_DIGEST]).digest() != digest:
        raise EngineFileError(f"{source} is corrupted: its SHA-256 checksum does not match its contents", code="KILN-E503",
                              hint="the file was damaged on disk or in transfer; rebuild it or copy it again")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineFileError(f"{source} has an unreadable header: {error}", code="KILN-E503", hint="rebuild the engine") from None
    return header, offset, offset + weights_length


def _truncated(source: str, expected: int, found: int) -> EngineFileError:
    return EngineFileError(f"{source} is truncated: expected at least {expected} bytes, found {found}", code="KILN-E502",
                           hint="the file was cut short while copying or writing; rebuild or copy it again")


def deserialize(blob: bytes, source: str = "engine") -> Plan:
    header, start, end = read_header(blob, source)
    arrays = _weights_from_bytes(blob[start:end], header.get("raw_weights", {}))
    return plan_from_data(header, arrays)


def load_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.exists():
        raise EngineFileError(f"engine file {str(path)!r} does not exist", code="KILN-E501",
                              hint="build one with `kiln build model.onnx --saveEngine m.kiln`")
    if path.is_dir():
        raise EngineFileError(f"{str(path)!r} is a directory, not an engine file", code="KILN-E501",
                              hint="pass the .kiln file itself")
    return path.read_bytes()
