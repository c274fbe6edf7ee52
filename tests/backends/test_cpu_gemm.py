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
