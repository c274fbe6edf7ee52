"""Random operators: the right distribution (fixed seeds, loose statistical bounds), repeatable with a seed, and
never folded into a constant at build time."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import kiln


def _engine(nodes, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20000])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [20000]) for name in outputs])
    return kiln.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_distributions_and_seeds():
    engine = _engine([helper.make_node("Bernoulli", ["x"], ["b"], seed=3.0),
                      helper.make_node("RandomNormalLike", ["x"], ["n"], mean=2.0, scale=0.5, seed=1.0),
                      helper.make_node("RandomUniformLike", ["x"], ["u"], low=-1.0, high=3.0)], ["b", "n", "u"])
    x = np.full(20000, 0.3, np.float32)
    first, second = engine.run({"x": x}), engine.run({"x": x})
    assert set(np.unique(first["b"])) <= {0.0, 1.0} and abs(first["b"].mean() - 0.3) < 0.02
    assert abs(first["n"].mean() - 2.0) < 0.02 and abs(first["n"].std() - 0.5) < 0.02
    assert first["u"].min() >= -1.0 and first["u"].max() < 3.0 and abs(first["u"].mean() - 1.0) < 0.05
    np.testing.assert_array_equal(first["b"], second["b"])  # seeded: the same draws every run
    assert not np.array_equal(first["u"], second["u"])  # unseeded: fresh draws


def test_random_with_constant_inputs_is_not_folded():
    graph = helper.make_graph([helper.make_node("RandomUniform", [], ["u"], shape=[1000])], "g", [],
                              [helper.make_tensor_value_info("u", TensorProto.FLOAT, [1000])])
    engine = kiln.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert not np.array_equal(engine.run({})["u"], engine.run({})["u"])
