"""Horizontal Gemm fusion: Gemms sharing an input become one kiln::Gemm and a Split; what does not fuse; the engine
against the unoptimized one on a small model and on BERT-style encoders."""
import numpy as np
import torch
from helpers import assert_close, make_model
from onnx import helper
from passes.rewrite_check import check_rewrite

import kiln
from kiln.passes import fuse_activation, fuse_gemm, fuse_parallel_gemm

rng = np.random.default_rng(0)
PASSES = [fuse_gemm.run, fuse_activation.run, fuse_parallel_gemm.run]


def randn(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def projections_model():
    """q and v with a bias, k without, all three through Relu; q + k read the results, v is a graph output."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["mq"], name="q_matmul"),
             helper.make_node("Add", ["mq", "bq"], ["hq"], name="q_bias"),
             helper.make_node("Relu", ["hq"], ["q"], name="q_relu"),
             helper.make_node("MatMul", ["x", "wk"], ["hk"], name="k_matmul"),
             helper.make_node("Relu", ["hk"], ["k"], name="k_relu"),
             helper.make_node("MatMul", ["x", "wv"], ["mv"], name="v_matmul"),
             helper.make_node("Add", ["bv", "mv"], ["hv"], name="v_bias"),
             helper.make_node("Relu", ["hv"], ["v"], name="v_relu"),
             helper.make_node("Add", ["q", "k"], ["s"], name="sum")]
    inits = {"wq": randn(8, 6), "bq": randn(6), "wk": randn(8, 6), "wv": randn(8, 4), "bv": randn(4)}
    return make_model(nodes, {"x": randn(2, 5, 8)}, ["s", "v"], inits), inits


def test_gemms_sharing_an_input_become_one_gemm_and_a_split():
    model, inits = projections_model()
    graph = check_rewrite(model, PASSES, ["kiln::Gemm", "Split", "Add"],
                          {"fuse_matmul_bias": 2, "lower_matmul": 1, "fuse_activation_relu": 3, "parallel_gemm_fused": 3},
                          {"x": randn(2, 5, 8)})
    gemm, split, add = graph.nodes
    assert gemm.inputs[0] == "x" and gemm.attrs["activation"] == "relu" and len(gemm.inputs) == 3
    np.testing.assert_array_equal(graph.initializers[gemm.inputs[1]],
                                  np.concatenate([inits["wq"].T, inits["wk"].T, inits["wv"].T]))
    np.testing.assert_array_equal(graph.initializers[gemm.inputs[2]], np.concatenate([inits["bq"], np.zeros(6), inits["bv"]]))
    assert split.inputs[0] == gemm.outputs[0] and split.outputs == ("q", "k", "v") and split.attrs == {"axis": -1}
    sizes = graph.initializers[split.inputs[1]]
    assert sizes.dtype == np.int64 and sizes.tolist() == [6, 6, 4]
    assert add.inputs == ("q", "k"), "readers of the projections are untouched"
    assert gemm.origin == ("q_matmul", "q_bias", "q_relu", "k_matmul", "k_relu", "v_matmul", "v_bias", "v_relu")
    assert split.origin == gemm.origin
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names) and all(names)


def two_projections(first: list, second: list, inits: dict, inputs: dict):
    return make_model(first + second, inputs, [first[-1].output[0], second[-1].output[0]], inits)


def test_different_activations_do_not_fuse():
    model = two_projections([helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Relu", ["m1"], ["y1"])],
                            [helper.make_node("MatMul", ["x", "w2"], ["m2"]), helper.make_node("Sigmoid", ["m2"], ["y2"])],
                            {"w1": randn(8, 4), "w2": randn(8, 4)}, {"x": randn(3, 8)})
    check_rewrite(model, PASSES, ["kiln::Gemm", "kiln::Gemm"],
                  {"lower_matmul": 2, "fuse_activation_relu": 1, "fuse_activation_sigmoid": 1}, {"x": randn(3, 8)})


def test_a_computed_weight_does_not_fuse():
    """The second weight is a graph input: it stays a MatMul, and the one constant-weight Gemm has nothing to join."""
    model = two_projections([helper.make_node("MatMul", ["x", "w1"], ["y1"])], [helper.make_node("MatMul", ["x", "w2"], ["y2"])],
                            {"w1": randn(8, 4)}, {"x": randn(3, 8), "w2": randn(8, 4)})
    check_rewrite(model, PASSES, ["kiln::Gemm", "MatMul"], {"lower_matmul": 1}, {"x": randn(3, 8), "w2": randn(8, 4)})


def test_a_gemm_with_a_residual_does_not_fuse():
    model = two_projections([helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h1"]),
                             helper.make_node("Add", ["h1", "x"], ["y1"])],
                            [helper.make_node("MatMul", ["x", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["y2"])],
                            {"w1": randn(8, 8), "b1": randn(8), "w2": randn(8, 8), "b2": randn(8)}, {"x": randn(2, 3, 8)})
    check_rewrite(model, PASSES, ["kiln::Gemm", "kiln::Gemm"], {"fuse_matmul_bias": 2, "fuse_gemm_residual": 1},
                  {"x": randn(2, 3, 8)})


def test_gemms_on_different_inputs_do_not_fuse():
    model = two_projections([helper.make_node("MatMul", ["x", "w1"], ["y1"])], [helper.make_node("MatMul", ["z", "w2"], ["y2"])],
                            {"w1": randn(8, 4), "w2": randn(8, 4)}, {"x": randn(3, 8), "z": randn(3, 8)})
    check_rewrite(model, PASSES, ["kiln::Gemm", "kiln::Gemm"], {"lower_matmul": 2}, {"x": randn(3, 8), "z": randn(3, 8)})


def test_groups_with_different_activations_fuse_separately():
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in range(4)] + [
        helper.make_node("Relu", ["m0"], ["y0"]), helper.make_node("Relu", ["m2"], ["y2"])]
    inits = {f"w{i}": randn(8, 4 + i) for i in range(4)}
    model = make_model(nodes, {"x": randn(3, 8)}, ["y0", "m1", "y2", "m3"], inits)
    graph = check_rewrite(model, PASSES, ["kiln::Gemm", "Split", "kiln::Gemm", "Split"],
                          {"lower_matmul": 4, "fuse_activation_relu": 2, "parallel_gemm_fused": 4}, {"x": randn(3, 8)})
    # the Relu Gemms stand where their Relus stood, after the plain ones
    assert graph.nodes[1].outputs == ("m1", "m3") and graph.nodes[3].outputs == ("y0", "y2")
    assert graph.nodes[0].attrs["activation"] == "" and graph.nodes[2].attrs["activation"] == "relu"


def attention_block(hidden=16, heads=2):
    """Q, K, V projections of one input, heads split by Reshape/Transpose from the Split's views, attention, and an
    output projection reading the context: the pass's outputs reach oneDNN and the reshapes as strided views."""
    dim = hidden // heads
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"m{name}"]),
                  helper.make_node("Add", [f"m{name}", f"b{name}"], [name]),
                  helper.make_node("Reshape", [name, "heads"], [f"{name}4"])]
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"]), helper.make_node("Div", ["scores", "root"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["ct", "flat"], ["c"]),
              helper.make_node("MatMul", ["c", "wo"], ["y"]),
              helper.make_node("MatMul", ["k", "wk2"], ["y2"])]  # a Split view straight into another Gemm
    inits = {f"w{n}": randn(hidden, hidden, scale=0.3) for n in ("q", "k", "v", "o", "k2")}
    inits.update({f"b{n}": randn(hidden) for n in ("q", "k", "v")})
    inits.update({"heads": np.array([0, 0, heads, dim], np.int64), "flat": np.array([0, 0, hidden], np.int64),
                  "root": np.array(np.sqrt(dim), np.float32)})
    return make_model(nodes, {"x": randn(2, 7, hidden)}, ["y", "y2", "v"], inits)


