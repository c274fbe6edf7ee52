"""kiln compare: error figures against float64 numpy, PASS/FAIL and exit codes, input/output files, and
--layerwise naming the first layer that leaves the tolerance without touching the engine's fusions."""
import json

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper

import kiln
from kiln.cli import main
from kiln.errors import BindingError
from kiln.tools.compare import HISTOGRAM_EDGES, compare, compare_tensors


def two_layer_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"), helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2"),
             helper.make_node("Tanh", ["z"], ["t"], name="tanh"), helper.make_node("Mul", ["t", "s"], ["y"], name="scale")]
    weights = {"w1": rng.standard_normal((16, 64)).astype(np.float32) / 4, "b1": rng.standard_normal(64).astype(np.float32),
               "w2": rng.standard_normal((64, 24)).astype(np.float32) / 8, "s": np.float32([3.0])}
    return make_model(nodes, {"x": (np.float32, [2, 16])}, ["y"], weights)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "two_layer.onnx"
    onnx.save(two_layer_model(), str(path))
    return path


def broken_engine(path):
    """The engine of `path` with mm2's weight scaled by 1.5: everything from mm2 on is wrong."""
    engine = kiln.build(str(path))
    w2 = two_layer_model().graph.initializer[2]
    w2 = onnx.numpy_helper.to_array(w2)
    for name, array in engine.plan.graph.initializers.items():
        if array.shape == w2.shape and np.array_equal(array, w2) or array.shape == w2.T.shape and np.array_equal(array, w2.T):
            engine.plan.graph.initializers[name] = array * 1.5
            break
    else:
        raise AssertionError("mm2's weight not found in the engine")
    engine._programs.clear()  # lower again from the changed weights
    return engine


