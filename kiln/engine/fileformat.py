"""The .kiln engine file: data only, checked end to end.

Layout (little-endian):
    8 bytes   magic b"KILNENG\\0"
    4 bytes   format version (uint32)
    8 bytes   header length H (uint64), then H bytes of UTF-8 JSON (the plan, bindings, build info)
    8 bytes   weights length W (uint64), then W bytes of safetensors
    32 bytes  SHA-256 of everything before it
Loading parses JSON and safetensors only: nothing in the file is ever executed or unpickled.

The checksum always sits in the last 32 bytes, whatever the framing says, so a damaged fixed field (the format
version, a length) is told apart from a newer or truncated file: where the checksum matches once the field holds
what the rest of the file implies, only that field was damaged.
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
    from safetensors.torch import load as parse_safetensors  # parses tensors only (not torch.load's unpickling)

    from ..tensors import tensor_to_numpy

    arrays = {key: tensor_to_numpy(t) for key, t in parse_safetensors(blob).items()}
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
    path = _path(path, "Engine.save")
    if path.is_dir():
        raise EngineFileError(f"cannot write the engine to {str(path)!r}: it is a directory", code="KILN-E507",
                              where=str(path), hint=f"give a file name, e.g. {str(path / 'model.kiln')!r}")
    blob = serialize(plan)
    temporary = path.with_name(path.name + ".partial")
    try:
        temporary.write_bytes(blob)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        hint = ("create the directory first" if isinstance(error, FileNotFoundError) else
                "choose a place you may write to" if isinstance(error, PermissionError) else
                "free disk space or choose another place")
        raise EngineFileError(f"cannot write the engine to {str(path)!r}: {error.strerror or error}", code="KILN-E507",
                              where=str(path), hint=hint) from None


def _path(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise EngineFileError(f"{what} takes a file path (str or os.PathLike), got {type(path).__name__}",
                              code="KILN-E501", hint="pass the engine file's path, e.g. 'model.kiln'")
    return Path(path)


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
    intact = len(blob) >= _FIXED and _sealed(blob)
    if not (1 <= version <= FORMAT_VERSION) and not intact and _sealed_with(blob, version=range(1, FORMAT_VERSION + 1)):
        raise _damaged(source, f"its format-version field reads {version}, but the checksum matches the contents "
                               f"only with a version this kiln writes")
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
        if not intact and _length_fields_damaged(blob):
            raise _damaged(source, "its header-length field is damaged")
        raise _truncated(source, offset + header_length + 8 + _DIGEST, len(blob))
    header_bytes = blob[offset:offset + header_length]
    offset += header_length
    (weights_length,) = struct.unpack_from("<Q", blob, offset)
    offset += 8
    expected = offset + weights_length + _DIGEST
    if expected != len(blob):
        if not intact and _length_fields_damaged(blob):
            raise _damaged(source, "a length field of its framing is damaged")
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


def _sealed(blob: bytes) -> bool:
    return hashlib.sha256(blob[:-_DIGEST]).digest() == blob[-_DIGEST:]


def _sealed_with(blob: bytes, version=(), header_length: int | None = None, weights_length: int | None = None) -> bool:
    """Whether the checksum matches once the fixed fields hold the values given (each version tried in turn)."""
    body = bytearray(blob[:-_DIGEST])
    if header_length is not None:
        struct.pack_into("<Q", body, len(MAGIC) + 4, header_length)
        struct.pack_into("<Q", body, len(MAGIC) + 12 + header_length, weights_length)
    for candidate in version or [struct.unpack_from("<I", blob, len(MAGIC))[0]]:
        struct.pack_into("<I", body, len(MAGIC), candidate)
        if hashlib.sha256(body).digest() == blob[-_DIGEST:]:
            return True
    return False


def _length_fields_damaged(blob: bytes) -> bool:
    """Whether the file is whole but for its length fields: the header is the JSON object that starts after them
    (ASCII, as serialize writes it), the weights fill the rest, and with those lengths the checksum matches."""
    start = len(MAGIC) + 12
    try:
        _, end = json.JSONDecoder().raw_decode(blob[start:len(blob) - _DIGEST].decode("latin-1"))
    except ValueError:
        return False
    weights_length = len(blob) - _DIGEST - (start + end + 8)
    return weights_length >= 0 and _sealed_with(blob, header_length=end, weights_length=weights_length)


def _damaged(source: str, what: str) -> EngineFileError:
    return EngineFileError(f"{source} is corrupted: {what}", code="KILN-E503",
                           hint="the file was damaged on disk or in transfer; rebuild it or copy it again")


def _truncated(source: str, expected: int, found: int) -> EngineFileError:
    return EngineFileError(f"{source} is truncated: expected at least {expected} bytes, found {found}", code="KILN-E502",
                           hint="the file was cut short while copying or writing; rebuild or copy it again")


def deserialize(blob: bytes, source: str = "engine") -> Plan:
    import safetensors

    header, start, end = read_header(blob, source)
    try:
        arrays = _weights_from_bytes(blob[start:end], header.get("raw_weights", {}))
        return plan_from_data(header, arrays)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, safetensors.SafetensorError) as error:
        # The checksum matched, so the file is as its writer left it: the writer was not this format's.
        detail = f"missing entry {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise EngineFileError(f"{source} is sealed correctly but its contents are not a kiln format-{FORMAT_VERSION} "
                              f"engine ({detail})", code="KILN-E503",
                              hint="the file was written or edited by another tool; rebuild it with `kiln build`") from error


def load_bytes(path: str | os.PathLike) -> bytes:
    path = _path(path, "kiln.load")
    if not path.exists():
        raise EngineFileError(f"engine file {str(path)!r} does not exist", code="KILN-E501",
                              hint="build one with `kiln build model.onnx --saveEngine m.kiln`")
    if path.is_dir():
        raise EngineFileError(f"{str(path)!r} is a directory, not an engine file", code="KILN-E501",
                              hint="pass the .kiln file itself")
    try:
        return path.read_bytes()
    except OSError as error:
        raise EngineFileError(f"engine file {str(path)!r} cannot be read: {error.strerror or error}", code="KILN-E501",
                              where=str(path), hint="check the file's permissions") from None
