"""The CUDA backend's host-side pieces, which run without a GPU: precision plans, --memPoolSize parsing,
the timing cache file, the CLI's GPU options, and the clear errors where no GPU is present."""
import json

import pytest

from kiln.backends.cuda.lowering import parse_workspace, precision_plan
from kiln.backends.timing_cache import TimingCache
from kiln.errors import KilnError

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "kiln": "0.1.0", "torch": "2.11", "triton": "3.6.0"}


@pytest.mark.parametrize("flags, allowed, flow", [
    ({}, ["fp32"], "fp32"),
    ({"tf32": True}, ["fp32", "tf32"], "fp32"),
    ({"fp16": True}, ["fp16"], "fp16"),
    ({"bf16": True}, ["bf16"], "bf16"),
    ({"fp16": True, "bf16": True}, ["fp16", "bf16"], "fp16"),
    ({"best": True}, ["fp32", "tf32", "fp16", "bf16"], "fp16"),
])
def test_precision_plan(flags, allowed, flow):
    assert precision_plan(flags) == (allowed, flow)


@pytest.mark.parametrize("text, expected", [(None, None), ("workspace:64", 64 << 20), ("workspace:2G", 2 << 30),
                                            ("workspace:512K", 512 << 10)])
def test_workspace_sizes(text, expected):
    assert parse_workspace(text) == expected


@pytest.mark.parametrize("text", ["workspace", "workspace:lots", "dlaSRAM:4"])
def test_bad_workspace_is_a_clear_error(text):
    with pytest.raises(KilnError) as caught:
        parse_workspace(text)
    assert caught.value.code == "KILN-E203" and "workspace:" in caught.value.hint


def test_timing_cache_round_trip_and_keys(tmp_path):
    path = tmp_path / "t.cache"
    step = {"op": "kiln::Conv", "inputs": [[[1, 64, 56, 56], "torch.float16"]]}
    cache = TimingCache(path, env=ENV)
    assert cache.get(step) is None and cache.misses == 1
    cache.put(step, {"cudnn-nhwc/fp16": 0.01, "cudnn-nchw/fp16": 0.02}, "cudnn-nhwc/fp16")
    cache.save()
    again = TimingCache(path, env=ENV)
    assert again.get(step)["chosen"] == "cudnn-nhwc/fp16" and again.hits == 1
    other_gpu = TimingCache(path, env={**ENV, "gpu": "NVIDIA A100", "capability": "8.0"})
    assert other_gpu.get(step) is None, "a timing from another GPU is never reused"
    other_shape = {**step, "inputs": [[[8, 64, 56, 56], "torch.float16"]]}
    assert again.get(other_shape) is None
    assert json.loads(path.read_text())["format"] == 1


def test_damaged_timing_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "t.cache"
    path.write_text("{not json")
    with pytest.raises(KilnError) as caught:
        TimingCache(path, env=ENV)
    assert caught.value.code == "KILN-E203" and "delete" in caught.value.hint


def test_gpu_options_on_a_cpu_build_are_refused(tmp_path, capsys):
    from kiln.cli import main

    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    for option in (["--timingCacheFile", str(tmp_path / "c")], ["--useCudaGraph"], ["--memPoolSize", "workspace:8"]):
        assert main(["build", str(model), *option]) != 0
        err = capsys.readouterr().err
        assert "KILN-E203" in err and "--device cuda" in err, option


def test_residual_add_folds_into_the_layernorm_it_feeds():
    import numpy as np
    from helpers import make_model
    from onnx import helper

    from kiln.backends.cuda.lowering import fuse_add_layernorm
    from kiln.frontend.onnx import parse

    x = np.zeros((2, 8), np.float32)
    model = make_model([helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                        helper.make_node("LayerNormalization", ["s", "w", "bias"], ["y"], name="norm"),
                        helper.make_node("Add", ["y", "a"], ["t"], name="kept_add"),  # feeds the output: stays
                        helper.make_node("LayerNormalization", ["t", "w"], ["z"], name="norm2", axis=0)],
                       {"a": x, "b": x}, ["z"], {"w": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)})
    graph = parse(model)
    nodes, folded, fused_norms = fuse_add_layernorm(graph)
    assert folded == {"add": "norm"}, "only an Add feeding a last-axis LayerNorm alone is folded"
    assert fused_norms == {"norm"}
    norm = next(n for n in nodes if n.name == "norm")
    assert norm.inputs == ("a", "b", "w", "bias") and [n.name for n in nodes] == ["norm", "kept_add", "norm2"]


