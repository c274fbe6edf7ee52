"""The CPU fast tactics (oneDNN prepacked conv/linear with fused post-ops, sdpa, bf16) against the fused
ops' reference kernels, and the clear error where the CPU cannot run bf16."""
import numpy as np
import pytest
import torch

import kiln
from kiln.backends.cpu import fast, onednn
from kiln.errors import PrecisionError
from kiln.ir import DType, Graph, Node, Value
from kiln.ops import fused

rng = np.random.default_rng(0)
needs_own_onednn = pytest.mark.skipif(not onednn.available()[0], reason=f"kiln's oneDNN unavailable: {onednn.available()[1]}")
ACTIVATIONS = [("", []), ("relu", []), ("leaky_relu", [0.1]), ("clip", [-0.5, 0.5]), ("clip", [0.0, float("inf")]),
               ("sigmoid", []), ("tanh", []), ("gelu", []), ("gelu_tanh", []), ("silu", []), ("hardswish", [])]


def conv_graph(activation, params, residual=False, group=1, pads=(1, 1, 1, 1)):
    w = (rng.standard_normal((8, 8 // group, 3, 3)) * 0.3).astype(np.float32)
    inputs = ("x", "w", "b") + (("r",) if residual else ())
    node = Node("Conv", inputs, ("y",), {"dilations": [1, 1], "group": group, "kernel_shape": [3, 3], "pads": list(pads),
                                         "strides": [1, 1], "activation": activation, "activation_params": params},
                name="conv", domain="kiln")
    x = Value("x", DType.float32, (2, 8, 10, 10))
    graph_inputs = [x] + ([Value("r", DType.float32, (2, 8, 10, 10))] if residual else [])
    return Graph([node], graph_inputs, [Value("y", DType.float32, (2, 8, 10, 10))],
                 initializers={"w": w, "b": rng.standard_normal(8).astype(np.float32)}, opsets={"": 18, "kiln": 1})


def reference(graph, feed):
    node = graph.nodes[0]
    kernel = {"Conv": fused.conv, "Gemm": fused.gemm}[node.op]
    args = [torch.from_numpy(graph.initializers[n]) if n in graph.initializers else feed[n] for n in node.inputs]
    return kernel(*args, **node.attrs)


@pytest.mark.parametrize("own", [pytest.param(True, marks=needs_own_onednn), False], ids=["kiln's primitive", "torch's call"])
@pytest.mark.parametrize("activation, params", ACTIVATIONS, ids=[f"{a or 'none'}{p}" for a, p in ACTIVATIONS])
def test_onednn_conv_matches_reference(activation, params, own, monkeypatch):
    if not own:
        monkeypatch.setattr(onednn, "available", lambda: (False, "disabled by the test"))
    graph = conv_graph(activation, params, residual=activation == "relu")
    feed = {name: torch.randn(2, 8, 10, 10) for name in ("x", "r")}
    tactic = fast.choose(graph.nodes[0], graph, bf16=False, native=False)
    # kiln's primitive sums a residual only into a buffer nothing reads after it: a graph input's stays torch's
    assert tactic.name == ("onednn-primitive" if own and activation != "relu" else "onednn-packed")
    with torch.inference_mode():
        actual = tactic.run(*[feed.get(n) for n in graph.nodes[0].inputs])
    torch.testing.assert_close(actual, reference(graph, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation, params", ACTIVATIONS, ids=[f"{a or 'none'}{p}" for a, p in ACTIVATIONS])
def test_onednn_linear_matches_reference(activation, params):
    node = Node("Gemm", ("x", "w", "b"), ("y",), {"activation": activation, "activation_params": params}, name="fc", domain="kiln")
    graph = Graph([node], [Value("x", DType.float32, (3, 5, 16))], [Value("y", DType.float32, (3, 5, 24))],
                  initializers={"w": rng.standard_normal((24, 16)).astype(np.float32) * 0.3,
                                "b": rng.standard_normal(24).astype(np.float32)}, opsets={"": 18, "kiln": 1})
    feed = {"x": torch.randn(3, 5, 16)}
    tactic = fast.choose(node, graph, bf16=False)
    with torch.inference_mode():
        actual = tactic.run(feed["x"], None, None)
    torch.testing.assert_close(actual, reference(graph, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not fast.bf16_supported(), reason="this CPU has no AVX512-BF16/AMX")
@pytest.mark.parametrize("group", [1, 2])
def test_bf16_conv_with_residual_is_close(group):
    graph = conv_graph("relu", [], residual=True, group=group)
    feed = {name: torch.randn(2, 8, 10, 10) for name in ("x", "r")}
    tactic = fast.choose(graph.nodes[0], graph, bf16=True)
    assert tactic.precision == "bf16"
    with torch.inference_mode():
        actual = tactic.run(feed["x"], None, None, feed["r"])
    assert actual.dtype == torch.bfloat16
    expected = reference(graph, feed)
    assert (actual.float() - expected).norm() / expected.norm() < 1e-2


def test_asymmetric_padding_falls_back_to_the_reference_kernel():
    graph = conv_graph("relu", [], pads=(0, 0, 1, 1))
    graph.outputs = [Value("y", DType.float32, (2, 8, 9, 9))]
    assert fast.choose(graph.nodes[0], graph, bf16=False).name == "torch"


def test_bf16_reference_layers_meet_in_fp32():
    run = fast._meet_in_fp32(lambda a, b: a + b)
    assert run(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)).dtype == torch.float32
    assert run(torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_activations_round_a_layers_weights_instead_of_widening():
    """A per-channel multiply-add on a bf16 activation stays bf16 (its fp32 weights rounded once, clamped into
    bf16's range); an fp32 activation among its inputs still makes the layer fp32."""
    scale, mask = torch.randn(1, 4, 1, 1), torch.full((1, 4, 1, 1), -3.4e38)
    run = fast._weights_follow_bf16(lambda x, s, m: x * s + m, frozenset({1, 2}))
    x = torch.randn(1, 4, 3, 3)
    y = run(x.bfloat16(), scale, mask)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    expected = x.double() * scale.double()
    assert ((run(x.bfloat16(), scale, torch.zeros(1, 4, 1, 1)).double() - expected).norm() / expected.norm()) < 1e-2
    assert run(x, scale, mask).dtype == torch.float32


@pytest.mark.skipif(not fast.bf16_supported(), reason="this CPU has no AVX512-BF16/AMX")
def test_bf16_engine_keeps_batchnorm_relu_chains_in_bf16():
    """DenseNet's pre-activation pattern (a concatenation of convolutions' outputs, BatchNorm, ReLU, then a
    convolution) runs its chain in bf16."""
    from onnx import TensorProto, helper, numpy_helper

    c = 16
    w = numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32), "w")
    w2 = numpy_helper.from_array((rng.standard_normal((c, 2 * c, 1, 1)) * 0.3).astype(np.float32), "w2")
    params = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
              (("s", rng.uniform(0.5, 1.5, 2 * c)), ("t", rng.standard_normal(2 * c)),
               ("m", rng.standard_normal(2 * c) * 0.1), ("v", rng.uniform(0.5, 1.5, 2 * c)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["a", "w"], ["a2"], kernel_shape=[1, 1]),
             helper.make_node("Concat", ["a", "a2"], ["cat"], axis=1),
             helper.make_node("BatchNormalization", ["cat", "s", "t", "m", "v"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "preact", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], [w, w2, *params])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    engine = kiln.build(model, kiln.BuilderConfig(bf16=True))
    chains = [n for n in engine.plan.graph.nodes if n.op_key == "kiln::Elementwise"]
    assert chains, [n.op_key for n in engine.plan.graph.nodes]
    seen = {}
    x = rng.standard_normal((1, c, 8, 8)).astype(np.float32)
    engine.program.execute({"x": torch.from_numpy(x)}, on_step=lambda step, env: seen.update(
        {step.op: env[step.outputs[0]].dtype}))
    assert seen["kiln::Elementwise"] == torch.bfloat16
    expected = kiln.build(model).run({"x": x})["y"].astype(np.float64)
    got = engine.run({"x": x})["y"]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2


def test_bf16_on_a_cpu_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fast, "bf16_supported", lambda: False)
    with pytest.raises(PrecisionError) as caught:
        kiln.BuilderConfig(bf16=True).validate()
    assert caught.value.code == "KILN-E301" and "AVX512-BF16" in caught.value.message and caught.value.hint


@pytest.mark.parametrize("attrs, size", [({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 112),
                                         ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 55),
                                         ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}, 9)])
def test_max_pool_fast_path_matches_onnxruntime(attrs, size):
    from helpers import assert_close, make_model, run_onnxruntime
    from onnx import helper

    x = rng.standard_normal((1, 4, size, size)).astype(np.float32)
    model = make_model([helper.make_node("MaxPool", ["x"], ["y"], **attrs)], {"x": x}, ["y"])
    engine = kiln.build(model)
    symmetric = "pads" not in attrs or attrs["pads"][:2] == attrs["pads"][2:]
    from kiln.backends.cpu import native

    fast_pool = "native-pool" if native.available()[0] else "torch-pool"
    assert [layer["tactic"] for layer in engine.plan.layers.values()] == [fast_pool if symmetric else "torch"]
    assert_close(engine.run({"x": x})["y"], run_onnxruntime(model, {"x": x})["y"], rtol=0, atol=0)


def test_non_fp32_layers_keep_their_reference_kernel():
    graph = conv_graph("relu", [])
    graph.inputs = [Value("x", DType.float16, (2, 8, 10, 10))]
    graph.values["x"] = graph.inputs[0]
    assert fast.choose(graph.nodes[0], graph, bf16=False).name == "torch"


@pytest.mark.parametrize("bf16", [False, True])
def test_onednn_linear_with_residual(bf16):
    if bf16 and not fast.bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16/AMX")
    node = Node("Gemm", ("x", "w", "b", "r"), ("y",), {"activation": "relu", "activation_params": []}, name="fc", domain="kiln")
    graph = Graph([node], [Value("x", DType.float32, (3, 5, 16)), Value("r", DType.float32, (3, 5, 24))],
                  [Value("y", DType.float32, (3, 5, 24))],
                  initializers={"w": rng.standard_normal((24, 16)).astype(np.float32) * 0.3,
                                "b": rng.standard_normal(24).astype(np.float32)}, opsets={"": 18, "kiln": 1})
    feed = {"x": torch.randn(3, 5, 16), "r": torch.randn(3, 5, 24)}
    with torch.inference_mode():
        actual = fast.choose(node, graph, bf16=bf16).run(feed["x"], None, None, feed["r"])
    expected = reference(graph, feed)
    assert actual.dtype == torch.float32, "an fp32 residual keeps the sum in fp32"
    assert (actual - expected).norm() / expected.norm() < (1e-2 if bf16 else 1e-6)


def pointwise_graph(activation, bias=True, channels=(16, 24), size=6, batch=2):
    cin, cout = channels
    inputs = ("x", "w", "b") if bias else ("x", "w")
    node = Node("Conv", inputs, ("y",), {"dilations": [1, 1], "group": 1, "kernel_shape": [1, 1], "pads": [0, 0, 0, 0],
                                         "strides": [1, 1], "activation": activation, "activation_params": []},
                name="conv", domain="kiln")
    initializers = {"w": (rng.standard_normal((cout, cin, 1, 1)) * 0.3).astype(np.float32)}
    if bias:
        initializers["b"] = rng.standard_normal(cout).astype(np.float32)
    return Graph([node], [Value("x", DType.float32, (batch, cin, size, size))],
                 [Value("y", DType.float32, (batch, cout, size, size))], initializers=initializers, opsets={"": 18, "kiln": 1})


@pytest.fixture
def without_native(monkeypatch):
    """The torch oneDNN tactics kiln falls back to where its compiled libraries (native kernels, its own oneDNN
    primitives) cannot be built (tests/backends/test_cpu_native.py and test_cpu_onednn.py cover those)."""
    from kiln.backends.cpu import native

    monkeypatch.setattr(native, "available", lambda: (False, "disabled by the test"))
    monkeypatch.setattr(onednn, "available", lambda: (False, "disabled by the test"))


@pytest.mark.usefixtures("without_native")
@pytest.mark.parametrize("activation", ["", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_small_pointwise_conv_runs_as_a_matrix_product(activation, bias, channels_last):
    """A small 1x1 convolution runs as oneDNN's matrix product over the pixels (the convolution's call costs more
    than its work) and returns the channels-last tensor the convolution would; its numbers match the reference."""
    graph = pointwise_graph(activation, bias)
    tactic = fast.choose(graph.nodes[0], graph, bf16=False)
    assert tactic.name == "onednn-linear"
    x = torch.randn(2, 16, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        actual = tactic.run(x, None, None)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, reference(graph, {"x": x}), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("without_native")
def test_large_or_fused_pointwise_convs_stay_onednn():
    large = pointwise_graph("relu", channels=(512, 1000), size=13, batch=1)
    assert fast.choose(large.nodes[0], large, bf16=False).name == "onednn-packed"
    sigmoid = pointwise_graph("sigmoid")  # only ReLU runs in place after the product
    assert fast.choose(sigmoid.nodes[0], sigmoid, bf16=False).name == "onednn-packed"
    residual = pointwise_graph("relu")  # oneDNN adds a residual as a post-op
    residual.nodes[0] = residual.nodes[0].replace(inputs=("x", "w", "b", "r"))
    residual.inputs.append(Value("r", DType.float32, (2, 24, 6, 6)))
    assert fast.choose(residual.nodes[0], residual, bf16=False).name == "onednn-packed"
    if fast.bf16_supported():  # without AVX512-BF16/AMX a bf16 build stops at KILN-E301 before any tactic
        assert fast.choose(pointwise_graph("relu").nodes[0], pointwise_graph("relu"), bf16=True).name == "onednn-packed"


def residual_block_model(residual_is_output: bool, residual_is_input: bool = False):
    """t = relu(conv(x)); y = relu(conv(u) + t), u = relu(conv(t)) (or t itself): the last convolution reads t as its
    fused residual, last."""
    from onnx import TensorProto, helper, numpy_helper

    c = 8
    weights = [numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32), name) for name in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["t"]),
             helper.make_node("Conv", ["t", "w1"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["u"]),
             helper.make_node("Conv", ["t" if residual_is_input else "u", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "t"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])]
    if residual_is_output:
        outputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, c, 6, 6]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("residual_is_output, residual_is_input", [(False, False), (True, False), (False, True)])
def test_a_dying_residual_takes_the_convolution_sum_in_place(residual_is_output, residual_is_input):
    """The block's last convolution adds into t's buffer only where nothing reads t afterwards (here: unless t is
    also a graph output) and it does not read t as its input too; either way the outputs equal onnxruntime's, on
    every run."""
    import onnxruntime as ort

    model = residual_block_model(residual_is_output, residual_is_input)
    engine = kiln.build(model, kiln.BuilderConfig())
    graph = engine.plan.graph
    fused = [n for n in graph.nodes if n.op_key == "kiln::Conv" and len(n.inputs) > 3 and n.inputs[3]]
    assert len(fused) == 1
    assert fast._residual_dies_here(fused[0], graph) is not (residual_is_output or residual_is_input)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for _ in range(2):
        outputs = engine.run({"x": x})
        for name, want in zip(["y", "t"], expected):
            np.testing.assert_allclose(np.asarray(outputs[name]), want, rtol=1e-5, atol=1e-5)


def attention_graph(scale):
    node = Node("Attention", ("q", "k", "v", "mask"), ("y",), {"scale": scale}, name="attention", domain="kiln")
    inputs = [Value(name, DType.float32, (2, 3, 16, 8)) for name in ("q", "k", "v")] + [Value("mask", DType.float32, None)]
    return Graph([node], inputs, [Value("y", DType.float32, (2, 3, 16, 8))], opsets={"": 18, "kiln": 1})


def float64_attention(q, k, v, mask, scale):
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, -1) @ v.double()


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 16), (2, 1, 16, 16), (16, 16), (2, 3, 16, 16), (4, 2, 3, 16, 16)],
                         ids=lambda shape: "x".join(map(str, shape)) if shape else "no-mask")
