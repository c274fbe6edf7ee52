"""KILN-E101: one error for every unsupported node, with its name, domain, opset and a concrete way out
(opset conversion, automatic decomposition of ONNX function bodies, or a plugin skeleton)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from helpers import assert_close, run_onnxruntime
from kiln.ops import registry

F = TensorProto.FLOAT


@pytest.fixture
def kiln_lacks(monkeypatch):
    """Take standard operators out of the registry for one test, so the test does not depend on coverage."""
    registry._load_families()

    def remove(*ops):
        for op in ops:
            monkeypatch.delitem(registry._REGISTRY, ("", op), raising=False)

    return remove


def _model(nodes, inputs, outputs, opsets):
    graph = helper.make_graph(nodes, "unsupported", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])


def test_three_unsupported_operators_make_one_error_with_a_way_out_each(kiln_lacks):
    kiln_lacks("Det")
    nodes = [helper.make_node("Det", ["m"], ["d"], name="determinant"),
             helper.make_node("FancyOp", ["x", "d"], ["f"], name="fancy", domain="com.acme", alpha=0.5, mode="fast"),
             helper.make_node("Gelu", ["f"], ["y"], name="too_new")]  # Gelu exists from opset 20; the model says 18
    model = _model(nodes, [helper.make_tensor_value_info("m", F, [3, 3]), helper.make_tensor_value_info("x", F, [3])],
                   [helper.make_tensor_value_info("y", F, [3])], {"": 18, "com.acme": 1})
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    error = caught.value
    text = str(error)
    assert error.code == "KILN-E101"
    assert "3 node(s) use 3 operator(s)" in text
    assert "node 'determinant': Det (domain ai.onnx, opset 18)" in text
    assert "node 'fancy': FancyOp (domain com.acme, opset 1)" in text
    assert "node 'too_new': Gelu (domain ai.onnx, opset 18)" in text
    # Det: a plugin skeleton with ONNX's input name; no infer rule needed for a standard operator.
    assert '@kiln.plugin("Det", version="1.0")\n' in text and "def det(x):" in text
    # FancyOp: a custom domain, its inputs and attributes from the node, and the infer rule it needs.
    assert '@kiln.plugin("FancyOp", domain="com.acme", version="1.0",' in text
    assert "def fancy_op(x0, x1, *, alpha=0.5, mode='fast'):" in text and "infer=lambda inputs, attrs" in text
    # Gelu: the opset conversion that makes it a real operator (whose function body kiln expands).
    assert "Gelu is an ONNX operator from opset 20, not in opset 18" in text
    assert "convert_version(model, 20)" in text
    assert error.where == "determinant, fancy, too_new"


def test_the_suggested_skeleton_is_a_working_plugin(kiln_lacks):
    # Take the skeleton the error suggests for a custom operator, fill in its body, and the model builds.
    node = helper.make_node("Twice", ["x"], ["y"], name="twice", domain="com.acme", factor=2.0)
    model = _model([node], [helper.make_tensor_value_info("x", F, [2])],
                   [helper.make_tensor_value_info("y", F, None)], {"": 18, "com.acme": 1})
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    text = str(caught.value)
    start = text.index("        @kiln.plugin")
    skeleton = text[start:text.index("\n  where:")]
    source = "\n".join(line[8:] for line in skeleton.splitlines()).replace("...  # torch code", "return x0 * factor  #")
    try:
        exec(compile(source, "skeleton", "exec"), {"kiln": kiln})  # noqa: S102 (kiln's own suggestion, in a test)
        out = kiln.build(model).run({"x": np.array([1.0, -3.0], np.float32)})["y"]
        assert out.tolist() == [2.0, -6.0]
    finally:
        from kiln.plugins import unregister_plugin

        unregister_plugin("Twice", "com.acme")


def test_the_skeleton_of_an_operator_with_variadic_inputs_and_attributes_compiles():
    # After *inputs the attributes are keyword-only already; a second "*" would not compile.
    from kiln.frontend.unsupported import plugin_skeleton
    from kiln.ir import Node

    skeleton = plugin_skeleton(Node("Concat", ("a", "b"), ("y",), {"axis": 0}), 18)
    assert "def concat(*inputs, axis=None):" in skeleton
    compile(skeleton, "skeleton", "exec")


def test_operator_with_an_onnx_function_body_runs_without_a_kernel(kiln_lacks):
    # kiln has no Celu or Shrink kernel here; ONNX defines both as functions, which the frontend expands.
    kiln_lacks("Celu", "Shrink")
    nodes = [helper.make_node("Celu", ["x"], ["c"], alpha=0.7), helper.make_node("Shrink", ["c"], ["y"], lambd=0.3, bias=0.1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [4, 5])], [helper.make_tensor_value_info("y", F, [4, 5])],
                   {"": 18})
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    engine = kiln.build(model)
    assert {n.op for n in engine.plan.graph.nodes}.isdisjoint({"Celu", "Shrink"})
    assert_close(engine.run({"x": x})["y"], run_onnxruntime(model, {"x": x})["y"], rtol=1e-6, atol=1e-6)


def test_function_body_from_a_newer_opset_is_suggested_and_works(kiln_lacks):
    # ONNX gives DepthToSpace a function body from opset 28 on. Without a kernel, a model at opset 18 is told
    # to convert; after the suggested conversion kiln expands the body and matches onnxruntime on the original.
    from onnx import version_converter

    kiln_lacks("DepthToSpace")
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD", name="d2s")
    model = _model([node], [helper.make_tensor_value_info("x", F, [1, 8, 2, 3])], [helper.make_tensor_value_info("y", F, None)],
                   {"": 18})
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    text = str(caught.value)
    assert "ONNX defines DepthToSpace as a function from opset 28" in text and "convert_version(model, 28)" in text
    converted = version_converter.convert_version(model, 28)
    engine = kiln.build(converted)
    assert "DepthToSpace" not in {n.op for n in engine.plan.graph.nodes}
    x = np.random.default_rng(1).standard_normal((1, 8, 2, 3)).astype(np.float32)
    assert_close(engine.run({"x": x})["y"], run_onnxruntime(model, {"x": x})["y"], rtol=0, atol=0)


def test_kernel_from_a_newer_opset_suggests_the_conversion(monkeypatch):
    # Pretend kiln's only Det kernel starts at opset 22: a model at opset 18 is told to convert to 22.
    monkeypatch.setitem(registry._REGISTRY, ("", "Det"), [])  # put back as it was after the test
    registry.register("Det", since=22)(lambda x: x)
    node = helper.make_node("Det", ["m"], ["d"], name="det")
    model = _model([node], [helper.make_tensor_value_info("m", F, [2, 2])], [helper.make_tensor_value_info("d", F, [])],
                   {"": 18})
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    assert "kiln implements Det from opset 22" in str(caught.value) and "convert_version(model, 22)" in str(caught.value)
