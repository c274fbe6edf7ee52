"""Explicitly quantized models import with their own scales: the digits CNN quantized by onnxruntime's
quantize_static (QDQ, per-channel weights), and a dynamically quantized MatMul model (MatMulInteger)."""
import numpy as np
import pytest

import kiln
from helpers import make_model, run_onnxruntime
from kiln.quant.cpu_tactics import exact_int8_dot_products
from quant.digits import batches, config, top1


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our feed list."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


@pytest.fixture(scope="module")
def qdq_digits(digits, tmp_path_factory):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = str(tmp_path_factory.mktemp("qdq") / "digits.qdq.onnx")
    quantize_static(digits["path"], path, _Reader(batches(digits["calib"][0][:100])), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return path


def test_qdq_model_matches_onnxruntime(digits, qdq_digits):
    import onnx

    model = onnx.load(qdq_digits)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    engine = kiln.build(qdq_digits, config(int8=True))  # no calibration data: the model carries its scales
    assert engine.plan.build_info["quantization"]["mode"].startswith("explicit")
    images, labels = digits["val"]
    got = np.concatenate([engine.run(f)["logits"] for f in batches(images)])
    # onnxruntime's fused int8 kernels saturate without VNNI: there its QDQ graph run as written is the reference
    unfused = not exact_int8_dot_products()
    want = np.concatenate([run_onnxruntime(qdq_digits, f, unfused)["logits"] for f in batches(images)])
    # the same quantization grid: differences are single rounding steps of the output's scale where ties fall apart
    assert np.mean(np.abs(got - want) <= 1e-4 * np.abs(want).max() + 1e-5) > 0.97
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.99
    fp32 = kiln.build(digits["path"], config())
    assert abs(top1(engine, images, labels) - top1(fp32, images, labels)) <= 1.0


def test_dynamically_quantized_matmul_runs_as_onnxruntime(tmp_path):
    from onnx import helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    weight = rng.standard_normal((32, 16)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": x}, ["y"], {"w": weight}, opset=17)
    source, target = tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx"
    import onnx

    onnx.save(model, str(source))
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
    ops = {n.op_type for n in onnx.load(str(target)).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    got = kiln.build(str(target)).run({"x": x})["y"]
    want = run_onnxruntime(str(target), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_symmetric_qdq_pairs_fold_into_int8_layers(digits, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = str(tmp_path / "digits.sym.onnx")
    quantize_static(digits["path"], path, _Reader(batches(digits["calib"][0][:100])), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    engine = kiln.build(path, config(int8=True))
    folded = engine.plan.build_info["quantization"]["folded"]
    assert len(folded) == 4 and all(engine.plan.layers[name]["precision"] == "int8" for name in folded)
    images = digits["val"][0]
    got = np.concatenate([engine.run(f)["logits"] for f in batches(images)])
    want = np.concatenate([run_onnxruntime(path, f, not exact_int8_dot_products())["logits"] for f in batches(images)])
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.99
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
