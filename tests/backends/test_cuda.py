"""The CUDA backend on a real GPU: every precision against onnxruntime (fp32 on the CPU), tactics recorded
per layer, the timing cache, CUDA graphs per input shape, CUDA and host inputs, device stamps, and the
clear errors (E301, E505, E601). Marked gpu: skipped where torch sees no CUDA device."""
import numpy as np
import pytest
from helpers import make_model, randomized_light_model, run_onnxruntime
from onnx import helper

import kiln
from kiln.builder import BuilderConfig
from kiln.errors import KilnError

pytestmark = pytest.mark.gpu

# ||out - ref|| / ||ref|| bounds against an fp32 reference, per precision (METHOD.md's ranges, with room
# for the error to grow through a few dozen layers).
RELATIVE = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 1e-2, "bf16": 5e-2}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(actual).all(), "NaN or inf in the output"
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def resnet_block_model(batch=2, channels=16, size=12):
    """Conv+BN+Relu, Conv+BN, residual Add, Relu, global pool, Gemm: what the optimizer fuses into kiln::Conv/Gemm."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w1": w(channels, channels, 3, 3), "w2": w(channels, channels, 3, 3), "fc": w(10, channels),
             "fcb": (0.1 * rng.standard_normal(10)).astype(np.float32)}
    for i in (1, 2):
        inits[f"s{i}"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        inits[f"b{i}"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        inits[f"m{i}"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        inits[f"v{i}"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "s2", "b2", "m2", "v2"], ["n2"]),
        helper.make_node("Add", ["n2", "x"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1),
    ]
    x = np.zeros((batch, channels, size, size), np.float32)
    return _for_onnxruntime(make_model(nodes, {"x": x}, ["y"], inits))


def _for_onnxruntime(model):
    model.ir_version = 10  # older onnxruntime builds (the GPU machine's) read IR versions up to 13 only
    return model


@pytest.fixture(scope="module")
def block():
    model = resnet_block_model()
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((2, 16, 12, 12)).astype(np.float32)}
    return model, feed, run_onnxruntime(model, feed)["y"]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_block_matches_onnxruntime_in_every_precision(block, precision):
    model, feed, expected = block
    flags = {precision: True} if precision != "fp32" else {}
    engine = kiln.build(model, BuilderConfig(device="cuda", **flags))
    actual = engine.run(feed)["y"]
    assert isinstance(actual, np.ndarray) and actual.dtype == np.float32
    assert relative_error(actual, expected) < RELATIVE[precision]
    layers = engine.plan.layers
    fused = [layer for layer in layers.values() if layer.get("op") == "kiln::Conv"]
    assert len(fused) == 2, "the optimizer's fusion reached the GPU lowering"
    want = {"fp32": {"fp32"}, "tf32": {"fp32", "tf32"}, "fp16": {"fp16"}, "bf16": {"bf16"}}[precision]
    assert all(layer["precision"] in want for layer in fused), [layer["precision"] for layer in fused]
    assert all(layer["tactic"] for layer in layers.values())


def test_best_chooses_per_layer_and_stays_accurate(block):
    model, feed, expected = block
    engine = kiln.build(model, BuilderConfig(device="cuda", best=True))
    assert relative_error(engine.run(feed)["y"], expected) < RELATIVE["bf16"]
    conv = next(layer for layer in engine.plan.layers.values() if layer.get("op") == "kiln::Conv")
    assert "times_ms" in conv and len(conv["times_ms"]) >= 4, "several precisions and layouts were timed"


def test_light_resnet50_fp16_against_onnxruntime():
    model = randomized_light_model("resnet50")
    name = model.graph.input[0].name
    shape = tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)
    feed = {name: np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    expected = list(run_onnxruntime(model, feed).values())[0]
    for precision, bound in (("fp32", 1e-4), ("fp16", 2e-2)):
        flags = {precision: True} if precision != "fp32" else {}
        engine = kiln.build(model, BuilderConfig(device="cuda", **flags))
        assert relative_error(list(engine.run(feed).values())[0], expected) < bound, precision


def test_bert_encoder_fp16_uses_fused_attention(tmp_path):
    import torch
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert().eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = tmp_path / "bert.onnx"
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=True, verbose=False)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    feed["attention_mask"][0, 10:] = 0
    expected = run_onnxruntime(str(path), feed)["hidden"]
    for precision in ("fp32", "fp16", "bf16"):
        flags = {precision: True} if precision != "fp32" else {}
        engine = kiln.build(str(path), BuilderConfig(device="cuda", **flags))
        assert relative_error(engine.run(feed)["hidden"], expected) < RELATIVE[precision] * 3, precision
    tactics = {layer["op"]: layer["tactic"] for layer in engine.plan.layers.values()}
    assert tactics.get("kiln::Attention", "").startswith(("sdpa", "triton-flash")), tactics


def test_timing_cache_skips_timing_on_the_second_build(block, tmp_path):
    model, feed, expected = block
    cache = tmp_path / "timing.cache"
    config = lambda: BuilderConfig(device="cuda", fp16=True, extra={"timing_cache_file": str(cache)})  # noqa: E731
    first = kiln.build(model, config())
    assert cache.exists() and first.plan.build_info["cuda_tuning"]["cache_misses"] > 0
    second = kiln.build(model, config())
    tuning = second.plan.build_info["cuda_tuning"]
    assert tuning["cache_misses"] == 0 and tuning["cache_hits"] == first.plan.build_info["cuda_tuning"]["cache_misses"]
    assert {k: v["tactic"] for k, v in second.plan.layers.items()} == {k: v["tactic"] for k, v in first.plan.layers.items()}
    assert relative_error(second.run(feed)["y"], expected) < RELATIVE["fp16"]


def test_tactics_of_a_graph_engine_are_timed_in_a_cuda_graph():
    """graph_ms times a candidate as a graph replays it: host work (here a 2 ms sleep before one small kernel)
    stays out, while a GPU-bound candidate (a large matmul) times as it does eagerly; a candidate that reads
    the host cannot be captured (None), and the stream stays usable after the failed capture."""
    import time

    import torch

    from kiln.backends.tactics import graph_ms, median_ms

    x = torch.randn(64, 64, device="cuda")

    def host_bound(a):
        time.sleep(0.002)
        return a + 1

    host_bound(x)
    eager, replayed = median_ms(host_bound, [x]), graph_ms(host_bound, [x])
    assert eager > 1.5 and replayed is not None and replayed < 0.2, (eager, replayed)
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    eager, replayed = median_ms(torch.matmul, [big, big]), graph_ms(torch.matmul, [big, big])
    assert replayed is not None and 0.75 < replayed / eager < 1.25, (eager, replayed)
    assert graph_ms(lambda a: a.sum().item(), [x]) is None
    assert torch.equal(host_bound(x), x + 1)


def test_cuda_graph_replays_per_shape_and_matches_eager():
    import torch

    model = _for_onnxruntime(make_model([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                                         helper.make_node("Relu", ["h"], ["y"])],
                                        {"x": (np.float32, ["batch", 32])}, ["y"],
                                        {"w": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32),
                                         "b": np.ones(64, np.float32)}))
    profile = [{"x": ((1, 32), (4, 32), (8, 32))}]  # tactics are timed at the opt shape
    graphed = kiln.build(model, BuilderConfig(device="cuda", profiles=profile, extra={"use_cuda_graph": True}))
    eager = kiln.build(model, BuilderConfig(device="cuda", profiles=profile, extra={"use_cuda_graph": False}))
    gemm = next(layer for layer in graphed.plan.layers.values() if layer.get("op") == "kiln::Gemm")
    assert gemm["tactic"] and graphed.plan.build_info["cuda_tuning"]["cuda_graph"] is True
    for batch in (3, 5, 3):
        feed = {"x": torch.randn(batch, 32, device="cuda")}
        a, b = graphed.run(feed)["y"], eager.run(feed)["y"]
        assert a.is_cuda and a.shape == (batch, 64), "CUDA inputs give CUDA outputs"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    program = graphed.program
    assert program.graph_error is None and len(program.graphs) == 2, "one graph per distinct shape"
    assert not eager.program.graphs


def test_cuda_graph_cache_is_bounded_least_recently_used_first_and_stays_correct():
    """One graph per distinct shape, captured on first use, at most GRAPH_CACHE_SIZE kept: the least recently used
    goes first, and a shape whose graph was dropped is captured again and still matches onnxruntime."""
    import torch

    from kiln.backends.cuda.program import GRAPH_CACHE_SIZE

    rng = np.random.default_rng(11)
    model = _for_onnxruntime(make_model([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                                         helper.make_node("Tanh", ["h"], ["y"])],
                                        {"x": (np.float32, ["batch", 32])}, ["y"],
                                        {"w": (rng.standard_normal((48, 32)) / 6).astype(np.float32),
                                         "b": rng.standard_normal(48).astype(np.float32)}))
    largest = GRAPH_CACHE_SIZE + 2
    config = BuilderConfig(device="cuda", profiles=[{"x": ((1, 32), (4, 32), (largest, 32))}], extra={"use_cuda_graph": True})
    engine = kiln.build(model, config)
    program = engine.program

    def check(batch: int) -> None:
        x = rng.standard_normal((batch, 32)).astype(np.float32)
        got = engine.run({"x": torch.from_numpy(x).cuda()})["y"]
        assert got.is_cuda and got.shape == (batch, 48)
        error = relative_error(got.cpu().numpy(), run_onnxruntime(model, {"x": x})["y"])
        assert error < RELATIVE["fp32"], f"batch {batch}: relative error {error:.2e}"

    def cached() -> list[int]:
        return [key[0][1][0] for key in program.graphs]  # key: ((name, shape, dtype), ...), oldest first

    for batch in range(1, largest + 1):
        check(batch)
    assert program.graph_error is None
    assert cached() == list(range(3, largest + 1)), "the two oldest shapes make room once the cache is full"
    check(5)  # a replay makes its graph the most recently used
    assert cached()[-1] == 5 and len(program.graphs) == GRAPH_CACHE_SIZE
    check(1)  # dropped earlier: captured again, evicting the least recently used (batch 3)
    assert cached()[-1] == 1 and 3 not in cached() and len(program.graphs) == GRAPH_CACHE_SIZE
    check(2)
    assert 4 not in cached() and 5 in cached()


def test_outputs_are_not_overwritten_by_the_next_replay(block):
    model, feed, expected = block
    engine = kiln.build(model, BuilderConfig(device="cuda"))
    first = engine.run(feed)["y"]
    engine.run({"x": feed["x"] * 2})
    assert relative_error(first, expected) < RELATIVE["fp32"]


def test_engine_file_round_trip_and_device_stamp(block, tmp_path):
    model, feed, expected = block
    engine = kiln.build(model, BuilderConfig(device="cuda", fp16=True))
    engine.save(tmp_path / "e.kiln")
    again = kiln.load(tmp_path / "e.kiln")
    assert again.plan.target["device"] == "cuda"
    assert relative_error(again.run(feed)["y"], expected) < RELATIVE["fp16"]
    assert {k: v["tactic"] for k, v in again.plan.layers.items()} == {k: v["tactic"] for k, v in engine.plan.layers.items()}
    engine.plan.target["capability"] = "1.0"
    engine.save(tmp_path / "foreign.kiln")
    with pytest.raises(KilnError) as caught:
        kiln.load(tmp_path / "foreign.kiln")
    assert caught.value.code == "KILN-E505" and "rebuild" in caught.value.hint


def test_inspect_shows_tactics(block, tmp_path):
    from kiln.tools.inspect import format_report, inspect_path

    model, _, _ = block
    kiln.build(model, BuilderConfig(device="cuda", fp16=True)).save(tmp_path / "e.kiln")
    text = format_report(inspect_path(str(tmp_path / "e.kiln")))
    assert "cudnn-" in text and "fp16" in text


def test_workspace_limit_too_small_gives_e601_with_the_memory_needed(block):
    model, _, _ = block
    with pytest.raises(KilnError) as caught:
        kiln.build(model, BuilderConfig(device="cuda", extra={"mem_pool_size": "workspace:1K"}))
    assert caught.value.code == "KILN-E601" and "MiB" in caught.value.message


def test_fp8_is_refused_clearly_below_compute_capability_8_9(block):
    import torch

    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU runs fp8 (tests/backends/test_cuda_int8.py)")
    model, _, _ = block
    with pytest.raises(KilnError) as caught:
        kiln.build(model, BuilderConfig(device="cuda", fp8=True))
    assert caught.value.code == "KILN-E301" and "8.9" in caught.value.message


def test_host_input_copy_gives_numpy_and_cuda_input_gives_cuda(block):
    """Host and CUDA fp32 inputs of fp32 and fp16 graph-replayed engines: each replay's one copy_ into the graph's
    input buffer moves and casts the new input (a second, different input gives its own result)."""
    import torch

    model, feed, expected = block
    other = {"x": (feed["x"] * -0.5).astype(np.float32)}
    other_expected = run_onnxruntime(model, other)["y"]
    for precision in ("fp32", "fp16"):
        engine = kiln.build(model, BuilderConfig(device="cuda", **({"fp16": True} if precision == "fp16" else {})))
        host = engine.run(feed)["y"]
        device = engine.run({"x": torch.from_numpy(feed["x"]).cuda()})["y"]
        assert isinstance(host, np.ndarray) and device.is_cuda
        np.testing.assert_allclose(host, device.cpu().numpy(), rtol=1e-6, atol=1e-6)
        assert relative_error(host, expected) < RELATIVE[precision]
        for again in (engine.run(other)["y"], engine.run({"x": torch.from_numpy(other["x"]).cuda()})["y"].cpu().numpy()):
            assert relative_error(again, other_expected) < RELATIVE[precision], precision


def attention_model(batch=2, heads=4, length=37, head_dim=64, mask_rows=1):
    """Q @ K^T * scale + mask, Softmax, @ V over [B, H, S, D] inputs, K^T made by a Transpose as a model's head
    transposes make it: what recognize_attention turns into kiln::Attention. An odd length leaves partial
    query and key blocks; mask_rows 1 is a padding mask [B, 1, 1, S], S a full one [B, 1, S, S]."""
    q = np.zeros((batch, heads, length, head_dim), np.float32)
    mask = np.zeros((batch, 1, mask_rows, length), np.float32)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["y"]),
    ]
    inits = {"scale": np.array(head_dim ** -0.5, np.float32)}
    return _for_onnxruntime(make_model(nodes, {"q": q, "k": q, "v": q, "mask": mask}, ["y"], inits))


def attention_feed(batch=2, heads=4, length=37, head_dim=64, mask_rows=1):
    rng = np.random.default_rng(3)
    feed = {name: rng.standard_normal((batch, heads, length, head_dim)).astype(np.float32) for name in ("q", "k", "v")}
    mask = np.zeros((batch, 1, mask_rows, length), np.float32)
    mask[0, ..., length - 9:] = -10000.0  # the first sequence is padded, as a BERT mask has it
    feed["mask"] = mask
    return feed


FLASH = {"triton-flash-m64-n64-w4-s2", "triton-flash-m128-n64-w4-s3", "triton-flash-m128-n128-w8-s2",
         "triton-flash-m64-n32-w4-s3"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("head_dim, mask_rows", [(64, 1), (80, 37)], ids=["d64-padding-mask", "d80-full-mask"])
def test_attention_times_kiln_flash_kernels_and_matches_onnxruntime(precision, head_dim, mask_rows):
    model = attention_model(head_dim=head_dim, mask_rows=mask_rows)
    feed = attention_feed(head_dim=head_dim, mask_rows=mask_rows)
    expected = run_onnxruntime(model, feed)["y"]
    flags = {precision: True} if precision != "fp32" else {}
    engine = kiln.build(model, BuilderConfig(device="cuda", **flags))
    assert engine.plan.build_info["counters"].get("recognize_attention") == 1
    assert relative_error(engine.run(feed)["y"], expected) < RELATIVE[precision]
    layer = next(layer for layer in engine.plan.layers.values() if layer.get("op") == "kiln::Attention")
    timed = {key.split("/")[0] for key in layer["times_ms"]}
    assert FLASH & timed, (layer["times_ms"], layer.get("rejected"))
    if precision != "fp32":  # half heads of 64 or 80 fit every launch variant; fp32 products may not fit the largest
        assert FLASH <= timed, (layer["times_ms"], layer.get("rejected"))


def elementwise_model(shape=(4, 64, 33)):
    """x * s (last axis) + b (middle axis), Tanh, c - value (operand first), * y (full shape): a chain that
    fuse_elementwise turns into one kiln::Elementwise with broadcast operands and a reversed Sub."""
    rng = np.random.default_rng(4)
    x = np.zeros(shape, np.float32)
    inits = {"s": rng.standard_normal(shape[-1:]).astype(np.float32),
             "b": rng.standard_normal((shape[1], 1)).astype(np.float32), "c": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["shifted"]),
        helper.make_node("Tanh", ["shifted"], ["squashed"]),
        helper.make_node("Sub", ["c", "squashed"], ["flipped"]),
        helper.make_node("Mul", ["flipped", "y"], ["out"]),
    ]
    return _for_onnxruntime(make_model(nodes, {"x": x, "y": x}, ["out"], inits))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_elementwise_chain_times_kiln_triton_kernel_and_matches_onnxruntime(precision):
    model = elementwise_model()
    rng = np.random.default_rng(5)
    feed = {name: rng.standard_normal((4, 64, 33)).astype(np.float32) for name in ("x", "y")}
    expected = run_onnxruntime(model, feed)["out"]
    flags = {precision: True} if precision != "fp32" else {}
    engine = kiln.build(model, BuilderConfig(device="cuda", **flags))
    assert engine.plan.build_info["counters"].get("fuse_elementwise_chain") == 1
    assert relative_error(engine.run(feed)["out"], expected) < RELATIVE[precision]
    layer = next(layer for layer in engine.plan.layers.values() if layer.get("op") == "kiln::Elementwise")
    timed = {key.split("/")[0] for key in layer["times_ms"]}
    assert {"torch", "triton-chain-b512-w4", "triton-chain-b1024-w4", "triton-chain-b2048-w8"} <= timed, layer


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_outside_attention_builds_and_matches_onnxruntime(opset):
    """A Softmax that no attention pattern absorbs is lowered as its own layer, whose candidates depend on the
    opset's axis rule (opset 11 coerces to 2-D): a MatMul, then Softmax over axis 1 of a 3-D tensor."""
    rng = np.random.default_rng(6)
    inits = {"w": (rng.standard_normal((24, 40)) / 5).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    x = rng.standard_normal((3, 7, 24)).astype(np.float32)
    model = make_model(nodes, {"x": x}, ["y"], inits, opset=opset)
    model = _for_onnxruntime(model)
    expected = run_onnxruntime(model, {"x": x})["y"]
    engine = kiln.build(model, BuilderConfig(device="cuda", fp16=True))
    assert relative_error(engine.run({"x": x})["y"], expected) < RELATIVE["fp16"]

