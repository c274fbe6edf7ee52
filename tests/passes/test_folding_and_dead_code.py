"""The first two passes: constant folding (light models hold their weights as ConstantOfShape) and dead code."""
import numpy as np
import onnx
from helpers import LIGHT, make_model
from onnx import helper

import kiln
from kiln.frontend.onnx import parse
from kiln.passes import constant_folding, dead_code
from kiln.passes.context import PassContext


def test_light_model_weights_are_folded_into_initializers():
    graph = parse(str(LIGHT / "light_resnet50.onnx"))
    producers = sum(1 for n in graph.nodes if n.op == "ConstantOfShape")
    assert producers == 239
    ctx = PassContext()
    assert constant_folding.run(graph, ctx)
    assert ctx.counters["fold_constant"] >= producers
    assert not any(n.op == "ConstantOfShape" for n in graph.nodes)
    assert not constant_folding.run(graph, ctx), "folding is idempotent"


def test_shape_of_a_static_value_folds_and_dead_nodes_go():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"]),
             helper.make_node("Relu", ["x"], ["unused"])]
    model = make_model(nodes, {"x": np.zeros((2, 3), np.float32)}, ["y"])
    graph = parse(model)
    ctx = PassContext()
    constant_folding.run(graph, ctx)
    dead_code.run(graph, ctx)
    assert [n.op for n in graph.nodes] == ["Reshape"]
    assert ctx.counters["fold_shape"] == 1 and ctx.counters["remove_dead_node"] == 1
    np.testing.assert_array_equal(graph.initializers["s"], [2, 3])
    assert not dead_code.run(graph, PassContext()), "dead-code removal is idempotent"


def test_shape_of_a_dynamic_value_stays():
    graph_inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])]
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    model = helper.make_model(helper.make_graph(nodes, "g", graph_inputs, [helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [2])]),
                              opset_imports=[helper.make_opsetid("", 18)])
    graph = parse(model)
    constant_folding.run(graph, PassContext())
    assert [n.op for n in graph.nodes] == ["Shape"]


def test_folding_failure_names_the_node():
    nodes = [helper.make_node("Reshape", ["w", "bad_shape"], ["r"], name="broken_reshape"), helper.make_node("Add", ["x", "r"], ["y"])]
    model = make_model(nodes, {"x": np.zeros((2, 3), np.float32)}, ["y"],
                       {"w": np.ones((2, 3), np.float32), "bad_shape": np.array([4, 4], np.int64)})
    try:
        kiln.build(model)
    except kiln.BuildError as error:
        assert error.code == "KILN-E201" and "broken_reshape" in str(error)
    else:
        raise AssertionError("an impossible constant Reshape must fail the build")
