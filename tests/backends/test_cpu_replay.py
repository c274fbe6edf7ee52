"""Replayed native layers (kiln/backends/cpu/replay.py): a replay computes what the plain path computes, bit for bit,
on every run and input; what cannot replay (a layer torch runs, a graph output's buffer) runs in Python around it."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import kiln
from kiln.backends.cpu import native, replay

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native kernels unavailable: {native.available()[1]}")
rng = np.random.default_rng(0)


def squeeze_model(python_layer: bool = True, conv_output: bool = False):
    """conv 1x1 -> a fire module (1x1 and 3x3 expands into one concatenation) -> [Sin, which torch runs in Python]
    -> conv 3x3 -> max pool -> global average pool; with conv_output, the last conv is an output too."""
    from helpers import make_model
    from onnx import helper

    shapes = {"w0": (16, 24, 1, 1), "w1": (32, 16, 1, 1), "w3": (32, 16, 3, 3), "wl": (40, 64, 3, 3), "b": (32,)}
    weights = {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in shapes.items()}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s0"]), helper.make_node("Relu", ["s0"], ["s"]),
             helper.make_node("Conv", ["s", "w1", "b"], ["c1"]), helper.make_node("Relu", ["c1"], ["e1"]),
             helper.make_node("Conv", ["s", "w3", "b"], ["c3"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c3"], ["e3"]),
             helper.make_node("Concat", ["e1", "e3"], ["f"], axis=1)]
    last_input = "f"
    if python_layer:
        nodes.append(helper.make_node("Sin", ["f"], ["p"]))
        last_input = "p"
    nodes += [helper.make_node("Conv", [last_input, "wl"], ["l0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["l0"], ["l"]),
              helper.make_node("MaxPool", ["l"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
              helper.make_node("GlobalAveragePool", ["m"], ["y"])]
    x = rng.standard_normal((2, 24, 11, 11)).astype(np.float32)
    return make_model(nodes, {"x": x}, ["y", "l"] if conv_output else ["y"], weights), x


@pytest.fixture
def native_wins(monkeypatch):
    from kiln.backends.cpu import select

    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {name: select.NATIVE for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.NATIVE)


def replayer_of(engine, feed) -> replay.Replayer:
    execute = engine.select(feed).execute
    assert isinstance(execute, replay.Replayer)
    return execute


def plain(engine, feed) -> dict:
    return engine.select(feed).execute(feed, on_step=lambda step, env: None)  # a run with on_step never replays


@pytest.mark.usefixtures("native_wins")
@pytest.mark.parametrize("python_layer", [True, False], ids=["a layer in Python between", "all native"])
def test_a_replay_equals_the_plain_run_bit_for_bit(python_layer):
    from helpers import run_onnxruntime

    model, x = squeeze_model(python_layer)
    engine = kiln.build(model, kiln.BuilderConfig())
    feeds = [{"x": torch.from_numpy(x)}] + [{"x": torch.randn(2, 24, 11, 11)} for _ in range(3)]
    replayer = replayer_of(engine, feeds[0])
    outputs = []
    for feed in feeds:
        with torch.inference_mode():
            expected, actual = plain(engine, feed)["y"], engine.run(feed)["y"]
        assert torch.equal(actual, expected)
        outputs.append(actual)
    np.testing.assert_allclose(outputs[0].numpy(), run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    [recorded] = replayer.recordings
    program = engine.select(feeds[0])
    # every native layer replays but the last (the graph output's), the first too (it reads the NCHW input through a
    # native transposition), and where there is one, the torch layer does not
    in_python = [item.name for item in recorded.items if not isinstance(item, replay._Segment)]
    assert in_python == (["Sin_7"] if python_layer else []) + [program.steps[-1].name]
    assert recorded.replayed_steps == len(program.steps) - len(in_python)
    segments = [item for item in recorded.items if isinstance(item, replay._Segment)]
    assert len(segments) == (2 if python_layer else 1)
    assert segments[0].source_names == ["x"]  # the engine's input: patched in at each run
    if python_layer:  # the layer after the Python one reads its fresh output at each run: a patched pointer
        assert segments[1].source_names and segments[1].patch_count >= 1
    # each run's output is its own: a later run leaves an earlier result as it was
    assert torch.equal(outputs[1], plain(engine, feeds[1])["y"])


@pytest.mark.usefixtures("native_wins")
def test_a_native_layer_whose_output_the_caller_keeps_runs_in_python():
    model, x = squeeze_model(python_layer=False, conv_output=True)
    engine = kiln.build(model, kiln.BuilderConfig())
    feed, other = {"x": torch.from_numpy(x)}, {"x": torch.randn(2, 24, 11, 11)}
    first = engine.run(feed)
    kept = first["l"].clone()
    second = engine.run(other)
    [recorded] = replayer_of(engine, feed).recordings
    steps = [item.name for item in recorded.items if not isinstance(item, replay._Segment)]
    assert next(node.name for node in engine.plan.graph.nodes if "l" in node.outputs) in steps
    assert torch.equal(first["l"], kept) and not torch.equal(second["l"], kept)
    assert torch.equal(second["l"], plain(engine, other)["l"])


@pytest.mark.usefixtures("native_wins")
def test_another_input_layout_records_again_and_a_full_engine_runs_plain(monkeypatch):
    model, x = squeeze_model()
    engine = kiln.build(model, kiln.BuilderConfig())
    nchw = {"x": torch.from_numpy(x)}
    nhwc = {"x": torch.from_numpy(x).contiguous(memory_format=torch.channels_last)}
    replayer = replayer_of(engine, nchw)
    for feed in (nchw, nhwc, nchw, nhwc):
        assert torch.equal(engine.run(feed)["y"], plain(engine, nchw)["y"])
    assert len(replayer.recordings) == 2
    monkeypatch.setattr(replay, "MAX_RECORDINGS", 2)
    three_threads = torch.get_num_threads() + 1  # the thread count is part of what a recording depends on
    monkeypatch.setattr(torch, "get_num_threads", lambda: three_threads)
    assert torch.equal(replayer(nchw)["y"], plain(engine, nchw)["y"])
    assert len(replayer.recordings) == 2


@pytest.mark.usefixtures("native_wins")
def test_concurrent_runs_replay_one_at_a_time_and_the_rest_run_plain():
    from helpers import run_onnxruntime

    model, _ = squeeze_model()
    engine = kiln.build(model, kiln.BuilderConfig())
    feeds = [rng.standard_normal((2, 24, 11, 11)).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: np.asarray(engine.run({"x": x})["y"]), feeds * 4))
    for x, y in zip(feeds * 4, results):
        np.testing.assert_allclose(y, run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("native_wins")
def test_an_engine_whose_activations_sum_past_the_limit_runs_plain(monkeypatch):
    monkeypatch.setattr(replay, "RECORDING_LIMIT", 1000)  # bytes: this engine's activations sum to more
    model, x = squeeze_model()
    engine = kiln.build(model, kiln.BuilderConfig())
    feed = {"x": torch.from_numpy(x)}
    assert engine.plan.memory["naive_bytes"] > 1000
    assert not isinstance(engine.select(feed).execute, replay.Replayer)
    assert torch.equal(engine.run(feed)["y"], plain(engine, feed)["y"])