def test_engine_equals_the_unoptimized_engine_on_strided_split_outputs():
    model = attention_block()
    feed = {"x": randn(2, 7, 16)}
    engine = kiln.build(model)
    counters = engine.plan.build_info["counters"]
    assert counters["parallel_gemm_fused"] == 3 and counters["recognize_attention"] == 1
    fused = [name for name, layer in engine.plan.layers.items() if layer["op"] == "kiln::Gemm" and len(layer["origin"]) == 6]
    assert len(fused) == 1 and engine.plan.layers[fused[0]]["tactic"] == "onednn-packed"
    expected = kiln.build(model, kiln.BuilderConfig(optimize=False)).run(feed)
    actual = engine.run(feed)
    for name in ("y", "y2", "v"):
        assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, what=name)


def bert_path(tmp_path_factory, layer_class, layers):
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert(hidden=64, heads=4, layers=layers).eval()
    module.layers = torch.nn.ModuleList(layer_class(64, 4) for _ in range(layers))
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    torch.onnx.export(module.eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=True, verbose=False)
    return str(path)


class SeparateProjectionLayer(torch.nn.Module):
    """The encoder layer of tests/models with Q, K and V as three Linear layers, as Hugging Face's BERT has them."""

    def __init__(self, hidden: int, heads: int):
        from models.test_bert_encoder import EncoderLayer

        super().__init__()
        self.inner = EncoderLayer(hidden, heads)
        self.query, self.key, self.value = (torch.nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x, additive_mask):
        layer, (batch, seq, hidden) = self.inner, x.shape
        split = lambda t: t.reshape(batch, seq, layer.heads, hidden // layer.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (hidden // layer.heads) ** 0.5 + additive_mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = layer.norm1(x + layer.out(context))
        return layer.norm2(x + layer.ff2(torch.nn.functional.gelu(layer.ff1(x))))


def encoder_feed():
    feed = {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64),
            "attention_mask": np.ones((2, 16), np.int64)}
    feed["attention_mask"][1, 11:] = 0
    return feed


