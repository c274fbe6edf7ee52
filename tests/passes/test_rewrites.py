"""Before/after tests of each rewrite pass: expected graph, counters, idempotence, numerics against onnxruntime."""
import numpy as np
import pytest
from helpers import assert_close, make_model, run_onnxruntime
from onnx import helper
from passes.rewrite_check import check_rewrite

from kiln.passes import (cse, fold_batchnorm, fuse_activation, fuse_conv, fuse_elementwise, fuse_gemm, noop_removal,
                         recognize_attention, recognize_gelu, recognize_layernorm)

rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def test_noop_removal_drops_identity_dropout_cast_reshape_and_transpose_pairs():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Dropout", ["a"], ["b"]),
             helper.make_node("Cast", ["b"], ["c"], to=1),
             helper.make_node("Reshape", ["c", "shape"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["e"], ["f"], perm=[0, 2, 1]),
             helper.make_node("Relu", ["f"], ["y"]),
             helper.make_node("Identity", ["y"], ["out"])]  # names a graph output: stays
    model = make_model(nodes, {"x": randn(2, 3, 4)}, ["out"], {"shape": np.array([2, 3, 4], np.int64)})
    graph = check_rewrite(model, [noop_removal.run], ["Relu", "Identity"],
                          {"remove_identity": 1, "remove_dropout": 1, "remove_cast_to_same_type": 1,
                           "remove_reshape_to_same_shape": 1, "fold_transpose_pair": 1, "remove_identity_transpose": 1},
                          {"x": randn(2, 3, 4)})
    assert graph.nodes[0].inputs == ("x",)


def test_noop_removal_drops_a_dropout_whose_mask_nobody_reads_and_keeps_one_whose_mask_is_read():
    nodes = [helper.make_node("Dropout", ["x"], ["a", "unread_mask"]),  # opset-9 conversions leave such masks
             helper.make_node("Dropout", ["a"], ["b", "mask"]),
             helper.make_node("Cast", ["mask"], ["m"], to=1),
             helper.make_node("Mul", ["b", "m"], ["y"])]
    model = make_model(nodes, {"x": randn(2, 3)}, ["y"])
    graph = check_rewrite(model, [noop_removal.run], ["Dropout", "Cast", "Mul"], {"remove_dropout": 1}, {"x": randn(2, 3)})
    assert graph.nodes[0].inputs == ("x",)


def test_noop_removal_composes_transposes_that_are_not_inverse():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["a"], ["y"], perm=[0, 1, 3, 2])]
    model = make_model(nodes, {"x": randn(2, 3, 4, 5)}, ["y"])
    graph = check_rewrite(model, [noop_removal.run], ["Transpose"], {"fold_transpose_pair": 1}, {"x": randn(2, 3, 4, 5)})
    assert graph.nodes[0].attrs["perm"] == [0, 2, 3, 1]


def test_cse_merges_identical_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Transpose", ["a"], ["c"], perm=[1, 0]), helper.make_node("Transpose", ["b"], ["d"], perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["e"], perm=[0, 1]),
             helper.make_node("Add", ["c", "d"], ["s"]), helper.make_node("Mul", ["s", "e"], ["y"])]
    model = make_model(nodes, {"x": randn(3, 3)}, ["y"])
    check_rewrite(model, [cse.run], ["Relu", "Transpose", "Transpose", "Add", "Mul"], {"merge_common_subexpression": 2},
                  {"x": randn(3, 3)})


def conv_bn_model(with_bias: bool):
    inits = {"w": randn(8, 4, 3, 3, scale=0.3), "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32), "shift": randn(8),
             "mean": randn(8), "var": rng.uniform(0.5, 1.5, 8).astype(np.float32)}
    conv_inputs = ["x", "w"] + (["b"] if with_bias else [])
    if with_bias:
        inits["b"] = randn(8)
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], epsilon=1e-3)]
    return make_model(nodes, {"x": randn(1, 4, 9, 9)}, ["y"], inits)


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_batchnorm_folds(with_bias):
    check_rewrite(conv_bn_model(with_bias), [fold_batchnorm.run], ["Conv"], {"fold_conv_batchnorm": 1}, {"x": randn(1, 4, 9, 9)})


def test_conv_per_channel_mul_and_add_fold():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["y"])]
    model = make_model(nodes, {"x": randn(1, 4, 6, 6)}, ["y"], {"w": randn(8, 4, 1, 1), "s": randn(8, 1, 1), "t": randn(1, 8, 1, 1)})
    check_rewrite(model, [fold_batchnorm.run], ["Conv"], {"fold_conv_scale": 1, "fold_conv_shift": 1}, {"x": randn(1, 4, 6, 6)})


