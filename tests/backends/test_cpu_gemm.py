"""kiln's native bf16 matrix product (kiln/backends/cpu/gemm.py) against float64 of its rounded operands, the layers that
take it, and a bf16 engine built on it against onnxruntime."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.backends.cpu import fast, gemm, native

needs_gemm = pytest.mark.skipif(not native.bf16_available(), reason="no native bf16 kernels (no AVX512-BF16)")
pytestmark = needs_gemm

ACTIVATIONS = {"": lambda y: y, "relu": torch.relu, "clip": lambda y: y.clamp(-0.5, 0.75), "gelu": F.gelu,
               "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def expected(x, w, b, activation, residual=None):
    """float64 of what the kernel multiplies: x and w rounded to bf16, bias and residual as given."""
    y = x.bfloat16().double() @ torch.from_numpy(w).bfloat16().double().t() + torch.from_numpy(b).double()
    if residual is not None:
        y = y + residual.double()
    return ACTIVATIONS[activation](y)


# (leading shape of x, k, n): one row, rows off the 6-row tile, several 64-column panels with a partial 16-column
# block, a reduction of one pair, BERT-base's shapes, chunks of rows (k 3072: 42 rows a chunk)
SHAPES = [((1,), 64, 16), ((5,), 32, 20), ((2, 7), 96, 100), ((13,), 2, 64), ((128,), 768, 768), ((3, 50), 3072, 48)]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{'x'.join(map(str, s[0]))}-k{s[1]}-n{s[2]}" for s in SHAPES])
def test_product_matches_float64(shape, activation):
    lead, k, n = shape
    generator = torch.Generator().manual_seed(k + n)
    x = torch.randn(*lead, k, generator=generator)
    w = (torch.randn(n, k, generator=generator) / math.sqrt(k)).numpy()
    b = torch.randn(n, generator=generator).numpy()
    product = gemm.Gemm(w, b, activation, [-0.5, 0.75] if activation == "clip" else [])
    y = product(x)
    reference = expected(x, w, b, activation)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (*lead, n)
    # fp32 sums, then one rounding to bf16 (2^-8 relative)
    assert ((y.double() - reference).abs() <= 2 ** -8 * reference.abs() + 1e-4).all()


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_residual_is_summed_before_the_activation_in_its_own_type(residual_dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 128, generator=generator)
    w = (torch.randn(80, 128, generator=generator) / math.sqrt(128)).numpy()
    b = torch.randn(80, generator=generator).numpy()
    residual = torch.randn(2, 9, 80, generator=generator).to(residual_dtype)
    y = gemm.Gemm(w, b, "relu")(x, residual)
    reference = expected(x, w, b, "relu", residual)
    # an fp32 residual stream keeps the sum fp32, as torch's bf16 + fp32 does
    assert y.dtype == residual_dtype
    tolerance = 1e-5 if residual_dtype == torch.float32 else 2 ** -8
    assert ((y.double() - reference).abs() <= tolerance * reference.abs() + 1e-4).all()


def test_a_nan_stays_nan_through_the_clamp():
    x = torch.randn(4, 32)
    x[2, 5] = math.nan
    y = gemm.Gemm(np.ones((16, 32), np.float32), np.zeros(16, np.float32), "relu")(x)
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()


def test_products_linked_in_turn_give_the_same_results():
    """prefetch_in_turn points each product at the next one's weights, which it only asks the cache for."""
    generator = torch.Generator().manual_seed(4)
    weights = [(torch.randn(n, k, generator=generator) / math.sqrt(k)).numpy() for n, k in ((192, 64), (320, 192), (64, 320))]
    products = [gemm.Gemm(w, np.zeros(w.shape[0], np.float32), "gelu") for w in weights]
    x = torch.randn(20, 64, generator=generator)

    def chain():
        y = x
        for product in products:
            y = product(y)
        return y

    alone = chain()
    gemm.prefetch_in_turn(products)
    assert products[0].next is products[1] and products[2].next is None
    torch.testing.assert_close(chain(), alone, rtol=0, atol=0)


def test_what_it_refuses():
    assert not gemm.takes((16, 33), "")  # its dot products take pairs along the reduction
    assert not gemm.takes((16, 32), "sigmoid")
    with pytest.raises(ValueError, match="even reduction"):
        gemm.Gemm(np.ones((16, 33), np.float32), None, "")
    product = gemm.Gemm(np.ones((16, 32), np.float32), None, "")
    with pytest.raises(ValueError, match="rows of 32"):
        product(torch.ones(3, 31))
    with pytest.raises(ValueError, match="residual"):
        product(torch.ones(3, 32), torch.ones(3, 15))
    assert product(torch.ones(0, 32)).shape == (0, 16)


