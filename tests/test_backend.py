"""kiln.backend: ONNX's Backend interface over kiln's engine (prepare, run_model, run_node, supports_device)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, run_onnxruntime
from onnx import helper

import kiln.backend as backend
from kiln.errors import KilnError


def _model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3), dtype=np.float32)
    w = rng.standard_normal((3, 4), dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("Shape", ["h"], ["s"])]
    return make_model(nodes, {"x": x}, ["y", "s"], initializers={"w": w}), x


def test_prepare_runs_positionally_and_by_name_against_onnxruntime():
    model, x = _model()
    rep = backend.prepare(model, "CPU")
    expected = run_onnxruntime(model, {"x": x})
    y, s = rep.run([x])
    np.testing.assert_allclose(y, expected["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(s, [2, 4])
    outputs = rep.run({"x": x})
    assert outputs._fields == ("y", "s")  # a namedtuple in graph output order, as ONNX's runner expects
    np.testing.assert_allclose(outputs.y, expected["y"], rtol=1e-6, atol=1e-6)


def test_run_node_builds_a_one_node_model():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = backend.run_node(helper.make_node("Softmax", ["a"], ["y"], axis=1), [a])
    e = np.exp(a - a.max(1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True), rtol=1e-6)


def test_supports_device():
    import torch

    assert backend.supports_device("CPU")
    assert backend.supports_device("CUDA") == torch.cuda.is_available()


def test_onnx_backend_test_machinery_runs_against_kiln():
    """ONNX's own BackendTest builds unittest cases from the stored node tests; run a few through kiln."""
    from onnx.backend.test import BackendTest

    suite = BackendTest(backend.KilnBackend, __name__)
    suite.include(r"^test_(relu|abs|resize_upsample_scales_nearest|gridsample|nonmaxsuppression_two_batches)_cpu$")
    import unittest

    loaded = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case)
                                for case in suite.test_cases.values())
    result = unittest.TextTestRunner(verbosity=0).run(loaded)
    assert result.testsRun >= 5 and result.wasSuccessful(), result.failures + result.errors


def test_bad_input_raises_a_kiln_error():
    model, x = _model()
    rep = backend.prepare(model)
    with pytest.raises(KilnError) as info:
        rep.run([x.astype(np.float64)])
    assert info.value.code.startswith("KILN-E4")
    unsupported = make_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="my.ops")], {"x": x}, ["y"])
    unsupported.opset_import.append(helper.make_opsetid("my.ops", 1))
    with pytest.raises(KilnError) as info:
        backend.prepare(unsupported)
    assert info.value.code == "KILN-E101"