def test_batchnorm_after_a_shared_conv_stays():
    model = conv_bn_model(True)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(helper.make_empty_tensor_value_info("r"))
    # the Conv is read twice, so the BatchNormalization cannot fold into it: it runs as a per-channel multiply-add
    check_rewrite(model, [fold_batchnorm.run], ["Conv", "Mul", "Add", "Relu"], {"batchnorm_as_scale_shift": 1},
                  {"x": randn(1, 4, 9, 9)})


def _concat_bn_relu_model():
    """DenseNet's pre-activation: BatchNormalization and Relu after a Concat, where no Conv can absorb them."""
    inits = {"scale": randn(8) + 2, "shift": randn(8), "mean": randn(8), "var": np.abs(randn(8)) + 0.5}
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"])]
    return make_model(nodes, {"a": randn(1, 3, 5, 5), "b": randn(1, 5, 5, 5)}, ["y"], inits)


def test_batchnorm_no_conv_absorbs_runs_as_scale_shift_and_joins_the_elementwise_chain():
    feed = {"a": randn(1, 3, 5, 5), "b": randn(1, 5, 5, 5)}
    graph = check_rewrite(_concat_bn_relu_model(), [fold_batchnorm.run], ["Concat", "Mul", "Add", "Relu"],
                          {"batchnorm_as_scale_shift": 1}, feed)
    scale = next(graph.initializers[n] for node in graph.nodes if node.op == "Mul" for n in node.inputs if n in graph.initializers)
    assert scale.shape == (8, 1, 1), "per channel, broadcasting over [N, C, H, W]"
    check_rewrite(_concat_bn_relu_model(), [fold_batchnorm.run, fuse_elementwise.run], ["Concat", "kiln::Elementwise"],
                  {"batchnorm_as_scale_shift": 1, "fuse_elementwise_chain": 1}, feed)


ACTIVATIONS = [
    ("Relu", {}, [], "relu"),
    ("LeakyRelu", {"alpha": 0.2}, [], "leaky_relu"),
    ("Clip", {}, ["lo", "hi"], "clip"),
    ("Sigmoid", {}, [], "sigmoid"),
    ("Tanh", {}, [], "tanh"),
    ("HardSwish", {}, [], "hardswish"),
]


@pytest.mark.parametrize("op, attrs, extra, kind", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_conv_residual_and_activation_fuse(op, attrs, extra, kind):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "x"], ["s"]),
             helper.make_node(op, ["s"] + extra, ["y"], **attrs)]
    inits = {"w": randn(4, 4, 3, 3, scale=0.3), "b": randn(4), "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}
    graph = check_rewrite(make_model(nodes, {"x": randn(1, 4, 8, 8)}, ["y"], inits),
                          [fuse_conv.run, fuse_activation.run], ["kiln::Conv"],
                          {"lower_conv": 1, "fuse_conv_residual": 1, f"fuse_activation_{kind}": 1}, {"x": randn(1, 4, 8, 8)})
    node = graph.nodes[0]
    assert node.inputs[3] == "x" and node.attrs["activation"] == kind
    assert len(node.origin) == 3, "the fused layer names the Conv, the Add and the activation it came from"


def test_conv_silu_and_same_padding_fuse():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Sigmoid", ["c"], ["g"]), helper.make_node("Mul", ["c", "g"], ["y"])]
    model = make_model(nodes, {"x": randn(1, 3, 9, 9)}, ["y"], {"w": randn(6, 3, 3, 3)})
    graph = check_rewrite(model, [fuse_conv.run, fuse_activation.run], ["kiln::Conv"],
                          {"lower_conv": 1, "fuse_activation_silu": 1}, {"x": randn(1, 3, 9, 9)})
    assert graph.nodes[0].attrs["pads"] == [1, 1, 1, 1]


def test_gemm_and_matmul_bias_lower_with_activation():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, alpha=0.5),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["b2", "m"], ["y"])]
    inits = {"w1": randn(16, 8), "b1": randn(16), "w2": randn(16, 4), "b2": randn(4)}
    graph = check_rewrite(make_model(nodes, {"x": randn(3, 8)}, ["y"], inits), [fuse_gemm.run, fuse_activation.run],
                          ["kiln::Gemm", "kiln::Gemm"], {"lower_gemm": 1, "fuse_matmul_bias": 1, "fuse_activation_relu": 1},
                          {"x": randn(3, 8)})
    assert graph.nodes[0].attrs["activation"] == "relu" and graph.nodes[1].attrs["activation"] == ""


