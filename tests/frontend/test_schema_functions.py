"""Operators kiln has no kernel for, but that ONNX defines as a function, run as their expanded bodies."""
import numpy as np
import pytest
from helpers import make_model, run_onnxruntime
from onnx import helper

import kiln
from kiln.ops import registry


@pytest.mark.parametrize("op,attrs", [("HardSwish", {}), ("Celu", {"alpha": 0.7})])
def test_missing_kernel_is_replaced_by_the_schema_function_body(monkeypatch, op, attrs):
    registry._load_families()
    monkeypatch.delitem(registry._REGISTRY, ("", op))
    model = make_model([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": np.zeros((3, 4), np.float32)}, ["y"])
    engine = kiln.build(model)
    assert op not in {n.op for n in engine.plan.graph.nodes}, "the node was expanded into its body"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32) * 4
    np.testing.assert_allclose(engine.run({"x": x})["y"], run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
