"""The ONNX frontend: external data, opset normalisation, functions, and precise errors for what it cannot read."""
import numpy as np
import onnx
import pytest
from helpers import LIGHT, make_model, run_onnxruntime
from onnx import helper

import kiln
from kiln.frontend.onnx import CANONICAL_OPSET, parse


def test_external_data_is_loaded(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": np.zeros((2, 64), np.float32)}, ["y"], {"w": w})
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="big.weights", size_threshold=0)
    assert (tmp_path / "big.weights").exists()
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(kiln.build(str(path)).run({"x": x})["y"], x @ w, rtol=1e-5)


def test_missing_external_data_is_a_clear_error(tmp_path):
    w = np.ones((64, 64), np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": np.zeros((2, 64), np.float32)}, ["y"], {"w": w})
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="big.weights", size_threshold=0)
    (tmp_path / "big.weights").unlink()
    with pytest.raises(kiln.ParseError) as error:
        kiln.build(str(path))
    assert error.value.code == "KILN-E104" and "external data" in str(error.value)


def test_large_weights_skip_the_model_copies_and_rejoin_in_the_ir():
    """parse runs opset conversion, shape inference and function expansion on the model's skeleton (its large float
    weights declared as inputs), so none of those steps copies the weights; the IR still has every weight."""
    from kiln.frontend.onnx import split_weights

    rng = np.random.default_rng(3)
    w, bias, shape = (rng.standard_normal((256, 128)).astype(np.float32), rng.standard_normal(128).astype(np.float32),
                      np.array([2, 4, 32], np.int64))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("CenterCropPad", ["r", "crop"], ["c"], axes=[1, 2]),  # runs as its ONNX function body
             helper.make_node("ReduceMean", ["c", "axes"], ["mean"]),
             helper.make_node("Add", ["c", "mean"], ["y"])]
    model = make_model(nodes, {"x": np.zeros((2, 256), np.float32)}, ["y"],
                       {"w": w, "b": bias, "shape": shape, "crop": np.array([3, 30], np.int64),
                        "axes": np.array([2], np.int64)}, opset=18)
    before = model.SerializeToString()
    skeleton, weights = split_weights(model)
    assert sorted(t.name for t in weights) == ["b", "w"]
    assert [t.name for t in skeleton.graph.initializer] == ["shape", "crop", "axes"]
    assert {"w", "b"} <= {i.name for i in skeleton.graph.input} and skeleton.ByteSize() < 2_000
    graph = parse(model)
    assert model.SerializeToString() == before, "the caller's model is left as it was"
    assert {"w", "b"} <= set(graph.initializers) and [v.name for v in graph.inputs] == ["x"]
    assert "CenterCropPad" not in {n.op for n in graph.nodes}
    np.testing.assert_array_equal(graph.initializers["w"], w)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    reference = run_onnxruntime(model, {"x": x})["y"]
    np.testing.assert_allclose(kiln.build(model).run({"x": x})["y"], reference, rtol=1e-5, atol=1e-5)


def test_old_opsets_are_converted_to_the_canonical_one():
    graph = parse(str(LIGHT / "light_squeezenet.onnx"))
    assert graph.opset == CANONICAL_OPSET


@pytest.mark.parametrize("opset", [7, 11, 13])
def test_models_at_older_opsets_run(opset):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"], axis=1)]
    model = make_model(nodes, {"x": np.zeros((2, 5), np.float32)}, ["y"], opset=opset)
    x = np.random.default_rng(opset).standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(kiln.build(model).run({"x": x})["y"], run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_a_model_newer_than_kiln_names_both_versions():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": np.zeros(2, np.float32)}, ["y"])
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    with pytest.raises(kiln.ParseError) as error:
        kiln.build(model)
    assert error.value.code == "KILN-E103"
    assert str(onnx.defs.onnx_opset_version() + 5) in str(error.value) and str(onnx.defs.onnx_opset_version()) in str(error.value)


def test_model_local_functions_are_inlined():
    function = helper.make_function("custom.fn", "Swishy", ["a"], ["b"],
                                    [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["b"])],
                                    [helper.make_opsetid("", 18)])
    node = helper.make_node("Swishy", ["x"], ["y"], domain="custom.fn")
    model = make_model([node], {"x": np.zeros(6, np.float32)}, ["y"])
    model.opset_import.append(helper.make_opsetid("custom.fn", 1))
    model.functions.append(function)
    x = np.linspace(-3, 3, 6).astype(np.float32)
    np.testing.assert_allclose(kiln.build(model).run({"x": x})["y"], x / (1 + np.exp(-x)), rtol=1e-6)


def test_several_unsupported_operators_are_reported_at_once():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("FancyOp", ["a"], ["b"], domain="com.acme", name="fancy_1"),
             helper.make_node("OtherOp", ["b"], ["c"], domain="com.acme", name="other_1"),
             helper.make_node("ThirdOp", ["c"], ["y"], domain="org.third", name="third_1", alpha=0.5)]
    model = make_model(nodes, {"x": np.zeros(4, np.float32)}, ["y"], output_types={"y": onnx.TensorProto.FLOAT})
    model.opset_import.extend([helper.make_opsetid("com.acme", 1), helper.make_opsetid("org.third", 3)])
    with pytest.raises(kiln.ParseError) as error:
        kiln.build(model)
    text = str(error.value)
    assert error.value.code == "KILN-E101"
    for name in ("fancy_1", "other_1", "third_1", "com.acme", "org.third", "FancyOp", "OtherOp", "ThirdOp"):
        assert name in text
    assert "plugin" in text, "custom-domain operators get a plugin as their way out"


@pytest.mark.parametrize("suffix,words", [(".uff", "UFF"), (".pt", "never loaded"), (".pth", "entry point")])
def test_foreign_formats_are_refused_with_the_way_forward(tmp_path, suffix, words):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(kiln.ParseError) as error:
        kiln.build(str(path))
    assert error.value.code == "KILN-E106" and words in str(error.value) + error.value.hint


def test_unreadable_and_missing_models(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe this is not protobuf \x00" * 10)
    for path in (garbage, tmp_path / "absent.onnx"):
        with pytest.raises(kiln.ParseError) as error:
            kiln.build(str(path))
        assert error.value.code == "KILN-E104"
