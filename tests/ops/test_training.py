"""Gradient (ai.onnx.preview.training): ONNX's two model tests, a hand-built chain against its analytic derivative,
values y does not depend on, and the errors for what torch autograd cannot differentiate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from helpers import assert_close

D = TensorProto.DOUBLE
SIMPLE = Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple"
_TRAINING = "ai.onnx.preview.training"


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "gradient", inputs, [helper.make_empty_tensor_value_info(name) for name in outputs],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(_TRAINING, 1)])


def _gradient(inputs, outputs, xs, y, zs=()):
    optional = {"zs": list(zs)} if zs else {}
    return helper.make_node("Gradient", inputs, outputs, domain=_TRAINING, xs=list(xs), y=y, **optional)


@pytest.mark.parametrize("name", ["test_gradient_of_add", "test_gradient_of_add_and_mul"])
def test_onnx_model_tests(name):
    folder = SIMPLE / name
    model = onnx.load(str(folder / "model.onnx"))
    engine = kiln.build(model)
    for data in sorted(folder.glob("test_data_set_*")):
        feed = {value.name: numpy_helper.to_array(onnx.load_tensor(str(data / f"input_{i}.pb")))
                for i, value in enumerate(model.graph.input)}
        got = engine.run(feed)
        for i, value in enumerate(model.graph.output):
            expected = numpy_helper.to_array(onnx.load_tensor(str(data / f"output_{i}.pb")))
            assert got[value.name].dtype == expected.dtype and got[value.name].shape == expected.shape, value.name
            assert_close(got[value.name], expected, rtol=1e-7, atol=1e-7, what=value.name)


def _chain_model():
    # y = tanh((x * x) @ w) * b, differentiated by x and w with b held constant (zs); w's scale s is a weight.
    nodes = [helper.make_node("Mul", ["x", "x"], ["squared"]),
             helper.make_node("Mul", ["w", "s"], ["scaled"]),
             helper.make_node("MatMul", ["squared", "scaled"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Mul", ["t", "b"], ["y"]),
             _gradient(["x", "w", "b"], ["dy_dx", "dy_dw"], xs=["x", "w"], y="y", zs=["b"])]
    inputs = [helper.make_tensor_value_info("x", D, [3, 4]), helper.make_tensor_value_info("w", D, [4, 2]),
              helper.make_tensor_value_info("b", D, [2])]
    scale = numpy_helper.from_array(np.array(0.5), "s")
    return _model(nodes, inputs, ["y", "dy_dx", "dy_dw"], [scale])


def test_chain_of_mul_matmul_tanh_matches_its_analytic_derivative(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_VALIDATE", "1")  # the IR is re-checked after every pass, Gradient's body included
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    squared, scaled = x * x, w * 0.5
    t = np.tanh(squared @ scaled)
    dh = b * (1 - t * t)  # y's gradient is all ones
    expected = {"y": t * b, "dy_dx": 2 * x * (dh @ scaled.T), "dy_dw": 0.5 * squared.T @ dh}
    engine = kiln.build(_chain_model())
    # The optimizer fuses the graph's own Tanh and Mul; the body, a copy, keeps the registry's kernels.
    graph = engine.plan.graph
    assert "kiln::Elementwise" in {n.op_key for n in graph.nodes}
    body = next(n for n in graph.nodes if n.op == "Gradient").attrs["body"]
    assert [n.op for n in body.nodes] == ["Mul", "Mul", "MatMul", "Tanh", "Mul"] and set(body.initializers) == {"s"}
    engine.save(tmp_path / "gradient.kiln")
    for current in (engine, kiln.load(tmp_path / "gradient.kiln")):  # the engine file keeps the body
        got = current.run({"x": x, "w": w, "b": b})
        for name, value in expected.items():
            assert got[name].dtype == np.float64 and got[name].shape == value.shape, name
            assert_close(got[name], value, rtol=1e-12, atol=1e-12, what=name)  # float64 throughout


def test_a_value_y_does_not_depend_on_gets_zeros():
    nodes = [helper.make_node("Tanh", ["x"], ["y"]),
             _gradient(["x", "unused"], ["dy_dx", "dy_dunused"], xs=["x", "unused"], y="y")]
    model = _model(nodes, [helper.make_tensor_value_info("x", D, [2, 3]), helper.make_tensor_value_info("unused", D, [5])],
                   ["dy_dx", "dy_dunused"])
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    got = kiln.build(model).run({"x": x, "unused": np.ones(5)})
    assert_close(got["dy_dx"], 1 - np.tanh(x) ** 2, rtol=1e-12, atol=1e-12, what="dy_dx")
    assert got["dy_dunused"].shape == (5,) and not got["dy_dunused"].any()


@pytest.mark.parametrize("integer", ["n", "m"])
def test_differentiating_by_an_integer_is_refused_at_build(integer):
    # torch autograd differentiates float tensors only: an int64 x, first or not, is reported with the types it takes.
    nodes = [helper.make_node("Cast", ["n"], ["f"], to=D), helper.make_node("Mul", ["f", "x"], ["y"]),
             _gradient(["x", integer] if integer == "m" else ["n", "x"], ["d0", "d1"],
                       xs=["x", integer] if integer == "m" else ["n", "x"], y="y")]
    model = _model(nodes, [helper.make_tensor_value_info("n", TensorProto.INT64, [3]), helper.make_tensor_value_info("x", D, [3]),
                           helper.make_tensor_value_info("m", TensorProto.INT64, [3])], ["d0", "d1"])
    with pytest.raises(kiln.KilnError) as caught:
        kiln.build(model)
    assert caught.value.code == "KILN-E101" and "int64" in str(caught.value) and "float32" in str(caught.value)


def test_a_kernel_autograd_cannot_follow_is_a_kiln_error_naming_it():
    # kiln's Unique runs numpy's, which torch autograd cannot record.
    nodes = [helper.make_node("Unique", ["x"], ["values"], name="dedupe"),
             _gradient(["x"], ["dvalues_dx"], xs=["x"], y="values")]
    model = _model(nodes, [helper.make_tensor_value_info("x", D, [4])], ["dvalues_dx"])
    engine = kiln.build(model)
    with pytest.raises(kiln.KilnError) as caught:
        engine.run({"x": np.array([3.0, 1.0, 3.0, 2.0])})
    assert caught.value.code == "KILN-E101" and "dedupe (Unique)" in str(caught.value)


def test_a_body_failing_on_the_users_data_is_a_layer_error():
    # y = x + offset with an offset of the wrong width fails in the body as it would anywhere: KILN-E407, not E101.
    nodes = [_gradient(["x"], ["dy_dx"], xs=["x"], y="y"), helper.make_node("Add", ["x", "offset"], ["y"], name="shift")]
    model = _model(nodes, [helper.make_tensor_value_info("x", D, [2]), helper.make_tensor_value_info("offset", D, ["n"])],
                   ["dy_dx", "y"])
    config = kiln.BuilderConfig()
    config.add_profile({"offset": ((1,), (2,), (3,))})
    engine = kiln.build(model, config)
    assert_close(engine.run({"x": np.zeros(2), "offset": np.ones(2)})["dy_dx"], np.ones(2), rtol=0, atol=0, what="dy_dx")
    with pytest.raises(kiln.KilnError) as caught:
        engine.run({"x": np.zeros(2), "offset": np.ones(3)})
    assert caught.value.code == "KILN-E407" and "shift" in str(caught.value)
