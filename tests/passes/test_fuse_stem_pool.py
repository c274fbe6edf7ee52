"""fuse_stem_pool: a stem convolution and its max pool as one kiln::Conv in CPU bf16 builds; what does not fuse; the
fused kernel against the two kernels it replaces, and bf16 engines against onnxruntime."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_model, run_onnxruntime
from onnx import helper
from passes.rewrite_check import check_rewrite

import kiln
from kiln.backends.cpu import native
from kiln.backends.cpu.fast import bf16_supported
from kiln.passes import fuse_activation, fuse_conv, fuse_stem_pool
from kiln.passes.context import PassContext

rng = np.random.default_rng(0)
BF16_CPU = kiln.BuilderConfig(bf16=True) if bf16_supported() else None


def stem_model(in_channels=3, pool=None, readers=1, size=19):
    """Conv (3x3 / 2) -> Relu -> MaxPool, and optionally a second reader of the Relu."""
    pool = {"kernel_shape": [3, 3], "strides": [2, 2], **(pool or {})}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="stem", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", **pool)]
    outputs = ["y"]
    if readers > 1:
        nodes.append(helper.make_node("Neg", ["r"], ["z"], name="other"))
        outputs.append("z")
    inits = {"w": (rng.standard_normal((8, in_channels, 3, 3)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(8).astype(np.float32)}
    x = rng.standard_normal((2, in_channels, size, size)).astype(np.float32)
    return make_model(nodes, {"x": x}, outputs, inits), {"x": x}


class Fusing(PassContext):
    """A pass context of a CPU bf16 build, whatever this CPU runs (the pass only reads the config)."""

    def __init__(self):
        super().__init__(config=kiln.BuilderConfig.__new__(kiln.BuilderConfig))
        self.config.device, self.config.bf16, self.config.int8 = "cpu", True, False


def run_with_fusing_config(graph, ctx):
    return fuse_stem_pool.run(graph, Fusing() if ctx.config is None else ctx)


def test_a_stem_and_its_pool_become_one_conv():
    model, feed = stem_model()
    graph = check_rewrite(model, [fuse_conv.run, fuse_activation.run, run_with_fusing_config], ["kiln::Conv"],
                          {"lower_conv": 1, "fuse_activation_relu": 1}, feed)
    # check_rewrite's own context has no config: the counter is in the pass's
    (conv,) = graph.nodes
    assert conv.outputs == ("y",) and conv.origin == ("stem", "relu", "pool")
    assert conv.attrs["activation"] == "relu"
    assert (conv.attrs["pool_kernel_shape"], conv.attrs["pool_strides"], conv.attrs["pool_pads"],
            conv.attrs["pool_ceil_mode"]) == ([3, 3], [2, 2], [0, 0, 0, 0], 0)


def fused_graph(model, ctx=None):
    """`model` parsed, folded and through fuse_conv, fuse_activation and fuse_stem_pool (a CPU bf16 build's context by
    default), and that context."""
    from kiln.frontend.onnx import parse
    from kiln.passes import constant_folding

    graph = parse(model)
    constant_folding.run(graph, PassContext())
    fuse_conv.run(graph, PassContext())
    fuse_activation.run(graph, PassContext())
    ctx = ctx or Fusing()
    changed = fuse_stem_pool.run(graph, ctx)
    assert changed == bool(ctx.counters["fuse_stem_pool"])
    return graph, ctx


def fused_ops(model, ctx=None):
    graph, ctx = fused_graph(model, ctx)
    return [n.op_key for n in graph.nodes], ctx.counters["fuse_stem_pool"]


def test_the_counter_counts_and_a_second_run_changes_nothing():
    model, _ = stem_model()
    graph, ctx = fused_graph(model)
    assert [n.op_key for n in graph.nodes] == ["kiln::Conv"] and ctx.counters["fuse_stem_pool"] == 1
    again = Fusing()
    assert not fuse_stem_pool.run(graph, again) and not again.counters["fuse_stem_pool"]


@pytest.mark.parametrize("why, model", [
    ("the relu is read twice", stem_model(readers=2)[0]),
    ("16 input channels are no image's", stem_model(in_channels=16)[0]),
    ("asymmetric pool padding", stem_model(pool={"pads": [0, 0, 1, 1]})[0]),
    ("a dilated pool", stem_model(pool={"dilations": [2, 2]})[0]),
    ("a pool that is not square", stem_model(pool={"kernel_shape": [3, 2]})[0]),
])
def test_what_does_not_fuse(why, model):
    ops, count = fused_ops(model)
    assert count == 0 and "MaxPool" in ops, why


@pytest.mark.parametrize("device, bf16, int8", [("cpu", False, False), ("cuda", True, False), ("cpu", True, True)])
def test_only_cpu_bf16_builds_fuse(device, bf16, int8):
    model, _ = stem_model()
    ctx = Fusing()
    ctx.config.device, ctx.config.bf16, ctx.config.int8 = device, bf16, int8
    assert fused_ops(model, ctx) == (["kiln::Conv", "MaxPool"], 0)


def test_the_reference_kernel_pools_as_onnx_does():
    """The fused node's reference kernel (kiln/ops/fused.py), ceil mode included, against onnxruntime."""
    from passes.rewrite_check import run_graph

    for pool in ({}, {"ceil_mode": 1, "pads": [1, 1, 1, 1]}, {"kernel_shape": [2, 2]}):
        model, feed = stem_model(pool=pool, size=20)
        graph, ctx = fused_graph(model)
        assert ctx.counters["fuse_stem_pool"] == 1
        np.testing.assert_allclose(run_graph(graph, feed)["y"], run_onnxruntime(model, feed)["y"], rtol=1e-5, atol=1e-5)


