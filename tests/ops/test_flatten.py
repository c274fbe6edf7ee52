"""Flatten at the edges of its axis range, against onnxruntime: axis == rank is valid ONNX and gives (all, 1)
(transformers' attention-mask indexing exports it)."""
import numpy as np
import pytest
from helpers import make_model, run_onnxruntime
from onnx import helper

import kiln


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_flatten_axis_range(axis):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = make_model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], {"x": x}, ["y"])
    model.ir_version = 10
    expected = run_onnxruntime(model, {"x": x})["y"]
    actual = kiln.build(model).run({"x": x})["y"]
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)
