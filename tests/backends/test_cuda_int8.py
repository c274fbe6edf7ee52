"""int8 and fp8 engines on a real GPU: a small CNN (3x3 and 1x1 convolutions, residual, a matrix layer) and a
small transformer encoder, built with --device cuda --int8 (and --fp8 on compute capability 8.9+) from a few
random calibration feeds, against onnxruntime in fp32. Marked gpu: skipped where torch sees no CUDA device.

Tolerance: the relative L2 error of the output within 5e-2 and cosine similarity at least 0.99 (int8 per-tensor
activations and per-channel weights through a few layers; fp8 e4m3 alike)."""
import numpy as np
import pytest
from helpers import make_model, run_onnxruntime
from onnx import helper

import kiln
from kiln.builder import BuilderConfig

pytestmark = pytest.mark.gpu

RELATIVE, COSINE = 5e-2, 0.99


def agreement(actual, expected) -> tuple[float, float]:
    actual, expected = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    assert np.isfinite(actual).all(), "NaN or inf in the output"
    relative = float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
    cosine = float(actual @ expected / (np.linalg.norm(actual) * np.linalg.norm(expected)))
    return relative, cosine


def fp8_capable() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def cnn_model(batch=4, channels=32, size=16):
    """3x3 conv+relu, 1x1 conv with the input as residual, relu, 3x3 stride-2 conv, 1x1 stride-2, pool, Gemm."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    b = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    inits = {"w1": w(channels, channels, 3, 3), "b1": b(channels), "w2": w(channels, channels, 1, 1), "b2": b(channels),
             "w3": w(2 * channels, channels, 3, 3), "b3": b(2 * channels), "w4": w(2 * channels, 2 * channels, 1, 1),
             "fc": w(10, 2 * channels), "fcb": b(10)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c4"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1),
    ]
    model = make_model(nodes, {"x": np.zeros((batch, channels, size, size), np.float32)}, ["y"], inits)
    model.ir_version = 10  # older onnxruntime builds (the GPU machine's) read IR versions up to 13 only
    return model


@pytest.fixture(scope="module")
def cnn():
    model = cnn_model()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((4, 32, 16, 16)).astype(np.float32)} for _ in range(8)]
    feed = {"x": rng.standard_normal((4, 32, 16, 16)).astype(np.float32)}
    return model, calib, feed, run_onnxruntime(model, feed)["y"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    import torch
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert().eval()
    path = tmp_path_factory.mktemp("encoder") / "bert.onnx"
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamo=True, verbose=False)
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
             for _ in range(8)]
    feed = {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    return str(path), calib, feed, run_onnxruntime(str(path), feed)["hidden"]


def int8_layers(engine) -> dict:
    return {name: layer for name, layer in engine.plan.layers.items() if layer.get("op") in ("kiln::QConv", "kiln::QGemm")}


def timed_int8(layer) -> list[str]:
    return [key for key in layer.get("times_ms", {}) if key.endswith("/int8")]


@pytest.mark.parametrize("half", [False, True])
def test_cnn_int8_matches_onnxruntime_and_times_int8_tactics(cnn, half):
    model, calib, feed, expected = cnn
    engine = kiln.build(model, BuilderConfig(device="cuda", int8=True, fp16=half, calib=calib))
    relative, cosine = agreement(engine.run(feed)["y"], expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)
    layers = int8_layers(engine)
    assert len(layers) == 5, "every convolution and the matrix layer was quantized"
    handed_off = bool(engine.plan.build_info["cuda_tuning"].get("int8_handoff"))  # that whole engine was faster
    for name, layer in layers.items():
        assert timed_int8(layer), f"{name}: no int8 tactic was timed: {layer}"
        fallbacks = [key for key in layer["times_ms"] if key.startswith("fallback-")]
        # in an int8 hand-off engine, the layers on either side of a handed-on tensor run int8 kernels only
        on_handoff = layer["tactic"].endswith("-int8-out") or layer.get("int8_inputs")
        assert fallbacks or on_handoff, f"{name}: the float fallbacks were not timed beside int8"
        assert layer["precision"] in (("int8", "fp16") if half else ("int8", "fp32")), layer
    pointwise = [layer for layer in layers.values() if any(k.startswith("int8-cublaslt-1x1") for k in layer["times_ms"])]
    assert len(pointwise) == (0 if handed_off else 2), "the 1x1 convolutions (both on the hand-off) were offered as int8 GEMMs"
    assert engine.plan.build_info["cuda_tuning"]["flow"] == ("fp16" if half else "fp32")


def test_cnn_int8_handoff_engine_is_timed_whole_and_matches_onnxruntime(cnn):
    """c1's, c2's and c3's outputs are each read only by the next convolution's input (c4's goes to the pool): an
    int8 build also lowers the engine that hands those three on in int8, times it whole beside the per-layer
    one, and keeps the faster. Lowered so on its own, that engine writes them in int8 (-int8-out tactics), its
    readers take them as they are, and its output stays within the int8 tolerance."""
    import dataclasses

    import torch

    from kiln.backends.cuda.lowering import _lower

    model, calib, feed, expected = cnn
    engine = kiln.build(model, BuilderConfig(device="cuda", int8=True, fp16=True, calib=calib))
    variants = engine.plan.build_info["cuda_tuning"]["whole_engine_ms"]
    assert any("int8 hand-off" in name for name in variants), variants
    untuned = {k: v for k, v in engine.plan.build_info.items() if k not in ("cuda_tactics", "cuda_tuning")}
    program = _lower(dataclasses.replace(engine.plan, build_info=untuned), int8_handoff=True)
    info = program.layer_info
    assert sum(layer["tactic"].endswith("-int8-out") for layer in info.values()) == 3, info
    assert sum("input" in layer.get("int8_inputs", []) for layer in info.values()) == 3, info
    out = program.execute({"x": torch.from_numpy(feed["x"]).cuda()})["y"].float().cpu().numpy()
    relative, cosine = agreement(out, expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)


def stem_model(batch=4, size=32):
    """An image stem: 3-channel 7x7 stride-2 conv+relu, 3x3 stride-2 MaxPool, 3x3 conv+relu, 1x1 conv, pool, Gemm."""
    rng = np.random.default_rng(2)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w1": w(32, 3, 7, 7), "b1": (0.1 * rng.standard_normal(32)).astype(np.float32), "w2": w(32, 32, 3, 3),
             "w3": w(64, 32, 1, 1), "fc": w(10, 64), "fcb": np.zeros(10, np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[3, 3, 3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1),
    ]
    model = make_model(nodes, {"x": np.zeros((batch, 3, size, size), np.float32)}, ["y"], inits)
    model.ir_version = 10
    return model


def test_stem_int8_packs_its_reduction_and_hands_int8_through_the_pool():
    """A 3-channel stem is timed with the packed-reduction int8 kernels; lowered with the hand-off, it writes int8
    in the scale of the convolution after the MaxPool, the pool runs on the int8 values, and that convolution
    reads them as they are; the output stays within the int8 tolerance of onnxruntime fp32."""
    import dataclasses

    import torch

    from kiln.backends.cuda.int8 import _blocks
    from kiln.backends.cuda.int8_kernels import PACKED_CONFIGS
    from kiln.backends.cuda.lowering import _lower

    model, rng = stem_model(), np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    feed = {"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
    expected = run_onnxruntime(model, feed)["y"]
    engine = kiln.build(model, BuilderConfig(device="cuda", int8=True, fp16=True, calib=calib))
    stem = next(layer for layer in engine.plan.layers.values() if layer.get("op") == "kiln::QConv")
    packed = {f"triton-int8-implicit-gemm-{_blocks(config)}/int8" for config in PACKED_CONFIGS}
    timed = {name.replace("-int8-out", "") for name in stem["times_ms"]}  # the kept engine may be the hand-off's
    assert packed <= timed, stem["times_ms"]
    assert any("int8 hand-off" in name for name in engine.plan.build_info["cuda_tuning"]["whole_engine_ms"])
    relative, cosine = agreement(engine.run(feed)["y"], expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)
    untuned = {k: v for k, v in engine.plan.build_info.items() if k not in ("cuda_tactics", "cuda_tuning")}
    program = _lower(dataclasses.replace(engine.plan, build_info=untuned), int8_handoff=True)
    tactics = [layer["tactic"] for layer in program.layer_info.values()]
    # the stem and the 3x3 write int8 (the 1x1's output goes to the average pool); the pool, the 3x3 and the 1x1 read it
    assert "triton-nhwc-int8" in tactics and sum(t.endswith("-int8-out") for t in tactics) == 2, program.layer_info
    assert sum("input" in layer.get("int8_inputs", []) for layer in program.layer_info.values()) == 3, program.layer_info
    out = program.execute({"x": torch.from_numpy(feed["x"]).cuda()})["y"].float().cpu().numpy()
    relative, cosine = agreement(out, expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)


def test_cnn_int8_obey_runs_every_layer_int8(cnn):
    model, calib, feed, expected = cnn
    engine = kiln.build(model, BuilderConfig(device="cuda", int8=True, fp16=True, calib=calib,
                                             layer_precisions={"*": "int8"}, precision_constraints="obey"))
    assert {layer["precision"] for layer in int8_layers(engine).values()} == {"int8"}
    relative, cosine = agreement(engine.run(feed)["y"], expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)


def test_int8_engine_reloads_with_its_tactics(cnn, tmp_path):
    model, calib, feed, expected = cnn
    engine = kiln.build(model, BuilderConfig(device="cuda", int8=True, fp16=True, calib=calib))
    engine.save(tmp_path / "e.kiln")
    again = kiln.load(tmp_path / "e.kiln")
    assert {k: v["tactic"] for k, v in again.plan.layers.items()} == {k: v["tactic"] for k, v in engine.plan.layers.items()}
    np.testing.assert_allclose(again.run(feed)["y"], engine.run(feed)["y"], rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_encoder_int8_matches_onnxruntime(encoder):
    path, calib, feed, expected = encoder
    engine = kiln.build(path, BuilderConfig(device="cuda", int8=True, fp16=True, calib=calib))
    relative, cosine = agreement(engine.run(feed)["hidden"], expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)
    layers = int8_layers(engine)
    assert layers and all(layer["op"] == "kiln::QGemm" for layer in layers.values())
    assert all(timed_int8(layer) for layer in layers.values()), {k: v.get("times_ms") for k, v in layers.items()}


@pytest.mark.skipif("not fp8_capable()", reason="fp8 needs compute capability 8.9+")
def test_encoder_fp8_matches_onnxruntime_and_times_fp8(encoder):
    path, calib, feed, expected = encoder
    engine = kiln.build(path, BuilderConfig(device="cuda", fp8=True, calib=calib))
    relative, cosine = agreement(engine.run(feed)["hidden"], expected)
    assert relative <= RELATIVE and cosine >= COSINE, (relative, cosine)
    gemms = [layer for layer in engine.plan.layers.values() if layer.get("op") == "kiln::Gemm"]
    # every Gemm is offered its fp8 tactic: timed, or turned down by the accuracy check against fp32 (a Gemm whose
    # residual moved into its LayerNorm is held to its own small output, without the residual that hid fp8's error)
    offered = ["fp8-cublaslt/fp8" in {**layer.get("times_ms", {}), **layer.get("rejected", {})} for layer in gemms]
    timed = ["fp8-cublaslt/fp8" in layer.get("times_ms", {}) for layer in gemms]
    assert gemms and all(offered) and any(timed), gemms
    assert engine.plan.build_info["cuda_tuning"]["flow"] == "fp16", "the other layers run fp16"


@pytest.mark.skipif("not fp8_capable()", reason="fp8 needs compute capability 8.9+")
def test_fp8_needs_calibration_data(encoder):
    from kiln.errors import KilnError

    path = encoder[0]
    with pytest.raises(KilnError) as caught:
        kiln.build(path, BuilderConfig(device="cuda", fp8=True))
    assert caught.value.code == "KILN-E302" and "--fp8" in caught.value.message