def test_gemm_residual_moves_into_the_layernorm_it_feeds():
    """x @ W^T + b + r feeding only a LayerNorm: the GEMM keeps its bias, the LayerNorm adds r (one Triton pass);
    a Gemm with an activation after the sum, or whose output is also used elsewhere, keeps its residual."""
    import numpy as np

    from kiln.backends.cuda.lowering import fuse_add_layernorm
    from kiln.ir import DType, Graph, Node, Value

    nodes = [Node("Gemm", ("x", "w", "b", "r"), ("g1",), {}, name="gemm", domain="kiln"),
             Node("LayerNormalization", ("g1", "s"), ("n1",), {"axis": -1}, name="norm"),
             Node("Gemm", ("n1", "w", "b", "r"), ("g2",), {"activation": "relu"}, name="gemm_relu", domain="kiln"),
             Node("LayerNormalization", ("g2", "s"), ("n2",), {"axis": -1}, name="norm_relu")]
    weights = {"w": np.ones((8, 8), np.float32), "b": np.zeros(8, np.float32), "s": np.ones(8, np.float32)}
    graph = Graph(nodes, [Value(n, DType.float32, (2, 8)) for n in ("x", "r")], [Value("n2", DType.float32, (2, 8))],
                  initializers=weights)
    nodes, folded, fused_norms = fuse_add_layernorm(graph)
    assert folded == {} and fused_norms == {"norm"}
    by_name = {n.name: n for n in nodes}
    assert by_name["gemm"].inputs == ("x", "w", "b") and by_name["norm"].inputs == ("g1", "r", "s")
    assert by_name["gemm_relu"].inputs == ("n1", "w", "b", "r") and by_name["norm_relu"].inputs == ("g2", "s")


def test_candidates_are_offered_for_layers_that_read_the_graph_without_a_gpu():
    """lowering._candidates for layers whose candidates depend on the graph (Softmax reads its opset) and the ones that
    need no weights: each gets at least the registry kernel, on a machine without CUDA too."""
    import torch

    from kiln.backends.cuda import lowering
    from kiln.ir import DType, Graph, Node, Value

    for node in (Node("Softmax", ("x",), ("y",), {"axis": -1}, name="softmax"),
                 Node("MaxPool", ("x",), ("y",), {"kernel_shape": [2]}, name="pool"),
                 Node("Elementwise", ("x",), ("y",), {"ops": ["Relu"], "operands": [0]}, name="chain", domain="kiln")):
        graph = Graph([node], [Value("x", DType.float32, (2, 8))], [Value("y", DType.float32, (2, 8))],
                      opsets={"": 13, "kiln": 1})
        offered = lowering._candidates(node, graph, {}, torch.relu, ["fp32"], torch.float32)
        assert offered and all(callable(c.run) for c in offered), node.op


def _qconv(name, x, y, x_scale, kernel=(1, 1), residual="", group=1, activation="relu"):
    from kiln.ir import Node

    return Node("QConv", (x, f"{name}.w", f"{name}.s", "", residual), (y,), name=name, domain="kiln",
                attrs={"x_scale": x_scale, "kernel_shape": list(kernel), "group": group, "pads": [0, 0, 0, 0],
                       "strides": [1, 1], "dilations": [1, 1], "activation": activation})


def test_int8_handoff_takes_the_tensors_only_int8_convolutions_read():
    """A tensor is handed on in int8 when a Triton-run int8 conv makes it and Triton-run int8 convs read it as
    their input, all in one scale, or a max pool alone reads it whose output they read; not when anything else
    reads it (a residual alone, a grouped conv), when its readers' scales differ, or when it is a graph output."""
    from kiln.backends.cuda.int8 import handoff_scales
    from kiln.ir import Node

    nodes = [
        _qconv("a", "x", "t1", 0.1, kernel=(3, 3)),
        _qconv("b", "t1", "t2", 0.2, residual="x"),  # t1: read only by b's input -> handed on at b's scale
        _qconv("c", "t2", "t3", 0.3),
        _qconv("d", "t2", "t4", 0.3),  # t2: two readers, one scale -> handed on
        Node("MaxPool", ("t3",), ("p",), {"kernel_shape": [3, 3]}, name="pool"),  # t3 -> through the pool at f's 0.5
        _qconv("e", "t4", "t5", 0.4),  # t4 -> handed on
        _qconv("f", "p", "t6", 0.5, residual="t5"),  # t5: read as a residual -> not
        _qconv("g", "t6", "t7", 0.6),
        _qconv("h", "t6", "t8", 0.7),  # t6: two scales -> not
        _qconv("i", "t7", "t9", 0.8, group=2),  # t7: a grouped reader (no Triton int8 kernel) -> not
        _qconv("j", "t8", "y", 0.9),  # t8 -> handed on; y is the graph output -> not
    ]
    assert handoff_scales(nodes, {"y", "t9"}) == {"t1": 0.2, "t2": 0.3, "t3": 0.5, "p": 0.5, "t4": 0.4, "t8": 0.9}
    ceil = nodes[4].replace(attrs={"kernel_shape": [3, 3], "ceil_mode": 1})  # a pool the Triton pass does not run
    assert "p" not in handoff_scales(nodes[:4] + [ceil] + nodes[5:], {"y", "t9"})
    shared = nodes + [_qconv("k", "t3", "t10", 0.5)]  # t3 read by the pool and a conv -> not through the pool
    assert "t3" not in handoff_scales(shared, {"y", "t9", "t10"})


