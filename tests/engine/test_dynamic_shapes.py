"""Dynamic shapes end to end: symbolic dimensions survive parsing and optimization (shape arithmetic included), and
an engine built with optimization profiles gives onnxruntime's results for every shape inside them (a CNN over
batch 1..max, a BERT-style encoder over batch and sequence length), and KILN-E406 outside."""
import numpy as np
import onnx
import pytest
from helpers import assert_close, make_model, run_onnxruntime
from onnx import TensorProto, helper

import kiln
from kiln.cli import main

MAX_BATCH = 6
HIDDEN, HEADS, VOCAB, MAX_SEQ = 32, 2, 50, 12


def cnn_model(batch="N") -> onnx.ModelProto:
    """Conv-BN-ReLU, pooling, and a flatten by shape arithmetic (Shape, Gather, Unsqueeze, Concat, Reshape with -1)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "b1": rng.standard_normal(8).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32), "shift": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32) * 0.1, "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "w2": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "fc": rng.standard_normal((16 * 4 * 4, 10)).astype(np.float32) * 0.1,
        "zero": np.array(0, np.int64), "axis0": np.array([0], np.int64), "minus1": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Shape", ["r2"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["r2", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    return make_model(nodes, {"image": (np.float32, [batch, 3, 8, 8])}, ["logits"], weights)


def encoder_model() -> onnx.ModelProto:
    """One BERT layer over input_ids and attention_mask [batch, seq]: embeddings with positions from Range over the
    sequence length, attention heads split and merged by Reshape with 0 and -1, erf GELU, LayerNorms."""
    rng = np.random.default_rng(1)

    def weight(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head = HIDDEN // HEADS
    w = {"word": weight(VOCAB, HIDDEN, scale=1.0), "position": weight(MAX_SEQ, HIDDEN, scale=1.0),
         "ln_s": 1 + weight(HIDDEN, scale=0.1), "ln_b": weight(HIDDEN, scale=0.1),
         "wq": weight(HIDDEN, HIDDEN), "bq": weight(HIDDEN), "wk": weight(HIDDEN, HIDDEN), "bk": weight(HIDDEN),
         "wv": weight(HIDDEN, HIDDEN), "bv": weight(HIDDEN), "wo": weight(HIDDEN, HIDDEN), "bo": weight(HIDDEN),
         "ln1_s": 1 + weight(HIDDEN, scale=0.1), "ln1_b": weight(HIDDEN, scale=0.1),
         "w1": weight(HIDDEN, 2 * HIDDEN), "b1": weight(2 * HIDDEN), "w2": weight(2 * HIDDEN, HIDDEN), "b2": weight(HIDDEN),
         "ln2_s": 1 + weight(HIDDEN, scale=0.1), "ln2_b": weight(HIDDEN, scale=0.1),
         "one_i": np.array(1, np.int64), "zero_i": np.array(0, np.int64), "heads_shape": np.array([0, 0, HEADS, head], np.int64),
         "merge_shape": np.array([0, 0, -1], np.int64), "mask_axes": np.array([1, 2], np.int64),
         "sqrt_head": np.array(np.sqrt(head), np.float32), "one": np.array(1, np.float32), "big": np.array(-10000, np.float32),
         "half": np.array(0.5, np.float32), "sqrt2": np.array(np.sqrt(2), np.float32)}
    mk = helper.make_node
    nodes = [
        mk("Gather", ["word", "input_ids"], ["tokens"]),
        mk("Shape", ["input_ids"], ["ids_shape"]), mk("Gather", ["ids_shape", "one_i"], ["seq_len"], axis=0),
        mk("Range", ["zero_i", "seq_len", "one_i"], ["positions"]), mk("Gather", ["position", "positions"], ["pos"]),
        mk("Add", ["tokens", "pos"], ["embedded"]),
        mk("LayerNormalization", ["embedded", "ln_s", "ln_b"], ["h0"], axis=-1, epsilon=1e-12),
    ]
    for name in "qkv":
        nodes += [mk("MatMul", ["h0", f"w{name}"], [f"{name}_mm"]), mk("Add", [f"{name}_mm", f"b{name}"], [name]),
                  mk("Reshape", [name, "heads_shape"], [f"{name}_heads"])]
    nodes += [
        mk("Transpose", ["q_heads"], ["qt"], perm=[0, 2, 1, 3]), mk("Transpose", ["k_heads"], ["kt"], perm=[0, 2, 3, 1]),
        mk("Transpose", ["v_heads"], ["vt"], perm=[0, 2, 1, 3]),
        mk("MatMul", ["qt", "kt"], ["scores_raw"]), mk("Div", ["scores_raw", "sqrt_head"], ["scores_scaled"]),
        mk("Unsqueeze", ["attention_mask", "mask_axes"], ["mask4"]), mk("Cast", ["mask4"], ["maskf"], to=TensorProto.FLOAT),
        mk("Sub", ["one", "maskf"], ["masked"]), mk("Mul", ["masked", "big"], ["mask_bias"]),
        mk("Add", ["scores_scaled", "mask_bias"], ["scores"]), mk("Softmax", ["scores"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "vt"], ["context_heads"]), mk("Transpose", ["context_heads"], ["context_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["context_t", "merge_shape"], ["context"]),
        mk("MatMul", ["context", "wo"], ["attn_mm"]), mk("Add", ["attn_mm", "bo"], ["attn"]), mk("Add", ["attn", "h0"], ["res1"]),
        mk("LayerNormalization", ["res1", "ln1_s", "ln1_b"], ["h1"], axis=-1, epsilon=1e-12),
        mk("MatMul", ["h1", "w1"], ["ff_mm"]), mk("Add", ["ff_mm", "b1"], ["ff"]),
        mk("Div", ["ff", "sqrt2"], ["ff_scaled"]), mk("Erf", ["ff_scaled"], ["ff_erf"]), mk("Add", ["ff_erf", "one"], ["ff_erf1"]),
        mk("Mul", ["ff", "ff_erf1"], ["ff_g"]), mk("Mul", ["ff_g", "half"], ["gelu"]),
        mk("MatMul", ["gelu", "w2"], ["ff2_mm"]), mk("Add", ["ff2_mm", "b2"], ["ff2"]), mk("Add", ["ff2", "h1"], ["res2"]),
        mk("LayerNormalization", ["res2", "ln2_s", "ln2_b"], ["hidden"], axis=-1, epsilon=1e-12),
    ]
    inputs = {"input_ids": (np.int64, ["batch", "seq"]), "attention_mask": (np.int64, ["batch", "seq"])}
    return make_model(nodes, inputs, ["hidden"], w)


@pytest.fixture(scope="module")
def cnn():
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (4, 3, 8, 8), (MAX_BATCH, 3, 8, 8))})
    return cnn_model(), kiln.build(cnn_model(), config)


def test_cnn_matches_onnxruntime_at_every_batch_of_the_profile(cnn):
    model, engine = cnn
    rng = np.random.default_rng(2)
    for batch in range(1, MAX_BATCH + 1):
        image = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        got = engine.run({"image": image})["logits"]
        assert got.shape == (batch, 10)
        assert_close(got, run_onnxruntime(model, {"image": image})["logits"], rtol=1e-4, atol=1e-4, what=f"batch {batch}")
        assert engine.active_profile == 0


def test_shape_arithmetic_stays_symbolic_through_optimization(cnn):
    _, engine = cnn
    graph = engine.plan.graph
    ops = [node.op for node in graph.nodes]
    assert "Shape" in ops and "Reshape" in ops, ops  # nothing folded the batch into a constant
    assert engine.inputs[0].shape == ("N", 3, 8, 8) and engine.outputs[0].shape[0] == "N"
    assert any(node.op == "Conv" and node.domain == "kiln" for node in graph.nodes)  # the passes still ran
    assert engine.plan.profiles == [{"image": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [MAX_BATCH, 3, 8, 8]}}]


def test_shape_outside_the_profile_is_refused_naming_input_shape_and_range(cnn):
    _, engine = cnn
    with pytest.raises(kiln.BindingError) as error:
        engine.run({"image": np.zeros((MAX_BATCH + 1, 3, 8, 8), np.float32)})
    text = str(error.value)
    assert error.value.code == "KILN-E406" and "'image'" in text and f"[{MAX_BATCH + 1}, 3, 8, 8]" in text
    assert f"[1..{MAX_BATCH}]x3x8x8" in text


def test_unnamed_dimensions_get_stable_names_a_profile_can_use():
    model = cnn_model(batch=None)
    with pytest.raises(kiln.BuildError) as error:
        kiln.build(model)
    assert error.value.code == "KILN-E202" and "image[0] ('image_dim0')" in str(error.value)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == ""  # the caller's model is untouched
    config = kiln.BuilderConfig()
    config.add_profile().set_shape("image", (1, 3, 8, 8), (2, 3, 8, 8), (3, 3, 8, 8))
    engine = kiln.build(model, config)
    assert engine.inputs[0].shape == ("image_dim0", 3, 8, 8) and engine.outputs[0].shape[0] == "image_dim0"


def test_several_profiles_pick_the_one_that_fits_or_the_one_chosen(tmp_path):
    model = cnn_model()
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8))})
    config.add_profile({"image": ((2, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))})
    engine = kiln.build(model, config)
    engine.save(tmp_path / "cnn.kiln")
    loaded = kiln.load(tmp_path / "cnn.kiln")  # profiles travel in the engine file
    image = np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32)
    expected = run_onnxruntime(model, {"image": image})["logits"]
    assert_close(loaded.run({"image": image})["logits"], expected, rtol=1e-4, atol=1e-4)
    assert loaded.active_profile == 1
    context = loaded.create_execution_context(profile=1)
    assert_close(context.run({"image": image[:2]})["logits"], expected[:2], rtol=1e-4, atol=1e-4)
    assert loaded.active_profile == 1
    with pytest.raises(kiln.BindingError, match="outside profile 0"):
        loaded.create_execution_context(profile=0).run({"image": image})
    with pytest.raises(kiln.BindingError, match="does not exist"):
        loaded.create_execution_context(profile=2)


def test_encoder_matches_onnxruntime_over_batch_and_sequence_length():
    model = encoder_model()
    config = kiln.BuilderConfig()
    config.add_profile().set_shape("input_ids", (1, 1), (2, 8), (3, MAX_SEQ))  # the mask shares batch and seq
    engine = kiln.build(model, config)
    assert engine.plan.profiles[0]["attention_mask"] == {"min": [1, 1], "opt": [2, 8], "max": [3, MAX_SEQ]}
    rng = np.random.default_rng(4)
    for batch in range(1, 4):
        for seq in (1, 2, 5, MAX_SEQ):
            ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
            mask = (rng.random((batch, seq)) > 0.3).astype(np.int64)
            mask[:, 0] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            got = engine.run(feed)["hidden"]
            assert got.shape == (batch, seq, HIDDEN)
            assert_close(got, run_onnxruntime(model, feed)["hidden"], rtol=1e-4, atol=1e-4, what=f"batch {batch}, seq {seq}")
    with pytest.raises(kiln.BindingError) as error:
        engine.run({"input_ids": np.zeros((1, MAX_SEQ + 1), np.int64), "attention_mask": np.ones((1, MAX_SEQ + 1), np.int64)})
    assert error.value.code == "KILN-E406" and "'input_ids'" in str(error.value)
    with pytest.raises(kiln.BindingError) as error:  # the model says both inputs share seq: checked before any profile
        engine.run({"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 5), np.int64)})
    assert error.value.code == "KILN-E405"


def test_cli_build_takes_trtexec_shape_flags_and_explains_a_missing_profile(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), path)
    command = ["build", str(path), "--saveEngine", str(tmp_path / "cnn.kiln")]
    assert main(command) == 1
    assert "KILN-E202" in capsys.readouterr().err
    flags = ["--minShapes", "image:1x3x8x8", "--optShapes", "image:2x3x8x8", "--maxShapes", "image:5x3x8x8"]
    assert main(command + flags) == 0
    assert "profile 0: image: [1..5]x3x8x8 (opt 2x3x8x8)" in capsys.readouterr().out
    assert kiln.load(tmp_path / "cnn.kiln").profiles[0].shape("image", "max") == (5, 3, 8, 8)


def test_memory_is_planned_for_the_largest_shapes_of_all_profiles(cnn):
    _, engine = cnn
    memory = engine.plan.memory
    assert memory["planned_at"] == {"N": MAX_BATCH} and "N" not in memory["assumed"]
    first_conv = next(b for b in memory["buffers"] if b["value"] == engine.plan.graph.nodes[0].outputs[0])
    assert first_conv["bytes"] == MAX_BATCH * 8 * 8 * 8 * 4  # [N, 8, 8, 8] float32 at N = max


def test_sizes_left_in_value_info_by_making_a_batch_dynamic_are_not_baked_in():
    # the usual way to make a batch dynamic edits the input only: value_info still says batch 2 everywhere
    stale = onnx.shape_inference.infer_shapes(cnn_model(batch=2))
    stale.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))})
    engine = kiln.build(stale, config)
    assert "Shape" in [node.op for node in engine.plan.graph.nodes]
    assert stale.graph.value_info[0].type.tensor_type.shape.dim[0].dim_value == 2  # the caller's model is untouched
    image = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    expected = run_onnxruntime(cnn_model(), {"image": image})["logits"]  # onnxruntime trusts the stale sizes: the clean model
    assert_close(engine.run({"image": image})["logits"], expected, rtol=1e-4, atol=1e-4)


def test_residual_fusion_fires_with_a_symbolic_batch():
    rng = np.random.default_rng(6)
    weights = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3, "b": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "image"], ["sum"]), helper.make_node("Relu", ["sum"], ["out"])]
    model = make_model(nodes, {"image": (np.float32, ["N", 3, 8, 8])}, ["out"], weights)
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (2, 3, 8, 8), (3, 3, 8, 8))})
    engine = kiln.build(model, config)
    assert engine.plan.build_info["counters"].get("fuse_conv_residual") == 1 and len(engine.plan.graph.nodes) == 1
    for batch in (1, 3):
        image = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        assert_close(engine.run({"image": image})["out"], run_onnxruntime(model, {"image": image})["out"], rtol=1e-4, atol=1e-4)


def test_cpu_tactics_are_chosen_for_each_profiles_opt_sizes(monkeypatch):
    # oneDNN packs convolution and linear weights for one input shape: each profile's opt, as TensorRT tunes each
    # profile at its opt. The build lowers the first profile; a run in another lowers that one's program on first use,
    # sharing the weights no tactic packs.
    import kiln.backends.cpu.fast as fast

    seen = []
    choose = fast.choose
    monkeypatch.setattr(fast, "choose", lambda node, graph, bf16, sizes=None, **options: seen.append((node.op, sizes)) or
                        choose(node, graph, bf16, sizes, **options))
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (3, 3, 8, 8), (4, 3, 8, 8))})
    config.add_profile({"image": ((5, 3, 8, 8), (6, 3, 8, 8), (8, 3, 8, 8))})
    model = cnn_model()
    engine = kiln.build(model, config)
    # the build lowers profile 0 once, or twice where it times native against oneDNN convolutions (select.py)
    built = [sizes for op, sizes in seen if op == "Conv"]
    assert built in ([{"N": 3}] * 2, [{"N": 3}] * 4), seen
    assert sum(layer["tactic"] != "torch" for layer in engine.plan.layers.values() if layer["op"] == "kiln::Conv") == 2
    rng = np.random.default_rng(4)
    for batch, profile in ((6, 1), (2, 0), (8, 1)):
        image = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        assert_close(engine.run({"image": image})["logits"], run_onnxruntime(model, {"image": image})["logits"],
                     rtol=1e-4, atol=1e-4)
        assert engine.active_profile == profile
    assert [sizes for op, sizes in seen if op == "Conv"] == built + [{"N": 6}] * 2, "profile 1 lowered once, as the build chose"
    first, second = engine.program_for_profile(0), engine.program_for_profile(1)
    assert first is not second and first.constants is second.constants


def test_symbols_survive_range_and_flatten_so_memory_is_planned_at_the_max():
    """Range(0, Shape(ids)[1]) keeps the name `seq` and a Reshape(-1) flatten its static size (ONNX's own shape
    inference names both unk__N), so bindings read as the profile defines them and memory is planned at its max."""
    config = kiln.BuilderConfig()
    config.add_profile().set_shape("input_ids", (1, 1), (2, 8), (3, MAX_SEQ))
    encoder = kiln.build(encoder_model(), config)
    assert encoder.outputs[0].shape == ("batch", "seq", HIDDEN)
    assert encoder.plan.memory["planned_at"] == {"batch": 3, "seq": MAX_SEQ} and not encoder.plan.memory["assumed"]
    config = kiln.BuilderConfig()
    config.add_profile({"image": ((1, 3, 8, 8), (4, 3, 8, 8), (MAX_BATCH, 3, 8, 8))})
    cnn = kiln.build(cnn_model(), config)
    assert not cnn.plan.memory["assumed"]


def test_shape_inference_a_custom_operator_stops_writes_no_file_and_falls_back(tmp_path, monkeypatch):
    """onnxruntime's symbolic inference cannot type a custom operator; its own entry point then saves
    sym_shape_infer_temp.onnx into the working directory. kiln writes nothing there and uses ONNX's inference."""
    from onnx import TensorProto, helper

    monkeypatch.chdir(tmp_path)

    @kiln.plugin("Softsign2", domain="com.example.tests", version="1.0",
                 infer=lambda inputs, attrs: [(inputs[0].dtype, inputs[0].shape)])
    def softsign2(x):
        return x / (1 + x.abs())

    nodes = [helper.make_node("Softsign2", ["x"], ["s"], domain="com.example.tests"), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example.tests", 1)])
    config = kiln.BuilderConfig()
    config.add_profile({"x": ((1, 4), (2, 4), (3, 4))})
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    try:
        engine = kiln.build(model, config)
    finally:
        from kiln.plugins import unregister_plugin

        unregister_plugin("Softsign2", "com.example.tests")
    np.testing.assert_allclose(engine.run({"x": x})["y"], np.maximum(x / (1 + np.abs(x)), 0), rtol=1e-6)
    assert list(tmp_path.iterdir()) == []
