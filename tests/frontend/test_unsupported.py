"""KILN-E101: one error for every unsupported node, with its name, domain, opset and a concrete way out
(opset conversion, automatic decomposition of ONNX function bodies, or a plugin skeleton)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

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
    # Gelu: the opset that makes it a real operator (test_too_new_operator_advice_works checks the advice).
    assert "Gelu is an ONNX operator from opset 20, not in opset 18" in text
    assert "set the model's opset import to 20" in text
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


def _gelu_model(extra_nodes, opset=18):
    """x -> MatMul(w) -> Gelu -> Relu (-> extra nodes): Gelu exists from opset 20, and the model says `opset`."""
    w = np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
             helper.make_node("Relu", ["g"], ["y"])] + extra_nodes
    outputs = [helper.make_tensor_value_info(n.output[0], F if n.op_type != "Cast" else TensorProto.DOUBLE, None)
               for n in nodes[2:]]
    graph = helper.make_graph(nodes, "too_new", [helper.make_tensor_value_info("x", F, [3, 6])], outputs,
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), w


def test_too_new_operator_advice_works():
    # An exporter wrote Gelu (opset 20) into an opset-18 model. onnx.version_converter cannot convert such a node,
    # so the way out must not be a conversion; nothing else in this model changes from 18 to 20, so kiln says to
    # raise the opset import. Follow the advice literally and the model builds and matches float64 numpy.
    import math

    from onnx import version_converter

    model, w = _gelu_model([])
    with pytest.raises(RuntimeError):
        version_converter.convert_version(model, 20)  # why the advice cannot be a conversion
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    text = str(caught.value)
    assert caught.value.code == "KILN-E101" and "convert_version" not in text
    start = text.index("set the model's opset import to 20: ") + len("set the model's opset import to 20: ")
    advice = text[start:text.index("; onnx.version_converter", start)]
    exec(advice, {"model": model})  # noqa: S102 (kiln's own suggestion, in a test)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)
    h = x.astype(np.float64) @ w.astype(np.float64)
    reference = np.maximum(h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2))), 0)
    assert_close(kiln.build(model).run({"x": x})["y"], reference, rtol=1e-5, atol=1e-6, what="Gelu after the advice")


def test_too_new_operator_in_a_model_whose_other_operators_change_is_told_to_re_export():
    # Cast changes at opset 19: raising the opset import of this model from 18 to 20 would not be exact.
    model, _ = _gelu_model([helper.make_node("Cast", ["y"], ["z"], to=TensorProto.DOUBLE)])
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    text = str(caught.value)
    assert "re-export the model at opset 20 or newer" in text and "Cast changes between opset 18 and 20" in text
    assert "set the model's opset import" not in text and "convert_version" not in text


def test_unsupported_operators_that_stop_the_opset_converter_are_all_reported():
    # At opset 11 kiln converts to its canonical opset, and onnx's converter stops at the first node of an operator
    # opset 11 lacks (FooBar is no ONNX operator; Gelu comes in opset 20). Every unsupported node is still named in
    # one KILN-E101, not a KILN-E102 about the converter; Softmax changes after 11, so Gelu is told to re-export.
    nodes = [helper.make_node("FooBar", ["x"], ["a"], name="foo"), helper.make_node("Gelu", ["a"], ["b"], name="gelu"),
             helper.make_node("Swoosh", ["b"], ["c"], name="swoosh", domain="com.acme"),
             helper.make_node("Softmax", ["c"], ["y"], axis=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, None)],
                   {"": 11, "com.acme": 1})
    with pytest.raises(kiln.ParseError) as caught:
        kiln.build(model)
    text = str(caught.value)
    assert caught.value.code == "KILN-E101" and "3 node(s) use 3 operator(s)" in text
    assert "node 'foo': FooBar (domain ai.onnx, opset 11)" in text and "FooBar is not an ONNX operator" in text
    assert "node 'gelu': Gelu (domain ai.onnx, opset 11)" in text and "Softmax changes between opset 11 and 20" in text
    assert "node 'swoosh': Swoosh (domain com.acme, opset 1)" in text and caught.value.where == "foo, gelu, swoosh"


def test_a_default_domain_plugin_the_converter_cannot_pass_is_named_in_the_conversion_error():
    # A plugin runs FooBar, but Concat has no kiln kernel at opset 11 and onnx's converter cannot get past FooBar.
    from kiln.plugins import unregister_plugin

    kiln.plugin("FooBar", version="1.0")(lambda x: x)
    try:
        nodes = [helper.make_node("FooBar", ["x"], ["a"], name="foo"), helper.make_node("Concat", ["a", "a"], ["y"], axis=0)]
        model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])],
                       [helper.make_tensor_value_info("y", F, None)], {"": 11})
        with pytest.raises(kiln.ParseError) as caught:
            kiln.build(model)
    finally:
        unregister_plugin("FooBar", "")
    error = caught.value
    assert error.code == "KILN-E102" and "stops at FooBar (node 'foo'), not an operator of ONNX opset 11" in str(error)
    assert error.where == "foo" and "its own domain" in error.hint and "%s" not in str(error)
