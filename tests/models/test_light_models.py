"""The nine ImageNet models shipped in onnx's test data, end to end through kiln's CPU engine."""
import numpy as np
import pytest
from helpers import LIGHT, LIGHT_MODELS, assert_close, light_input, light_reference, randomized_light_model, run_onnxruntime

import kiln


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_matches_shipped_reference(name):
    engine = kiln.build(str(LIGHT / f"light_{name}.onnx"))
    input_name, x = light_input(name)
    (output,) = engine.run({input_name: x}).values()
    # fp32 tolerances, tighter than the ones onnx's own runner uses for these models (rtol 1e-3, atol 1e-7 is its floor).
    assert_close(output, light_reference(name), rtol=1e-3, atol=1e-5, what=name)


@pytest.mark.parametrize("name", ["resnet50", "inception_v2", "densenet121", "shufflenet"])
def test_light_model_with_random_weights_matches_onnxruntime(name):
    """The shipped weights are constants, so the reference output is uniform; random weights check real numerics."""
    model = randomized_light_model(name, seed=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    input_name = model.graph.input[0].name
    (expected,) = run_onnxruntime(model, {input_name: x}).values()
    (actual,) = kiln.build(model).run({input_name: x}).values()
    assert expected.std() > 1e-2, "logits must not be degenerate for this check to mean anything"
    assert_close(actual, expected, rtol=1e-3, atol=1e-5 * float(np.abs(expected).max()), what=name)
