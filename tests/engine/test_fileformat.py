"""The .kiln file: a faithful round trip, and a clear KILN-E5xx for every way a file can be wrong."""
import hashlib
import json
import pickle
import struct

import numpy as np
import pytest
from helpers import make_model
from onnx import helper

import kiln
from kiln.engine import fileformat


@pytest.fixture(scope="module")
def engine():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    return kiln.build(make_model(nodes, {"x": np.zeros((2, 8), np.float32)}, ["z"], {"w": w}))


@pytest.fixture()
def blob(engine):
    return engine.serialize()


def _rewrap(body: bytes) -> bytes:
    """Re-seal a modified file body with a valid checksum, to test the checks behind it."""
    return body + hashlib.sha256(body).digest()


def _with_header(blob: bytes, change) -> bytes:
    header, start, end = fileformat.read_header(blob)
    change(header)
    encoded = json.dumps(header).encode()
    weights = blob[start:end]
    return _rewrap(blob[:12] + struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", len(weights)) + weights)


def test_round_trip_gives_identical_results(engine, blob, tmp_path):
    path = tmp_path / "m.kiln"
    engine.save(path)
    assert path.read_bytes()[:8] == b"KILNENG\0"
    loaded = kiln.load(path)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.run({"x": x})["z"], engine.run({"x": x})["z"])
    assert [str(b) for b in loaded.inputs] == [str(b) for b in engine.inputs]
    assert kiln.load(blob).outputs[0].name == "z"


def test_header_records_build_info(blob):
    header, _, _ = fileformat.read_header(blob)
    assert {"kiln", "torch", "onnx"} <= set(header["build_info"])
    assert header["target"]["device"] == "cpu"


@pytest.mark.parametrize("cut", [4, 20, 100, -40, -1])
def test_truncated_file(blob, cut, tmp_path):
    path = tmp_path / "cut.kiln"
    path.write_bytes(blob[:cut])
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(path)
    assert error.value.code == "KILN-E502" and "truncated" in str(error.value)


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_bit_flip_is_caught_by_the_checksum(blob, where, tmp_path):
    damaged = bytearray(blob)
    position = 24 + int((len(blob) - 24 - 32) * where)
    damaged[position] ^= 0x10
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(bytes(damaged))
    assert error.value.code == "KILN-E503" and "checksum" in str(error.value)


def test_wrong_magic(blob, tmp_path):
    path = tmp_path / "model.onnx.kiln"
    path.write_bytes(b"\x08\x07\x12\x04" + blob[4:])
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(path)
    assert error.value.code == "KILN-E501" and "not a kiln engine" in str(error.value)


def test_newer_format_version(blob):
    newer = _rewrap(blob[:8] + struct.pack("<I", fileformat.FORMAT_VERSION + 1) + blob[12:-32])
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(newer)
    assert error.value.code == "KILN-E504" and "upgrade kiln" in error.value.hint


def test_engine_for_a_gpu_on_a_machine_without_one(blob, monkeypatch):
    import kiln.engine.target as target

    monkeypatch.setattr(target, "cuda_available", lambda: False)
    foreign = _with_header(blob, lambda h: h.update(target={"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}))
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(foreign)
    assert error.value.code == "KILN-E505" and "H100" in str(error.value) and "rebuild" in error.value.hint


def test_engine_needing_cpu_features_this_cpu_lacks(blob):
    foreign = _with_header(blob, lambda h: h["target"].update(cpu_features=["avx512_bf16", "imaginary_isa_9000"]))
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(foreign)
    assert error.value.code == "KILN-E505" and "imaginary_isa_9000" in str(error.value)


def test_engine_for_another_cpu_architecture(blob):
    foreign = _with_header(blob, lambda h: h["target"].update(machine="riscv128"))
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(foreign)
    assert error.value.code == "KILN-E505"


def test_loading_never_unpickles(blob, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("kiln.load must never unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    kiln.load(blob)


def test_missing_file_and_directory(tmp_path):
    for path, words in ((tmp_path / "absent.kiln", "does not exist"), (tmp_path, "directory")):
        with pytest.raises(kiln.EngineFileError) as error:
            kiln.load(path)
        assert error.value.code == "KILN-E501" and words in str(error.value)


def test_weights_of_every_bindable_dtype_survive(tmp_path):
    import ml_dtypes

    arrays = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "i8": np.int8, "u8": np.uint8, "i32": np.int32,
              "f64": np.float64, "b": np.bool_}
    from kiln.engine.plan import Plan
    from kiln.ir import Graph, Node, Value, DType

    inits = {name: (np.arange(6).reshape(2, 3) % 2).astype(dtype) for name, dtype in arrays.items()}
    nodes = [Node("Identity", (name,), (f"out_{name}",), name=f"n_{name}") for name in arrays]
    graph = Graph(nodes, [], [Value(f"out_{name}") for name in arrays], initializers=inits)
    plan = Plan(graph=graph, target={"device": "cpu", "cpu_features": []})
    back = fileformat.deserialize(fileformat.serialize(plan))
    for name, array in inits.items():
        assert back.graph.initializers[name].dtype == array.dtype
        np.testing.assert_array_equal(back.graph.initializers[name].astype(np.float64), array.astype(np.float64))
    assert DType.bfloat16.itemsize == 2


@pytest.mark.parametrize("field, span", [("format version", range(8, 12)), ("header length", range(12, 20)),
                                         ("weights length", "weights")])
def test_bit_flip_in_a_fixed_field_is_corruption_not_a_newer_or_truncated_file(blob, field, span):
    # A damaged version must not send the user to upgrade kiln, nor a damaged length to copy the file again
    # as if it were cut short: every single-bit flip of these fields is KILN-E503.
    header, start, _ = fileformat.read_header(blob)
    positions = span if field != "weights length" else range(start - 8, start)
    for position in positions:
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[position] ^= 1 << bit
            with pytest.raises(kiln.EngineFileError) as error:
                kiln.load(bytes(damaged))
            assert error.value.code == "KILN-E503" and "corrupted" in str(error.value), (field, position, bit, error.value)


def test_sealed_file_whose_contents_are_not_a_plan(blob):
    # A valid checksum over contents this kiln did not write (another tool, a hand edit): E503, never a KeyError.
    for change in (lambda h: h.pop("graph"), lambda h: h["graph"]["inputs"][0].update(dtype="float128"),
                   lambda h: h.update(raw_weights={"w0": "int3"})):
        with pytest.raises(kiln.EngineFileError) as error:
            kiln.load(_with_header(blob, change))
        assert error.value.code == "KILN-E503" and "not a kiln format-1 engine" in str(error.value)
    header, start, end = fileformat.read_header(blob)
    encoded = json.dumps(header).encode()
    garbage = b"\x10" + b"\x00" * 7 + b"{}not-safetensors"
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(_rewrap(blob[:12] + struct.pack("<Q", len(encoded)) + encoded + struct.pack("<Q", len(garbage)) + garbage))
    assert error.value.code == "KILN-E503"


def test_save_and_load_refuse_bad_paths_with_a_kiln_error(engine, tmp_path):
    for target, words in ((tmp_path / "absent" / "m.kiln", "create the directory"), (tmp_path, "give a file name")):
        with pytest.raises(kiln.EngineFileError) as error:
            engine.save(target)
        assert error.value.code == "KILN-E507" and words in error.value.hint
    assert list(tmp_path.iterdir()) == [], "no .partial file is left behind"
    with pytest.raises(kiln.EngineFileError) as error:
        kiln.load(123)
    assert error.value.code == "KILN-E501" and "int" in str(error.value)