def test_int8_handoff_leaves_out_layers_whose_triton_kernels_are_slow():
    """A conv whose input cannot arrive in int8 and whose fastest Triton int8 time is over HANDOFF_MARGIN times its
    fastest tactic (ResNet-50's 3-channel stem at batch 128: 1.02 ms against cuDNN's 0.28) neither hands on nor
    receives in int8; nor does its max pool. A conv whose input would arrive in int8 is not judged on its time
    (quantizing on load overstates it), unless the layer feeding it is left out: then it is judged too."""
    from kiln.backends.cuda.int8 import HANDOFF_MARGIN, handoff_scales, slow_int8_layers
    from kiln.ir import Node

    slow_time = 0.10 * HANDOFF_MARGIN + 0.001
    layer_info = {
        "stem": {"times_ms": {"triton-int8-implicit-gemm-64x64x32/int8": 1.02, "fallback-cudnn-fused-nhwc-c4/fp16": 0.28}},
        "a": {"times_ms": {"triton-int8-implicit-gemm-64x64x64/int8": 0.19, "fallback-cudnn-fused-nhwc/fp16": 0.10}},
        "b": {"times_ms": {"triton-int8-implicit-gemm-64x64x64/int8": slow_time, "fallback-cudnn-fused-nhwc/fp16": 0.10}},
        "c": {"times_ms": {"fallback-cudnn-fused-nhwc/fp16": 0.10}, "rejected": {"triton-int8-x/int8": "error"}},
        "pool": {"tactic": "triton-nhwc", "precision": "fp16"},  # a single tactic: no times, not judged
    }
    nodes = [
        _qconv("stem", "x", "s", 0.1, kernel=(7, 7)),
        Node("MaxPool", ("s",), ("p",), {"kernel_shape": [3, 3]}, name="pool"),
        _qconv("a", "p", "t1", 0.2),
        _qconv("b", "t1", "t2", 0.3),
        _qconv("d", "t2", "t3", 0.4),
        _qconv("e", "t3", "y", 0.5),
    ]
    slow = slow_int8_layers(layer_info, nodes, {"y"})
    assert slow == {"stem", "c"}  # b's input arrives in int8 from a: b's slow time on fp16 input does not count
    assert handoff_scales(nodes, {"y"}) == {"s": 0.2, "p": 0.2, "t1": 0.3, "t2": 0.4, "t3": 0.5}
    assert handoff_scales(nodes, {"y"}, slow) == {"t1": 0.3, "t2": 0.4, "t3": 0.5}

    # a too slow on its fp16 input -> left out -> b's input no longer arrives in int8, so b is judged and left out
    layer_info["a"]["times_ms"]["triton-int8-implicit-gemm-64x64x64/int8"] = slow_time
    slow = slow_int8_layers(layer_info, nodes, {"y"})
    assert slow == {"stem", "a", "b", "c"}
    assert handoff_scales(nodes, {"y"}, slow) == {"t3": 0.5}


def test_whole_engine_variant_names_map_to_lowering_options():
    from kiln.backends.cuda.lowering import _variant

    assert _variant("per-layer choice") == {}
    assert _variant("all channels-last") == {"conv_layout": "nhwc"}
    assert _variant("all channels-last + int8 hand-off") == {"conv_layout": "nhwc", "int8_handoff": True}
    assert _variant("per-layer") is None and _variant(None) is None


def test_int8_handoff_takes_residuals_when_an_input_sets_the_scale():
    """A block's output read as one conv's input and another's residual is handed on in the input's scale (the
    residual reader dequantizes it); a tensor read only as a residual has no input scale and stays float."""
    from kiln.backends.cuda.int8 import handoff_scales

    nodes = [
        _qconv("a", "x", "block", 0.1),
        _qconv("b", "block", "t1", 0.2),
        _qconv("c", "t1", "t2", 0.3, residual="block"),  # block: input of b, residual of c -> handed on at 0.2
        _qconv("d", "t2", "shortcut", 0.4),
        _qconv("e", "t2", "y", 0.4, residual="shortcut"),  # shortcut: only a residual -> not
    ]
    assert handoff_scales(nodes, {"y"}) == {"block": 0.2, "t1": 0.3, "t2": 0.4}