def test_decomposed_gelu_is_recognised_and_fused_into_the_matmul():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["h", "p"], ["q"]),
             helper.make_node("Mul", ["q", "half"], ["y"])]
    inits = {"w": randn(8, 16), "b": randn(16), "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
             "half": np.array(0.5, np.float32)}
    graph = check_rewrite(make_model(nodes, {"x": randn(2, 5, 8)}, ["y"], inits),
                          [recognize_gelu.run, fuse_gemm.run, fuse_activation.run], ["kiln::Gemm"],
                          {"recognize_gelu": 1, "fuse_matmul_bias": 1, "fuse_activation_gelu": 1}, {"x": randn(2, 5, 8)})
    assert graph.nodes[0].attrs["activation"] == "gelu"


def test_decomposed_layernorm_is_recognised():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mu"]), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
             helper.make_node("Add", ["g", "beta"], ["y"])]
    inits = {"axes": np.array([-1], np.int64), "two": np.array(2, np.float32), "eps": np.array(1e-5, np.float32),
             "gamma": randn(16), "beta": randn(16)}
    graph = check_rewrite(make_model(nodes, {"x": randn(2, 3, 16)}, ["y"], inits), [recognize_layernorm.run],
                          ["LayerNormalization"], {"recognize_layernorm": 1}, {"x": randn(2, 3, 16)}, rtol=1e-4)
    assert graph.nodes[0].attrs["epsilon"] == pytest.approx(1e-5)


def attention_model(batch=2, seq=6, heads=2, dim=4):
    hidden = heads * dim
    shape = np.array([batch, seq, heads, dim], np.int64)
    nodes = [helper.make_node("Reshape", [name, "shape"], [f"{name}4"]) for name in ("q", "k", "v")] + [
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]), helper.make_node("Div", ["scores", "root"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["y"])]
    inputs = {name: randn(batch, seq, hidden) for name in ("q", "k", "v")}
    mask = np.zeros((batch, 1, 1, seq), np.float32)
    mask[1, ..., 4:] = -10000.0
    inputs["mask"] = mask
    return make_model(nodes, inputs, ["y"], {"shape": shape, "root": np.array(2.0, np.float32)}), inputs


def test_attention_is_recognised_and_its_key_transpose_merges():
    model, feed = attention_model()
    graph = check_rewrite(model, [recognize_attention.run, noop_removal.run],
                          ["Reshape", "Reshape", "Reshape", "Transpose", "Transpose", "Transpose", "kiln::Attention"],
                          {"recognize_attention": 1, "fold_transpose_pair": 1}, feed)
    attention = graph.nodes[-1]
    assert attention.attrs["scale"] == 0.5 and attention.inputs[3] == "mask"
    keys = next(n for n in graph.nodes if n.outputs[0] == attention.inputs[1])
    assert keys.attrs["perm"] == [0, 2, 1, 3], "K^T's transpose and the head transpose became one"


