"""Element types torch lacks, end to end through a saved and reloaded engine: int4/uint4/int2/float4e2m1/float8e8m0
(carried in a wider torch type) and strings (numpy object arrays); checked against ONNX's reference evaluator."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import kiln


def _roundtrip(model, feed, tmp_path):
    path = tmp_path / "m.kiln"
    kiln.build(model).save(path)
    return kiln.load(path).run(feed)


@pytest.mark.parametrize("to, dtype", [(TensorProto.INT4, ml_dtypes.int4), (TensorProto.UINT4, ml_dtypes.uint4),
                                       (TensorProto.INT2, ml_dtypes.int2), (TensorProto.FLOAT4E2M1, ml_dtypes.float4_e2m1fn),
                                       (TensorProto.FLOAT8E8M0, ml_dtypes.float8_e8m0fnu)])
def test_cast_into_narrow_types_and_back(to, dtype, tmp_path):
    x = np.random.default_rng(0).uniform(-9, 9, (3, 5)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["narrow"], to=to), helper.make_node("Cast", ["narrow"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("narrow", to, [3, 5]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    out = _roundtrip(model, {"x": x}, tmp_path)
    narrow, y = ReferenceEvaluator(model).run(None, {"x": x})
    assert out["narrow"].dtype == np.dtype(dtype)  # handed back in its own type, not the carrier
    np.testing.assert_array_equal(out["narrow"].astype(np.float32), narrow.astype(np.float32))
    np.testing.assert_array_equal(out["y"], y)


@pytest.mark.parametrize("to, dtype, zero", [(TensorProto.INT4, ml_dtypes.int4, 1), (TensorProto.UINT4, ml_dtypes.uint4, 3),
                                             (TensorProto.INT2, ml_dtypes.int2, 0), (TensorProto.UINT2, ml_dtypes.uint2, 1)])
def test_quantize_into_narrow_types_saturates_to_their_range(to, dtype, zero, tmp_path):
    """QuantizeLinear into int4/int2 (carried in int8/uint8) clamps to the narrow type's range, not the carrier's,
    rounding half to even; DequantizeLinear reads the result back. The zero point is a weight here, so the
    QuantizeLinear -> DequantizeLinear pair in the middle of the graph is checked too."""
    x = np.array([-40, -9, -2.5, -1.5, -0.5, 0, 0.5, 1.5, 2.5, 3.5, 9, 40], np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12])],
                              [helper.make_tensor_value_info("q", to, [12]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [12])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("zero", to, [], [zero])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    out = _roundtrip(model, {"x": x}, tmp_path)
    q, y = ReferenceEvaluator(model).run(None, {"x": x})
    assert out["q"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["q"].astype(np.float32), q.astype(np.float32))
    np.testing.assert_array_equal(out["y"], y)


def test_strings_through_a_saved_engine(tmp_path):
    nodes = [helper.make_node("StringConcat", ["a", "b"], ["ab"]), helper.make_node("Equal", ["ab", "a"], ["same"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.STRING, [2]),
                                           helper.make_tensor_value_info("b", TensorProto.STRING, [2])],
                              [helper.make_tensor_value_info("ab", TensorProto.STRING, [2]),
                               helper.make_tensor_value_info("same", TensorProto.BOOL, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    feed = {"a": np.array(["kiln", "é"], dtype=object), "b": np.array(["", "x"], dtype=object)}
    out = _roundtrip(model, feed, tmp_path)
    assert out["ab"].tolist() == ["kiln", "éx"] and out["same"].tolist() == [True, False]
    assert feed["a"].tolist() == ["kiln", "é"]  # the caller's array is not changed


def test_wrong_dtype_for_a_narrow_binding_is_a_kiln_error():
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT4, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    engine = kiln.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    np.testing.assert_array_equal(engine.run({"x": np.array([-8, -1, 0, 7], dtype=ml_dtypes.int4)})["y"], [-8, -1, 0, 7])
    with pytest.raises(kiln.KilnError) as info:
        engine.run({"x": np.array([1, 2, 3, 4], dtype=np.int8)})
    assert info.value.code == "KILN-E403"