def test_a_layer_whose_every_tactic_fails_is_a_clear_build_error(monkeypatch):
    """choose() with no candidate that runs (an int8 hand-off layer has no float fallback to fall back on): a
    KILN-E201 naming each tactic's reason, not an assertion. torch.cuda's bookkeeping is stubbed: no GPU needed."""
    import torch

    from kiln.backends.tactics import Candidate, choose

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)

    def broken(*args):
        raise RuntimeError("triton compile failed")

    candidates = [Candidate("triton-int8-a", "int8", broken), Candidate("triton-int8-b", "int8", broken)]
    with pytest.raises(KilnError) as caught:
        choose(candidates, [], lambda: None, {"op": "kiln::QConv"}, None)
    assert caught.value.code == "KILN-E201" and "triton-int8-a/int8: RuntimeError: triton compile failed" in caught.value.where


def test_few_channel_convolution_is_offered_over_zero_padded_channels():
    """A 3-channel stem is also offered channels-last over 4 and 8 zero-padded channels (cuDNN's tensor-core
    kernels want multiples of 4 or 8); padding input and weight alike leaves the result as it was. Run on the
    host with the candidate whose epilogue is torch's (F.conv2d), against float64."""
    import torch
    import torch.nn.functional as F

    from kiln.backends.cuda.candidates import conv_candidates
    from kiln.ir import Node

    node = Node("Conv", ("x", "w", "b"), ("y",), {"dilations": [1, 1], "group": 1, "kernel_shape": [7, 7],
                                                   "pads": [3, 3, 3, 3], "strides": [2, 2], "activation": "relu"},
                name="stem", domain="kiln")
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((2, 3, 20, 20), (8, 3, 7, 7), (8,)))
    candidates = {c.name: c for c in conv_candidates(node, w, b, ["fp32"], torch.float32)}
    assert {"cudnn-nhwc-c4", "cudnn-fused-nhwc-c8"} <= set(candidates)
    expected = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride=2, padding=3))
    for name in ("cudnn-nhwc-c4", "cudnn-nhwc-c8"):
        actual = candidates[name].run(x)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    wide = node.replace(name="wide")
    assert not any("-c8" in c.name for c in conv_candidates(wide, torch.randn(8, 16, 3, 3), None, ["fp32"], torch.float32))


def test_int8_tactic_names_are_unique_per_layer():
    """Every Triton int8 configuration a layer is offered has a name of its own: a reloaded engine finds its tactic by
    name, and two configurations under one name (128x128x64 with 4 and with 8 warps) would share a timing."""
    pytest.importorskip("triton")
    from kiln.backends.cuda import int8_kernels as K
    from kiln.backends.cuda.int8 import _blocks

    for configs in (K.CONV_CONFIGS, K.PACKED_CONFIGS, K.POINTWISE_CONFIGS, K.WINDOW_CONFIGS, K.SPLIT_CONFIGS):
        names = [_blocks(config) for config in configs]
        assert len(set(names)) == len(names), names
    assert _blocks((128, 128, 64, 8, 3)) == "128x128x64-w8" and _blocks((32, 64, 64, 4, 3, 8)) == "32x64x64-split8"


def test_layer_kernels_compile_ahead_only_on_a_timing_cache_miss(monkeypatch, tmp_path):
    """choose() hands its candidates to `prepare` (the lowering compiles their Triton kernels at once there) before
    timing them, and not when the timing cache already holds the choice; compiling ahead swallows a failure, which
    only leaves the kernel to compile when it is first timed. torch.cuda's bookkeeping is stubbed: no GPU needed."""
    import torch

    from kiln.backends.cuda.lowering import _compile_ahead
    from kiln.backends.tactics import Candidate, choose

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    monkeypatch.setattr("kiln.backends.tactics.median_ms", lambda run, args, *rest, **kw: {"a": 2.0, "b": 1.0}[run()])
    prepared = []
    candidates = [Candidate("a", "fp32", lambda: "a"), Candidate("b", "fp32", lambda: "b")]
    cache = TimingCache(str(tmp_path / "t.cache"), env=ENV)

    def prepare(found, args):
        prepared.append([c.name for c in found])

    for _ in range(2):  # a miss, then the cache's answer
        chosen, _ = choose(candidates, [], lambda: "b", {"op": "Gemm"}, cache, prepare=prepare)
        assert chosen.name == "b"
    assert prepared == [["a", "b"]]

    def broken(*args):
        raise RuntimeError("no GPU here")

    _compile_ahead([Candidate("t1", "int8", broken, compile_ahead=True), Candidate("t2", "int8", broken, compile_ahead=True)],
                   [], None)  # swallowed (logged at verbose level)