def test_error_figures_match_float64_numpy():
    rng = np.random.default_rng(3)
    expected = rng.standard_normal((4, 50)).astype(np.float32)
    actual = expected + rng.uniform(-1e-3, 1e-3, expected.shape).astype(np.float32)
    result = compare_tensors("y", actual, expected, atol=1e-4, rtol=1e-3)
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - b)
    assert result.max_abs == pytest.approx(diff.max()) and result.mean_abs == pytest.approx(diff.mean())
    assert result.max_rel == pytest.approx((diff / np.abs(b)).max())
    assert result.cosine == pytest.approx(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
    assert result.outside == int((diff > 1e-4 + 1e-3 * np.abs(b)).sum()) > 0 and not result.passed
    assert sum(result.histogram) == expected.size and len(result.histogram) == len(HISTOGRAM_EDGES) - 1
    assert compare_tensors("y", expected, expected, 0, 0).passed


def test_shape_and_nan_mismatches_fail():
    assert "shape" in compare_tensors("y", np.zeros((2, 3)), np.zeros((3, 2)), 1, 1).problem
    nan = compare_tensors("y", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 1, 1)
    assert not nan.passed and "NaN" in nan.problem
    assert compare_tensors("y", np.array([np.nan, np.inf]), np.array([np.nan, np.inf]), 0, 0).passed


def test_pass_with_files_and_exit_code(model_path, tmp_path, capsys):
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    assert main(["compare", str(model_path), "--save-inputs", str(inputs), "--save-outputs", str(outputs)]) == 0
    text = capsys.readouterr().out
    assert "y: PASS" in text and "cosine" in text and "histogram" in text and text.strip().endswith("PASS")
    saved = np.load(outputs)
    assert set(saved.files) == {"kiln/y", "onnxruntime/y"}
    assert np.allclose(saved["kiln/y"], saved["onnxruntime/y"], rtol=1e-4, atol=1e-5)
    feed = dict(np.load(inputs))
    assert set(feed) == {"x"} and feed["x"].shape == (2, 16)
    assert main(["compare", str(model_path), "--load-inputs", str(inputs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["outputs"][0]["name"] == "y"


def test_fail_exit_code_and_first_failing_layer(model_path, tmp_path, capsys):
    engine = broken_engine(model_path)
    path = tmp_path / "broken.kiln"
    engine.save(str(path))
    assert main(["compare", str(model_path), "--engine", str(path), "--layerwise"]) == 1
    text = capsys.readouterr().out
    assert "y: FAIL" in text and text.strip().endswith("FAIL") and "first layer outside tolerance" in text

    feed = {"x": np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)}
    result, _, _ = compare(str(model_path), engine, feed, layerwise=True)
    first = result.first_failing_layer
    assert first is not None and "mm2" in first.origin, first
    before = [layer for layer in result.layers if layer.name in ("h", "hb", "r")]
    assert before and all(layer.passed for layer in before)  # the layers ahead of mm2 are still right


def test_layerwise_reads_the_engine_as_built(model_path):
    engine = kiln.build(str(model_path))
    layers_before = [(n.name, n.op_key, n.origin) for n in engine.plan.graph.nodes]
    program = engine.program
    feed = {"x": np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)}
    plain, kiln_plain, _ = compare(str(model_path), engine, feed)
    layered, kiln_layered, _ = compare(str(model_path), engine, feed, layerwise=True)
    assert engine.program is program and [(n.name, n.op_key, n.origin) for n in engine.plan.graph.nodes] == layers_before
    assert np.array_equal(kiln_plain["y"], kiln_layered["y"]) and plain.passed and layered.passed
    produced = {o for n in two_layer_model().graph.node for o in n.output}
    survivors = {o for n in engine.plan.graph.nodes for o in n.outputs} & produced  # the output "y" is the last layer
    assert {layer.name for layer in layered.layers} == survivors and layered.layers


def test_layerwise_names_the_model_node_behind_a_layer_the_frontend_added():
    # An opset-11 Softmax over a 4-D tensor becomes Flatten, Softmax, Reshape: the model's tensor "s" comes out of
    # kiln's Reshape layer, whose name and origin are the frontend's own. The report names the model's node too.
    from kiln.tools.compare import format_result

    nodes = [helper.make_node("Mul", ["x", "k"], ["m"], name="scale"), helper.make_node("Softmax", ["m"], ["s"], name="soft", axis=1),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = make_model(nodes, {"x": (np.float32, [1, 10, 1, 1])}, ["y"], {"k": np.float32([2.0])}, opset=11)
    engine = kiln.build(model)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 10, 1, 1)).astype(np.float32)}
    result, _, _ = compare(model, engine, feed, layerwise=True)
    layers = {layer.name: layer for layer in result.layers}
    assert layers["m"].model_node == "scale (Mul)" and layers["s"].model_node == "soft (Softmax)"
    assert "soft" not in [layers["s"].layer] + layers["s"].origin  # the layer itself does not say it
    result.first_failing_layer = layers["s"]
    assert "output s, made in the model by soft (Softmax)" in format_result(result)


def test_engine_of_another_model_is_refused(model_path, tmp_path):
    other = make_model([helper.make_node("Relu", ["a"], ["b"])], {"a": (np.float32, [2])}, ["b"])
    engine = kiln.build(other)
    with pytest.raises(BindingError) as error:
        compare(str(model_path), engine, {"a": np.ones(2, np.float32)})
    assert error.value.code == "KILN-E402"


def test_unreadable_inputs_file(model_path, tmp_path, capsys):
    (tmp_path / "bad.npz").write_text("not numpy")
    assert main(["compare", str(model_path), "--load-inputs", str(tmp_path / "bad.npz")]) == 1
    assert "KILN-E402" in capsys.readouterr().err


def test_reference_runs_a_model_stamped_with_a_newer_ir_version():
    from kiln.tools.compare import run_reference

    model = two_layer_model()
    model.ir_version = 99  # as a newer onnx package than onnxruntime knows would stamp it
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    expected = run_reference(two_layer_model(), {"x": x})["y"]
    np.testing.assert_array_equal(run_reference(model, {"x": x})["y"], expected)
