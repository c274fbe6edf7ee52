"""kiln.build's arguments: a wrong config is a KILN-E203 that says what to pass, never an AttributeError."""
import numpy as np
import pytest
from helpers import make_model
from onnx import helper

import kiln


def test_config_must_be_a_builder_config():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": np.zeros((2, 3), np.float32)}, ["y"])
    for wrong in ({"fp16": True}, "fp16", 1):
        with pytest.raises(kiln.BuildError) as error:
            kiln.build(model, wrong)
        assert error.value.code == "KILN-E203" and "kiln.BuilderConfig" in error.value.hint
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -0.0, -4.0]], np.float32)
    np.testing.assert_array_equal(kiln.build(model, None).run({"x": x})["y"], np.maximum(x, 0))