def score_mod_model(bias, batch=1, heads=2, seq=3, dim=4):
    """FlexAttention's score_mod: a constant added to the unscaled scores, the shape of ONNX's
    test_flexattention_score_mod (a 0-d bias)."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]), helper.make_node("Add", ["scores", "bias"], ["modded"]),
             helper.make_node("Softmax", ["modded"], ["p"], axis=3), helper.make_node("MatMul", ["p", "v"], ["y"])]
    feed = {name: randn(batch, heads, seq, dim) for name in ("q", "k", "v")}
    return make_model(nodes, dict(feed), ["y"], {"bias": bias}), feed


@pytest.mark.parametrize("bias", [np.array(0.5, np.float32), np.full(3, 0.5, np.float32)], ids=["0-d", "1-d"])
def test_attention_leaves_a_mask_below_rank_2_alone(bias):
    """kiln::Attention's tactics (torch SDPA) index the mask's last two axes: a 0-d or 1-d added operand stays
    an Add, and the engine runs (the fused layer used to fail with IndexError at run time)."""
    import kiln

    model, feed = score_mod_model(bias)
    check_rewrite(model, [recognize_attention.run], ["Transpose", "MatMul", "Add", "Softmax", "MatMul"], {}, feed)
    assert_close(kiln.build(model).run(feed)["y"], run_onnxruntime(model, feed)["y"], rtol=1e-5, atol=1e-6)


def test_attention_takes_a_rank_2_score_mod_bias():
    """The same pattern with a [S_q, S_k] bias is a mask the fused op expresses: it fuses."""
    model, feed = score_mod_model(np.full((3, 3), 0.5, np.float32))
    graph = check_rewrite(model, [recognize_attention.run], ["Transpose", "Transpose", "kiln::Attention"],
                          {"recognize_attention": 1}, feed)
    assert graph.nodes[-1].inputs[3] == "bias" and graph.nodes[-1].attrs["scale"] == 1.0


def test_attention_leaves_a_mask_that_enlarges_the_scores_alone():
    """A mask with a larger batch than Q, K and V makes Add's output larger than the scores; the fused op's output
    would follow Q and V, so the pattern stays."""
    model, feed = score_mod_model(np.zeros((2, 1, 3, 3), np.float32))
    check_rewrite(model, [recognize_attention.run], ["Transpose", "MatMul", "Add", "Softmax", "MatMul"], {}, feed)


def test_elementwise_chain_fuses_into_one_op():
    from kiln.passes import fuse_elementwise

    nodes = [helper.make_node("Sub", ["one", "x"], ["a"]), helper.make_node("Mul", ["a", "big"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Div", ["z", "c"], ["d"]),
             helper.make_node("Tanh", ["d"], ["y"]),
             helper.make_node("Mul", ["y", "y"], ["out"])]  # reads y twice: the chain stops before it
    inits = {"one": np.array(1.0, np.float32), "big": np.array(-3.0, np.float32)}
    feed = {"x": randn(2, 1, 4), "z": randn(2, 3, 4)}
    graph = check_rewrite(make_model(nodes, dict(feed), ["out"], inits), [fuse_elementwise.run],
                          ["kiln::Elementwise", "Mul"], {"fuse_elementwise_chain": 1}, feed)
    fused = graph.nodes[0]
    assert fused.attrs["ops"] == ["Sub", "Mul", "Relu", "Div", "Tanh"]
    assert fused.attrs["operands"] == [1, 2, 0, -3, 0] and fused.inputs == ("one", "x", "big", "z")


def test_affine_runs_in_a_chain_fold_into_one_multiply_add():
    from kiln.passes import fuse_elementwise

    c = lambda *shape: rng.uniform(0.5, 1.5, shape).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"]), helper.make_node("Div", ["a", "std"], ["b"]),
             helper.make_node("Mul", ["b", "gamma"], ["d"]), helper.make_node("Add", ["d", "beta"], ["e"]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("Sub", ["one", "f"], ["g"]), helper.make_node("Mul", ["g", "half"], ["y"])]
    inits = {"mean": c(3, 1, 1), "std": c(3, 1, 1), "gamma": c(3, 1, 1), "beta": c(1, 3, 1, 1),
             "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    feed = {"x": randn(2, 3, 4, 4)}
    graph = check_rewrite(make_model(nodes, dict(feed), ["y"], inits), [fuse_elementwise.run], ["kiln::Elementwise"],
                          {"fuse_elementwise_chain": 1, "fold_affine_run": 2}, feed)
    fused = graph.nodes[0]
    assert fused.attrs["ops"] == ["Mul", "Add", "Relu", "Mul", "Add"], "(x-m)/s*g+b and (1-f)*0.5 as x*s+t each"
    assert graph.initializers[fused.inputs[2]].shape == (1, 3, 1, 1)  # the constants' broadcast shape


def test_a_multiply_add_pair_and_runs_by_non_constants_stay_as_they_are():
    from kiln.passes import fuse_elementwise

    nodes = [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Add", ["a", "t"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Mul", ["c", "z"], ["d"]),
             helper.make_node("Add", ["d", "t"], ["y"])]
    feed = {"x": randn(2, 3), "z": randn(2, 3)}
    graph = check_rewrite(make_model(nodes, dict(feed), ["y"], {"s": randn(3), "t": randn(3)}), [fuse_elementwise.run],
                          ["kiln::Elementwise"], {"fuse_elementwise_chain": 1}, feed)
    assert graph.nodes[0].attrs["ops"] == ["Mul", "Add", "Relu", "Mul", "Add"]


def test_gemm_takes_the_residual_add_then_the_activation():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Add", ["x", "h"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = check_rewrite(make_model(nodes, {"x": randn(2, 5, 8)}, ["y"], {"w": randn(8, 8), "b": randn(8)}),
                          [fuse_gemm.run, fuse_activation.run], ["kiln::Gemm"],
                          {"fuse_matmul_bias": 1, "fuse_gemm_residual": 1, "fuse_activation_relu": 1}, {"x": randn(2, 5, 8)})
    assert graph.nodes[0].inputs[3] == "x"