@pytest.mark.parametrize("boolean", [False, True], ids=["additive", "boolean"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_attention_matches_float64(mask_shape, boolean, bf16):
    """kiln::Attention on the CPU (a BERT layer's shapes, shrunk): masks that broadcast across heads, rows or batches,
    additive or boolean, against float64 softmax(q k^T * scale + mask) v; bf16 within its rounding."""
    if boolean and mask_shape is None:
        pytest.skip("no mask to be boolean")
    if bf16 and not fast.bf16_supported():
        pytest.skip("no AVX512-BF16 / AMX-BF16 here")
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=generator) for _ in range(3))
    mask = None
    if mask_shape is not None:
        keep = torch.rand(mask_shape, generator=generator) > 0.3
        keep[..., 0] = True  # no row fully masked
        mask = keep if boolean else torch.where(keep, torch.randn(mask_shape, generator=generator), torch.tensor(-1e4))
    graph = attention_graph(0.35)
    run = fast.choose(graph.nodes[0], graph, bf16).run
    y = run(q, k, v, mask)
    expected = float64_attention(q, k, v, mask, 0.35)
    assert y.shape == expected.shape and y.dtype == (torch.bfloat16 if bf16 else torch.float32)
    tolerance = 3e-2 if bf16 else 1e-5
    assert (y.double() - expected).abs().max().item() < tolerance


def test_a_convolution_whose_bias_is_an_input_keeps_the_reference_kernel():
    from helpers import run_onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(6)
    weight = generator.standard_normal((8, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "runtime_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
                                                      helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = kiln.build(model, kiln.BuilderConfig())
    feed = {"x": generator.standard_normal((1, 4, 6, 6)).astype(np.float32), "b": generator.standard_normal(8).astype(np.float32)}
    np.testing.assert_allclose(np.asarray(engine.run(feed)["y"]), run_onnxruntime(model, feed)["y"], rtol=1e-5, atol=1e-5)
