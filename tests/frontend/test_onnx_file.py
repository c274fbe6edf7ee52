"""Reading weights straight from an ONNX file's bytes (kiln/frontend/onnx_file.py) gives exactly what protobuf and
onnx.numpy_helper give: the same skeleton, the same arrays, bit for bit."""
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.errors import KilnError
from kiln.frontend.onnx import load_model, load_skeleton, split_weights
from kiln.frontend.onnx_file import _key, _varint_bytes, release_file_bytes


def _model(tmp_path, external: bool = False):
    rng = np.random.default_rng(0)
    weights = {
        "w32": rng.standard_normal((16, 16)).astype(np.float32),
        "w16": rng.standard_normal((16, 16)).astype(np.float16),
        "w64": rng.standard_normal((16, 16)),
        "wbf": rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16),
        "small": rng.standard_normal(16).astype(np.float32),  # stays in the skeleton: shapes may be computed from it
        "shape": np.array([1, 16], np.int64),
    }
    initializers = [numpy_helper.from_array(a, n) for n, a in weights.items()]
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [16, 16], rng.standard_normal(256).astype(np.float32).tolist())
    initializers.append(typed)  # float_data, not raw_data: onnx reads it
    nodes = [helper.make_node("MatMul", ["x", "w32"], ["a"]), helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["a16", "w16"], ["b16"]), helper.make_node("Cast", ["b16"], ["b"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["b", "typed"], ["c"]), helper.make_node("Cast", ["c"], ["c64"], to=TensorProto.DOUBLE),
             helper.make_node("MatMul", ["c64", "w64"], ["d64"]), helper.make_node("Cast", ["d64"], ["d"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["d", "wbf"], ["e"]), helper.make_node("Cast", ["e"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "shape"], ["g"]), helper.make_node("Add", ["g", "small"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path, weights, numpy_helper.to_array(typed)


def _through_protobuf(path):
    skeleton, weights = split_weights(load_model(path))
    return skeleton, {t.name: numpy_helper.to_array(t) for t in weights}


def _in_input_order(model) -> bytes:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inputs = sorted(model.graph.input, key=lambda value: value.name)
    copied = [onnx.ValueInfoProto.FromString(value.SerializeToString()) for value in inputs]
    del model.graph.input[:]
    model.graph.input.extend(copied)
    return model.SerializeToString()


def _assert_same(path):
    skeleton, weights = load_skeleton(path)
    expected_skeleton, expected = _through_protobuf(path)
    assert _in_input_order(skeleton) == _in_input_order(expected_skeleton)  # weights declared as inputs, any order
    assert sorted(weights) == sorted(expected)
    for name, array in weights.items():
        assert array.dtype == expected[name].dtype and array.shape == expected[name].shape, name
        assert array.tobytes() == expected[name].tobytes(), name
        assert name == "typed" or not array.flags.writeable, name  # typed fields: onnx gives its own array
    return weights


def test_weights_read_from_the_file_equal_protobufs(tmp_path):
    weights = _assert_same(_model(tmp_path)[0])
    assert {"w32", "w16", "w64", "wbf", "typed"} <= set(weights) and "small" not in weights


def test_external_data_is_read_as_before(tmp_path):
    weights = _assert_same(_model(tmp_path, external=True)[0])
    assert "w32" in weights


def test_unpacked_dims_and_a_second_graph_field_are_read(tmp_path):
    """Protobuf may write repeated dims unpacked and merges repeated message fields: both are valid ONNX."""
    path = _model(tmp_path)[0]
    model = load_model(path)
    extra = numpy_helper.from_array(np.arange(96, dtype=np.float32).reshape(12, 8), "late")
    dims = list(extra.dims)
    del extra.dims[:]
    tensor = b"".join(_key(1, 0) + _varint_bytes(d) for d in dims) + extra.SerializeToString()
    graph_field = _key(5, 2) + _varint_bytes(len(tensor)) + tensor
    data = model.SerializeToString() + _key(7, 2) + _varint_bytes(len(graph_field)) + graph_field
    path.write_bytes(data)
    weights = _assert_same(path)
    np.testing.assert_array_equal(weights["late"], np.arange(96, dtype=np.float32).reshape(12, 8))


def test_parse_builds_and_runs_from_the_file(tmp_path):
    """The chain of fp32, fp16, float64 and bf16 products against float64 numpy (onnxruntime has no bf16 MatMul)."""
    path, w, typed = _model(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    f64 = {name: np.asarray(array, np.float64) for name, array in w.items()}
    expected = (x.astype(np.float64) @ f64["w32"] @ f64["w16"] @ typed.astype(np.float64) @ f64["w64"] @ f64["wbf"]
                + f64["small"])
    got = kiln.build(str(path)).run({"x": x})["y"]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 3e-2, error  # the fp16 and bf16 products round their inputs


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_truncated_file_is_a_clear_error(tmp_path, cut):
    path = _model(tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(KilnError) as caught:
        load_skeleton(path)
    assert caught.value.code == "KILN-E104" and "m.onnx" in str(caught.value)


def _viewed_file(array: np.ndarray):
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base if isinstance(base, bytes) else None


def test_weights_holding_little_of_the_file_are_copied_out_and_the_rest_stay_views():
    data = np.arange(1000, dtype=np.float32).tobytes()
    small = {"a": np.frombuffer(data, np.float32, 100).reshape(10, 10), "b": np.frombuffer(data, np.float32, 50, 400)}
    release_file_bytes(small)
    assert all(_viewed_file(a) is None and not a.flags.writeable for a in small.values())
    np.testing.assert_array_equal(small["b"], np.arange(100, 150, dtype=np.float32))
    large = {"w": np.frombuffer(data, np.float32, 900).reshape(30, 30).T}
    release_file_bytes(large)
    assert _viewed_file(large["w"]) is data  # most of the file is in use: copying would only double it
