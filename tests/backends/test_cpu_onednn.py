"""kiln's own oneDNN convolutions (kiln/backends/cpu/onednn.py) against float64 torch, the layers that take them, and
the fallback to torch's oneDNN call where the library is absent or oneDNN offers only a reference kernel."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.backends.cpu import fast, onednn

needs_onednn = pytest.mark.skipif(not onednn.available()[0], reason=f"kiln's oneDNN unavailable: {onednn.available()[1]}")
rng = np.random.default_rng(0)

ACTIVATIONS = {"": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
               "clip": lambda t: t.clamp(-0.5, 0.5), "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
PARAMS = {"leaky_relu": [0.1], "clip": [-0.5, 0.5]}
# (batch, in, out, size, kernel, stride, pads [t, l, b, r], dilation, groups): 1x1, padded 3x3, strided, dilated,
# grouped and depthwise, asymmetric padding, output channels off any block size, a 7x7 stem on 3 channels
SHAPES = [(1, 64, 16, 13, 1, 1, (0, 0, 0, 0), 1, 1), (2, 16, 24, 9, 3, 1, (1, 1, 1, 1), 1, 1),
          (1, 32, 40, 15, 3, 2, (1, 1, 1, 1), 1, 1), (1, 24, 32, 12, 3, 1, (2, 2, 2, 2), 2, 1),
          (1, 32, 32, 10, 3, 1, (1, 1, 1, 1), 1, 32), (2, 16, 24, 8, 3, 1, (1, 1, 1, 1), 1, 4),
          (1, 16, 17, 7, 3, 1, (0, 1, 2, 1), 1, 1), (1, 3, 64, 32, 7, 2, (3, 3, 3, 3), 1, 1)]


def float64_conv(x, w, b, stride, pads, dilation, groups):
    top, left, bottom, right = pads
    x = F.pad(x.double(), (left, right, top, bottom))
    return F.conv2d(x, torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride, 0, dilation, groups)


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_convolution_matches_float64(shape, residual):
    n, cin, cout, size, k, stride, pads, dilation, groups = shape
    w = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    x = torch.randn(n, cin, size, size)
    expected = float64_conv(x, w, b, stride, pads, dilation, groups)
    r = torch.randn(expected.shape).contiguous(memory_format=torch.channels_last) if residual else None
    if residual:
        expected = expected + r.double()
    expected = F.relu(expected)
    conv = onednn.Convolution(w, b, [stride] * 2, list(pads), [dilation] * 2, groups, "relu", [], residual)
    y = conv(x, r.clone(memory_format=torch.channels_last) if residual else None)
    assert y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - expected).abs().max().item() < 1e-4


@needs_onednn
@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=lambda a: a or "none")
def test_every_activation_post_op(activation):
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    x = torch.randn(2, 16, 9, 9)
    conv = onednn.Convolution(w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, activation, PARAMS.get(activation, []), False)
    expected = ACTIVATIONS[activation](float64_conv(x, w, b, 1, (1, 1, 1, 1), 1, 1))
    assert (conv(x).double() - expected).abs().max().item() < 1e-4


@needs_onednn
def test_the_residual_is_summed_into_its_own_buffer():
    w = (rng.standard_normal((16, 16, 1, 1)) * 0.2).astype(np.float32)
    conv = onednn.Convolution(w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, "", [], True)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    expected = float64_conv(x, w, np.zeros(16, np.float32), 1, (0, 0, 0, 0), 1, 1) + residual.double()
    y = conv(x, residual)
    assert y.data_ptr() == residual.data_ptr()
    assert (y.double() - expected).abs().max().item() < 1e-5
    # a residual that is the input itself is summed into a copy: the input is read whole first
    expected = float64_conv(x, w, np.zeros(16, np.float32), 1, (0, 0, 0, 0), 1, 1) + x.double()
    y = conv(x, x)
    assert y.data_ptr() != x.data_ptr() and (y.double() - expected).abs().max().item() < 1e-5


@needs_onednn
def test_a_shape_it_cannot_take_is_a_clear_value_error():
    conv = onednn.Convolution(np.ones((8, 4, 3, 3), np.float32), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, "", [], False)
    with pytest.raises(ValueError, match="does not fit"):
        conv.primitive((1, 5, 8, 8))


@needs_onednn
def test_concurrent_calls_of_one_convolution():
    w = (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    conv = onednn.Convolution(w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu", [], False)
    inputs = [torch.randn(1, 32, 12, 12) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(conv, inputs * 4))
    for x, y in zip(inputs * 4, outputs):
        assert (y.double() - F.relu(float64_conv(x, w, b, 1, (1, 1, 1, 1), 1, 1))).abs().max().item() < 1e-4


def conv_graph(activation="relu"):
    from kiln.ir import DType, Graph, Node, Value

    node = Node("Conv", ("x", "w", "b"), ("y",), {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                  "strides": [1, 1], "activation": activation, "activation_params": []},
                name="conv", domain="kiln")
    return Graph([node], [Value("x", DType.float32, (1, 16, 8, 8))], [Value("y", DType.float32, (1, 24, 8, 8))],
                 initializers={"w": (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32),
                               "b": rng.standard_normal(24).astype(np.float32)}, opsets={"": 18, "kiln": 1})


@needs_onednn
def test_a_layer_with_only_a_reference_kernel_keeps_torchs_call(monkeypatch):
    graph = conv_graph("sigmoid")
    assert fast.choose(graph.nodes[0], graph, bf16=False, native=False).name == "onednn-primitive"

    def refused(self, input_shape):
        raise ValueError("oneDNN refused the convolution: only a reference kernel (ref:any) runs it")

    monkeypatch.setattr(onednn.Convolution, "primitive", refused)
    assert fast.choose(graph.nodes[0], graph, bf16=False, native=False).name == "onednn-packed"


@needs_onednn
def test_opting_out(monkeypatch):
    monkeypatch.setenv("KILN_ONEDNN", "0")
    onednn._load.cache_clear()
    try:
        assert onednn.available() == (False, "KILN_ONEDNN=0")
        graph = conv_graph("sigmoid")
        assert fast.choose(graph.nodes[0], graph, bf16=False, native=False).name == "onednn-packed"
    finally:
        monkeypatch.delenv("KILN_ONEDNN")
        onednn._load.cache_clear()


@needs_onednn
def test_an_engine_on_its_primitives_matches_onnxruntime():
    from backends.test_cpu_fast import residual_block_model
    from helpers import run_onnxruntime

    model = residual_block_model(False)
    engine = kiln.build(model, kiln.BuilderConfig())
    assert "onednn-primitive" in {layer["tactic"] for layer in engine.plan.layers.values()}
    for _ in range(3):
        x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(engine.run({"x": x})["y"]), run_onnxruntime(model, {"x": x})["y"],
                                   rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_fire_modules_primitives_write_into_its_concatenation(monkeypatch):
    """Where oneDNN wins the race, its convolutions write their slices of the concatenation's buffer themselves."""
    from backends.test_cpu_native import fire_module
    from helpers import run_onnxruntime

    from kiln.backends.cpu import select

    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {name: select.ONEDNN for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.ONEDNN)
    model, x = fire_module()
    engine = kiln.build(model, kiln.BuilderConfig())
    layers = engine.plan.layers
    assert next(layer for layer in layers.values() if layer["op"] == "Concat")["tactic"] == "native-in-place"
    assert {layer["tactic"] for layer in layers.values() if layer["op"] == "kiln::Conv"} == {"onednn-primitive"}
    expected = run_onnxruntime(model, {"x": x})["y"]
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(engine.run({"x": x})["y"]), expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_writing_into_a_slice_of_a_wider_buffer():
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    conv = onednn.Convolution(w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu", [], False)
    x = torch.randn(2, 16, 7, 7)
    buffer = torch.full((2, 40, 7, 7), -7.0).contiguous(memory_format=torch.channels_last)
    y = conv(x, out=buffer[:, 8:32])
    assert y.data_ptr() == buffer[:, 8:32].data_ptr()
    assert (buffer[:, 8:32].double() - F.relu(float64_conv(x, w, b, 1, (1, 1, 1, 1), 1, 1))).abs().max().item() < 1e-4
    assert (buffer[:, :8] == -7).all() and (buffer[:, 32:] == -7).all()  # the rest of the buffer untouched


needs_bf16 = pytest.mark.skipif(not fast.bf16_supported(), reason="no AVX512-BF16 / AMX-BF16 here")


def bf16_rounded(array):
    return torch.as_tensor(array).to(torch.bfloat16).to(torch.float32)


@needs_onednn
@needs_bf16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_bf16_convolution_matches_float64_of_its_rounded_operands(shape, residual):
    """A bf16 primitive rounds its input and weights to bf16, accumulates in fp32 and rounds its output to bf16: against
    float64 over the rounded operands, each output is off by at most its own rounding (2^-8 relative; 1e-5 for the fp32 sums)."""
    n, cin, cout, size, k, stride, pads, dilation, groups = shape
    w = (rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    x = torch.randn(n, cin, size, size)
    expected = float64_conv(bf16_rounded(x), bf16_rounded(w).numpy(), b, stride, pads, dilation, groups)
    r = torch.randn(expected.shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last) if residual else None
    if residual:
        expected = expected + r.double()
    expected = F.relu(expected)
    conv = onednn.Convolution(w, b, [stride] * 2, list(pads), [dilation] * 2, groups, "relu", [], residual, torch.bfloat16)
    y = conv(x, r.clone(memory_format=torch.channels_last) if residual else None)
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-5).all()
    assert (y.double() - expected).abs().max().item() > 0  # rounded to bf16 indeed


@needs_onednn
@needs_bf16
@pytest.mark.parametrize("kernel", [1, 3])
def test_bf16_writing_into_a_slice_of_a_wider_buffer(kernel):
    w = (rng.standard_normal((24, 16, kernel, kernel)) * 0.2).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    pads = [kernel // 2] * 4
    conv = onednn.Convolution(w, b, [1, 1], pads, [1, 1], 1, "relu", [], False, torch.bfloat16)
    x = torch.randn(2, 16, 7, 7)
    buffer = torch.full((2, 40, 7, 7), -7.0, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv(x, out=buffer[:, 8:32])
    expected = F.relu(float64_conv(bf16_rounded(x), bf16_rounded(w).numpy(), b, 1, pads, 1, 1))
    assert ((buffer[:, 8:32].double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-5).all()
    assert (buffer[:, :8] == -7).all() and (buffer[:, 32:] == -7).all()  # the rest of the buffer untouched
    with pytest.raises(ValueError, match="bfloat16 channel slice"):
        conv(x, out=torch.empty(2, 40, 7, 7).contiguous(memory_format=torch.channels_last)[:, 8:32])


@needs_onednn
@needs_bf16
def test_a_bf16_fire_module_runs_on_primitives_that_write_its_concatenation(monkeypatch):
    from backends.test_cpu_native import fire_module
    from helpers import run_onnxruntime

    from kiln.backends.cpu import select

    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {name: select.ONEDNN for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.ONEDNN)
    model, x = fire_module()
    engine = kiln.build(model, kiln.BuilderConfig(bf16=True))
    layers = engine.plan.layers
    assert next(layer for layer in layers.values() if layer["op"] == "Concat")["tactic"] == "native-in-place"
    convolutions = [layer for layer in layers.values() if layer["op"] == "kiln::Conv"]
    assert {(layer["tactic"], layer["precision"]) for layer in convolutions} == {("onednn-primitive", "bf16")}
    expected = run_onnxruntime(model, {"x": x})["y"]
    for _ in range(2):  # the recorded run, then the replay
        y = np.asarray(engine.run({"x": x})["y"], np.float64)
        assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 1e-2


def test_it_builds_wherever_its_wheel_is_installed():
    """The other tests here skip where the library is unavailable: where the wheel is installed (as `make` installs it
    on Linux x86-64), unavailable means it failed to build, which must fail a test instead of skipping them."""
    include, lib = onednn._prefix()
    if (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
        assert onednn.available() == (True, "")