# (out channels, kernel, stride, pad, batch, size, pool kernel, stride, pad, ceil mode): SqueezeNet's and ResNet's
# stems and pools (cut small), a partial channel block and ceil mode, more than four channel blocks
POOLED = [(64, 3, 2, 0, 2, 63, 3, 2, 0, 0), (64, 7, 2, 3, 1, 60, 3, 2, 1, 0), (40, 5, 1, 2, 2, 31, 3, 2, 1, 1),
          (80, 3, 2, 1, 1, 17, 2, 2, 0, 1)]


@pytest.mark.skipif(not native.bf16_available(), reason="no native bf16 kernels (no AVX512-BF16)")
@pytest.mark.parametrize("case", POOLED, ids=[f"oc{c[0]}-k{c[1]}s{c[2]}-b{c[4]}-{c[5]}-pool{c[6]}s{c[7]}p{c[8]}c{c[9]}"
                                              for c in POOLED])
def test_the_pooled_stem_equals_its_convolution_then_its_pool(case):
    """Pooling bf16 values commutes with their rounding, so the fused kernel matches the two kernels exactly; an
    infinity and NaNs in the image come out where the two put them."""
    oc, k, stride, pad, batch, size, pool_k, pool_s, pool_p, ceil = case
    generator = torch.Generator().manual_seed(oc + k)
    x = torch.randn(batch, 3, size, size, generator=generator)
    x[0, 1, 4, 5], x[-1, 0, size // 2, 3], x[-1, 2, 1, 1] = math.inf, math.nan, -math.inf
    w = torch.randn(oc, 3, k, k, generator=generator).numpy() * 0.3
    b = torch.randn(oc, generator=generator).numpy()
    for clamp in ((0.0, math.inf), (-0.5, 0.5), (-math.inf, math.inf)):
        args = (w, b, [stride] * 2, [pad] * 2, [1, 1], clamp, torch.bfloat16)
        separate = F.max_pool2d(native.StemConvolution(*args)(x).float(), pool_k, pool_s, pool_p, ceil_mode=bool(ceil))
        fused = native.StemConvolution(*args, pool=(pool_k, pool_s, pool_p, ceil))
        y = fused(x)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        assert tuple(y.shape) == tuple(separate.shape) == fused.output_shape(x)
        torch.testing.assert_close(y.float(), separate, rtol=0, atol=0, equal_nan=True)
        assert y.isnan().any() == separate.isnan().any()


@pytest.mark.skipif(not native.bf16_available(), reason="no native bf16 kernels (no AVX512-BF16)")
def test_the_pooled_stem_refuses_what_it_cannot_run():
    w = np.ones((8, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="bf16 math"):
        native.StemConvolution(w, None, [2, 2], [1, 1], [1, 1], (0.0, math.inf), torch.float32, pool=(3, 2, 0, 0))
    with pytest.raises(ValueError, match="bf16 math"):
        native.StemConvolution(w, None, [2, 2], [1, 1], [2, 2], (0.0, math.inf), torch.bfloat16, pool=(3, 2, 0, 0))
    with pytest.raises(ValueError, match="at most 16"):
        native.StemConvolution(w, None, [2, 2], [1, 1], [1, 1], (0.0, math.inf), torch.bfloat16, pool=(17, 2, 0, 0))


@pytest.mark.skipif(BF16_CPU is None, reason="this CPU has no AVX512-BF16/AMX, so kiln builds no bf16 CPU engine")
@pytest.mark.parametrize("pool", [{}, {"ceil_mode": 1, "pads": [1, 1, 1, 1]}])
def test_a_bf16_engine_with_a_pooled_stem_matches_onnxruntime(pool):
    model, feed = stem_model(pool=pool, size=40)
    engine = kiln.build(model, BF16_CPU)
    assert engine.plan.build_info["counters"]["fuse_stem_pool"] == 1
    (layer,) = engine.plan.layers.values()
    assert layer["tactic"] in {"native-stem-pool", "onednn-primitive", "onednn-packed"}, layer
    expected = run_onnxruntime(model, feed)["y"]
    for _ in range(3):  # the first run records a replay, the later ones replay it
        actual = engine.run(feed)["y"]
        assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-2
    # the fp32 build keeps the two layers
    fp32 = kiln.build(model)
    assert [n.op for n in fp32.plan.graph.nodes] == ["Conv", "MaxPool"]


@pytest.mark.parametrize("name", ["resnet50", "squeezenet"])
def test_the_light_models_fuse_their_stem_and_pool_in_bf16(name):
    from kiln.frontend import parse_any
    from kiln.passes.pipeline import optimize
    from kiln.tools.models import randomized_light_model

    graph = parse_any(randomized_light_model(name, seed=2), kiln.BuilderConfig())
    ctx = optimize(graph, Fusing())
    assert ctx.counters["fuse_stem_pool"] == 1
    stem = graph.nodes[0]
    assert stem.op_key == "kiln::Conv" and stem.attrs["pool_kernel_shape"] == [3, 3] and stem.attrs["pool_strides"] == [2, 2]
    assert graph.nodes[1].op != "MaxPool"
