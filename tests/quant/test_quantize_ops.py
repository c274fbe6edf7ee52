"""The quantization operators against onnxruntime (fixed-seed random inputs) and ONNX's own node cases
(float8, blocked, uint16), and kiln's int8 layers against float64 numpy."""
import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from helpers import make_model, run_onnxruntime
from kiln.quant.cpu_tactics import exact_int8_dot_products

RNG = np.random.default_rng(0)


def _both(model, feed):
    return kiln.build(model).run(feed), run_onnxruntime(model, feed)


def _integers_match(got, want, slack=0):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= slack


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_quantize_dequantize_per_axis(dtype):
    x = RNG.standard_normal((2, 4, 3, 3)).astype(np.float32) * 3
    scale = np.array([0.02, 0.05, 0.1, 0.03], np.float32)
    zero = np.array([0, 3, -2, 1] if dtype == np.int8 else [128, 120, 130, 0], dtype)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    model = make_model(nodes, {"x": x}, ["q", "y"], {"s": scale, "z": zero})
    got, want = _both(model, {"x": x})
    _integers_match(got["q"], want["q"])
    np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=1e-6)


def test_qlinear_conv_per_channel_with_bias():
    x = RNG.integers(0, 256, (1, 3, 7, 7), dtype=np.uint8)
    w = RNG.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    consts = {"xs": np.float32(0.02), "xz": np.uint8(120), "ws": RNG.uniform(0.005, 0.02, 4).astype(np.float32),
              "wz": np.zeros(4, np.int8), "ys": np.float32(0.15), "yz": np.uint8(100), "w": w,
              "b": RNG.integers(-500, 500, 4).astype(np.int32)}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[1, 1, 1, 1], strides=[2, 2])
    model = make_model([node], {"x": x}, ["y"], {k: np.asarray(v) for k, v in consts.items()})
    got, want = _both(model, {"x": x})
    exact = _qlinear_conv_float64(x, consts, stride=2, pad=1)
    _integers_match(got["y"], exact, slack=1)  # kiln requantizes in float32: ties may round apart from float64
    if exact_int8_dot_products():  # without VNNI onnxruntime's U8S8 convolution saturates (off by 23 steps here)
        _integers_match(got["y"], want["y"], slack=1)  # onnxruntime requantizes in float32 too
        assert np.mean(got["y"] == want["y"]) > 0.98


def _qlinear_conv_float64(x, consts, stride: int, pad: int):
    """QLinearConv in int64 sums and a float64 requantize (zero weight zero points, uint8 output)."""
    w = consts["w"].astype(np.int64)
    xp = np.pad(x.astype(np.int64) - int(consts["xz"]), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k, size = w.shape[-1], (x.shape[-1] + 2 * pad - w.shape[-1]) // stride + 1
    windows = np.stack([xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k] for i in range(size) for j in range(size)], 1)
    sums = np.einsum("npchw,ochw->nop", windows, w) + consts["b"].astype(np.int64)[None, :, None]
    scale = float(consts["xs"]) * consts["ws"].astype(np.float64)[None, :, None] / float(consts["ys"])
    y = np.clip(np.rint(sums * scale) + int(consts["yz"]), 0, 255)
    return y.reshape(x.shape[0], w.shape[0], size, size).astype(np.uint8)


def test_qlinear_matmul_and_matmul_integer():
    a = RNG.integers(0, 256, (2, 5, 16), dtype=np.uint8)
    b = RNG.integers(0, 256, (16, 6), dtype=np.uint8)
    consts = {"as": np.float32(0.03), "az": np.uint8(128), "bs": np.float32(0.01), "bz": np.uint8(120),
              "ys": np.float32(0.2), "yz": np.uint8(110), "b": b}
    nodes = [helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]),
             helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["i"])]
    model = make_model(nodes, {"a": a}, ["y", "i"], {k: np.asarray(v) for k, v in consts.items()})
    got, want = _both(model, {"a": a})
    _integers_match(got["y"], want["y"], slack=1)
    _integers_match(got["i"], want["i"])


def test_conv_integer_and_dynamic_quantize_linear():
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = RNG.integers(0, 256, (3, 2, 3, 3), dtype=np.uint8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("ConvInteger", ["q", "w", "z", "wz"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, {"x": x}, ["q", "s", "z", "y"], {"w": w, "wz": np.asarray(np.uint8(128))})
    got, want = _both(model, {"x": x})
    for name in ("q", "z", "y"):
        _integers_match(got[name], want[name])
    np.testing.assert_allclose(got["s"], want["s"], rtol=1e-6)


ONNX_CASES = ["test_quantizelinear_e4m3fn", "test_quantizelinear_e5m2", "test_dequantizelinear_e4m3fn_zero_point",
              "test_quantizelinear_uint16", "test_dequantizelinear_uint16", "test_quantizelinear_blocked_asymmetric",
              "test_dequantizelinear_blocked", "test_dynamicquantizelinear_max_adjusted", "test_qlinearmatmul_3D_int8_float16"]


@functools.cache
def _node_cases():
    # importing a case module registers its cases: four modules load in well under a second, all of them in ~20 s
    from onnx.backend.test.case import node
    from onnx.backend.test.case.node import dequantizelinear, dynamicquantizelinear, qlinearmatmul, quantizelinear  # noqa: F401

    return {c.name: c for c in node._NodeTestCases if c.name in ONNX_CASES}


@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_node_case(name):
    case = _node_cases()[name]
    engine = kiln.build(case.model)

    def array(value):
        return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value

    names = [i.name for i in case.model.graph.input]
    for inputs, outputs in case.data_sets:
        got = engine.run({n: array(v) for n, v in zip(names, inputs)})
        for value, expected in zip(case.model.graph.output, outputs):
            expected = array(expected)
            np.testing.assert_array_equal(np.asarray(got[value.name]).astype(np.float64), expected.astype(np.float64))


def test_kiln_qgemm_matches_float64_reference():
    from kiln.ops.quantize import qgemm
    import torch

    x = RNG.standard_normal((3, 7, 40)).astype(np.float32)
    w = RNG.integers(-127, 128, (9, 40), dtype=np.int8)
    w_scale = RNG.uniform(0.001, 0.01, 9).astype(np.float32)
    b = RNG.standard_normal(9).astype(np.float32)
    x_scale = 0.025
    y = qgemm(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(w_scale), torch.from_numpy(b), x_scale=x_scale,
              activation="relu").numpy()
    xq = np.clip(np.rint(x.astype(np.float64) / x_scale), -128, 127)
    want = np.maximum(xq @ w.astype(np.float64).T * (w_scale.astype(np.float64) * x_scale) + b, 0)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
