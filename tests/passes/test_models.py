"""The whole pipeline on real networks: fusion counters (so a fusion that stops firing fails), the optimized
engine against the unoptimized one in fp32, and the memory plan against its lower bound."""
import numpy as np
import pytest
from helpers import LIGHT_MODELS, assert_close, randomized_light_model, run_onnxruntime

import kiln
from kiln.backends.cpu.fast import bf16_supported

# What the pipeline rewrites in each light model, besides folding and dead code.
EXPECTED_COUNTERS = {
    "bvlc_alexnet": {"remove_dropout": 2, "fuse_activation_relu": 7, "lower_conv": 5, "lower_gemm": 3},
    "densenet121": {"fold_conv_batchnorm": 59, "fold_conv_scale": 59, "fold_conv_shift": 59, "fuse_activation_relu": 59,
                    "batchnorm_as_scale_shift": 62, "fuse_elementwise_chain": 62,  # pre-activation BN + Relu: one chain each
                    "fold_affine_run": 62,  # the BN and the model's own Mul/Add after it: one x * s + t
                    "lower_conv": 121},
    "inception_v1": {"remove_dropout": 1, "fuse_activation_relu": 57, "lower_conv": 57, "lower_gemm": 1},
    "inception_v2": {"fold_conv_batchnorm": 69, "fold_conv_scale": 69, "fold_conv_shift": 69, "fuse_activation_relu": 69,
                     "lower_conv": 69, "lower_gemm": 1},
    "resnet50": {"fold_conv_batchnorm": 53, "fuse_activation_relu": 49, "fuse_conv_residual": 16, "lower_conv": 53, "lower_gemm": 1},
    "shufflenet": {"fold_conv_batchnorm": 49, "fuse_activation_relu": 30, "fuse_conv_residual": 13, "lower_conv": 49, "lower_gemm": 1},
    "squeezenet": {"remove_dropout": 1, "fuse_activation_relu": 26, "lower_conv": 26},
    "vgg19": {"remove_dropout": 2, "fuse_activation_relu": 18, "lower_conv": 16, "lower_gemm": 3},
    "zfnet512": {"fuse_activation_relu": 7, "lower_conv": 5, "lower_gemm": 3},
}


def rewrites(engine) -> dict:
    counters = engine.plan.build_info["counters"]
    return {k: v for k, v in counters.items() if v and not k.startswith(("fold_constant", "fold_shape", "remove_dead"))}


def run_program(graph, feed):
    """The graph lowered as a CPU engine lowers it (fast tactics included) and run."""
    from types import SimpleNamespace

    import torch

    from kiln.backends.cpu.fast import lower

    with torch.inference_mode():
        outputs = lower(SimpleNamespace(graph=graph, config={"bf16": False})).execute({k: torch.from_numpy(v) for k, v in feed.items()})
    return [v.numpy() for v in outputs.values()]


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_optimized_equals_unoptimized(name):
    """One parse per model (the big ones spend most of their time in ONNX shape inference): the folded graph
    as BuilderConfig(optimize=False) leaves it, then the same graph through the whole pipeline."""
    from kiln.engine.memory import plan_memory
    from kiln.frontend import parse_any
    from kiln.passes.pipeline import optimize

    model = randomized_light_model(name, seed=2)
    x = {model.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    unoptimized = parse_any(model, kiln.BuilderConfig())
    optimize(unoptimized, config=kiln.BuilderConfig(optimize=False))
    optimized = unoptimized.copy()
    ctx = optimize(optimized)
    assert {k: v for k, v in ctx.counters.items() if v and not k.startswith(("fold_constant", "fold_shape", "remove_dead"))} == EXPECTED_COUNTERS[name]
    (expected,) = run_program(unoptimized, x)
    (actual,) = run_program(optimized, x)
    # fp32 reassociation only (BN folded in float64, oneDNN's summation order): 1e-4 of the output's range
    assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()), what=name)
    memory = plan_memory(optimized)
    assert memory["lower_bound_bytes"] <= memory["peak_bytes"] <= 1.1 * memory["lower_bound_bytes"]
    assert memory["peak_bytes"] < memory["naive_bytes"] and not memory["unplanned"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    import torch
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert(hidden=64, heads=4, layers=2).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamo=True, verbose=False)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    feed["attention_mask"][1, 11:] = 0
    return str(path), feed


def test_encoder_optimized_equals_unoptimized_and_onnxruntime(encoder):
    path, feed = encoder
    optimized = kiln.build(path)
    assert rewrites(optimized) == {"recognize_attention": 2, "fold_transpose_pair": 2, "fuse_matmul_bias": 8,
                                   "fuse_activation_gelu": 2, "fuse_elementwise_chain": 1,
                                   "fuse_gemm_residual": 4}
    ops = [n.op_key for n in optimized.plan.graph.nodes]
    assert ops.count("kiln::Attention") == 2 and ops.count("kiln::Gemm") == 8 and "Softmax" not in ops
    actual = optimized.run(feed)["hidden"]
    unoptimized = kiln.build(path, kiln.BuilderConfig(optimize=False)).run(feed)["hidden"]
    assert_close(actual, unoptimized, rtol=1e-4, atol=1e-5, what="optimized vs unoptimized")
    assert_close(actual, run_onnxruntime(path, feed)["hidden"], rtol=1e-4, atol=1e-5, what="against onnxruntime")
    memory = optimized.plan.memory
    assert memory["peak_bytes"] <= 1.1 * memory["lower_bound_bytes"]


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no AVX512-BF16/AMX, so kiln builds no bf16 CPU engine")
def test_encoder_bf16_is_within_one_percent(encoder):
    path, feed = encoder
    engine = kiln.build(path, kiln.BuilderConfig(bf16=True))
    expected = run_onnxruntime(path, feed)["hidden"]
    actual = engine.run(feed)["hidden"]
    assert actual.dtype == np.float32, "outputs keep the model's dtype"
    error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert error < 1e-2
    precisions = {layer["op"]: layer["precision"] for layer in engine.plan.layers.values()}
    assert precisions["kiln::Gemm"] == "bf16" and precisions["kiln::Attention"] == "bf16"