def gemm_model(k=64, n=48, activation="Gelu"):
    """x @ W + b, then an activation, then x2 @ W2 + b2 + the first product's output (a residual)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((n, n)) / math.sqrt(n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node(activation, ["a1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Add", ["a2", "h"], ["y"])]
    initializers = [numpy_helper.from_array(a, name) for name, a in
                    (("w1", w1), ("w2", w2), ("b1", rng.standard_normal(n).astype(np.float32)),
                     ("b2", rng.standard_normal(n).astype(np.float32)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10, n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.skipif(not fast.bf16_supported(), reason="no bf16 CPU engines here")
def test_a_bf16_engine_runs_its_products_natively_and_matches_onnxruntime():
    import onnxruntime as ort

    model = gemm_model()
    x = np.random.default_rng(1).standard_normal((2, 10, 64)).astype(np.float32)
    engine = kiln.build(model, kiln.BuilderConfig(bf16=True))
    tactics = {info["tactic"] for info in engine.plan.layers.values() if info["op"] == "kiln::Gemm"}
    assert tactics <= {"native-gemm", "onednn-packed"} and tactics, tactics
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    outputs = [engine.run({"x": x})["y"] for _ in range(3)]  # the first run records, the later ones replay
    for y in outputs:
        assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 1e-2
    np.testing.assert_array_equal(outputs[1], outputs[2])
    # the rule without a race (no timing feed is needed here: the feed is float) keeps a native product per layer
    graph = engine.plan.graph
    for node in graph.nodes:
        if node.op == "Gemm":
            assert fast.choose(node, graph, bf16=True).name == "native-gemm"
            assert fast.choose(node, graph, bf16=True, native=False).name == "onednn-packed"


def float64_pointwise(x, w, b, residual=None, clamp=(0.0, math.inf)):
    y = F.conv2d(x.bfloat16().double(), torch.from_numpy(w).bfloat16().double(), torch.from_numpy(b).double())
    if residual is not None:
        y = y + residual.double()
    return y.clamp(*clamp)


@pytest.mark.parametrize("residual", ["none", "summed", "in place"])
@pytest.mark.parametrize("cin, cout", [(64, 256), (256, 64), (48, 40)])
def test_pointwise_convolution_matches_float64(cin, cout, residual):
    """1x1 convolutions as the product over NHWC pixels: a 64-channel output (one panel: the threads split the rows),
    channels off the 16-channel block; a residual summed into a new buffer or its own."""
    generator = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(2, cin, 7, 9, generator=generator).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=generator) / math.sqrt(cin)).numpy()
    b = torch.randn(cout, generator=generator).numpy()
    r = torch.randn(2, cout, 7, 9, generator=generator).bfloat16().contiguous(memory_format=torch.channels_last)
    conv = gemm.PointwiseConvolution(w, b, "relu")
    given = r.clone() if residual != "none" else None
    y = conv(x, given, in_place=residual == "in place")
    expected = float64_pointwise(x, w, b, r if residual != "none" else None)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert tuple(y.shape) == tuple(expected.shape) == conv.output_shape(x)
    assert (given is not None and y.data_ptr() == given.data_ptr()) == (residual == "in place")
    assert ((y.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-4).all()


def test_pointwise_convolution_writes_a_concatenations_slice():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(1, 32, 5, 5, generator=generator)  # fp32 NCHW: rounded to bf16 and made NHWC first
    w = (torch.randn(48, 32, 1, 1, generator=generator) / math.sqrt(32)).numpy()
    b = torch.randn(48, generator=generator).numpy()
    buffer = torch.full((1, 80, 5, 5), 7.0, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv = gemm.PointwiseConvolution(w, b, "clip", [-0.5, 0.5])
    out = buffer[:, 16:64]
    assert conv(x, out=out).data_ptr() == out.data_ptr()
    expected = float64_pointwise(x, w, b, clamp=(-0.5, 0.5))
    assert ((out.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-4).all()
    assert (buffer[:, :16] == 7).all() and (buffer[:, 64:] == 7).all()


def test_which_convolutions_the_product_takes():
    takes = gemm.PointwiseConvolution.takes
    assert takes((64, 32, 1, 1), [1, 1], [0] * 4, [1, 1], 1, "relu")
    for shape, strides, pads, groups, activation in [((64, 32, 1, 1), [2, 2], [0] * 4, 1, ""),
                                                     ((64, 32, 1, 1), [1, 1], [1] * 4, 1, ""),
                                                     ((64, 32, 3, 3), [1, 1], [0] * 4, 1, ""),
                                                     ((64, 32, 1, 1), [1, 1], [0] * 4, 2, ""),
                                                     ((64, 33, 1, 1), [1, 1], [0] * 4, 1, ""),
                                                     ((64, 32, 1, 1), [1, 1], [0] * 4, 1, "sigmoid")]:
        assert not takes(shape, strides, pads, [1, 1], groups, activation), (shape, strides, pads, groups, activation)
    with pytest.raises(ValueError, match="32 float channels"):
        gemm.PointwiseConvolution(np.ones((16, 32, 1, 1), np.float32), None, "")(torch.ones(1, 31, 2, 2))