def check_against_unoptimized(path: str) -> dict:
    feed = encoder_feed()
    engine = kiln.build(path)
    actual = engine.run(feed)["hidden"]
    expected = kiln.build(path, kiln.BuilderConfig(optimize=False)).run(feed)["hidden"]
    assert_close(actual, expected, rtol=1e-4, atol=1e-5, what="optimized vs unoptimized")
    return engine.plan.build_info["counters"]


def test_separate_query_key_value_projections_fuse_per_layer(tmp_path_factory):
    """Two layers, each with Q, K, V reading the layer's input: 3 Gemms merged per layer. The feed-forward Gemm reads
    LayerNorm's output alone and the output projection the attention context, so nothing else fuses."""
    counters = check_against_unoptimized(bert_path(tmp_path_factory, SeparateProjectionLayer, layers=2))
    assert counters["parallel_gemm_fused"] == 6 and counters["recognize_attention"] == 2
    assert counters["fuse_matmul_bias"] == 12, "Q, K, V, output projection and two feed-forward Gemms per layer"


def test_the_tests_models_encoder_already_has_one_qkv_projection(tmp_path_factory):
    """tests/models' encoder computes Q, K and V with one Linear(hidden, 3 * hidden) and splits it itself, so no two
    Gemms share an input there (the output projection reads the context, the first feed-forward Gemm LayerNorm's
    output): the pass has nothing to do and the counter stays at zero."""
    from models.test_bert_encoder import EncoderLayer

    counters = check_against_unoptimized(bert_path(tmp_path_factory, EncoderLayer, layers=2))
    assert counters.get("parallel_gemm_fused", 0) == 0 and counters["fuse_matmul_bias"] == 8


def test_a_graph_kept_below_opset_13_keeps_its_gemms():
    """kiln's Split takes its sizes as an input (opset 13 on); a model the version converter could not bring to the
    canonical opset stays at its own, and there the Gemms stay separate."""
    from kiln.frontend.onnx import parse
    from kiln.passes.context import PassContext

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"]), helper.make_node("MatMul", ["x", "w2"], ["y2"])]
    graph = parse(make_model(nodes, {"x": randn(3, 8)}, ["y1", "y2"], {"w1": randn(8, 4), "w2": randn(8, 4)}))
    ctx = PassContext()
    assert fuse_gemm.run(graph, ctx)
    graph.opsets[""] = 12
    assert not fuse_parallel_gemm.run(graph, ctx) and not ctx.counters["parallel_gemm_fused"]
