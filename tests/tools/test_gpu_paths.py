"""The GPU paths of bench, compare and the memory monitor (device split, CUDA graph replay, device memory), on a
small program that runs torch CUDA ops, so they are checked before kiln's CUDA backend exists."""
from types import SimpleNamespace

import numpy as np
import pytest

from kiln.engine.bindings import Binding
from kiln.ir import DType

pytestmark = pytest.mark.gpu


class TwoStepProgram:
    """y = relu(x @ w) as two steps on the GPU, calling on_step(step, env) as kiln's programs do."""

    def __init__(self, w):
        self.w = w
        self.steps = [SimpleNamespace(name="mm", op="MatMul", outputs=("h",)), SimpleNamespace(name="relu", op="Relu", outputs=("y",))]

    def execute(self, feed, on_step=None):
        import torch

        env = dict(feed)
        env["h"] = env["x"] @ self.w
        if on_step:
            on_step(self.steps[0], env)
        env["y"] = torch.relu(env["h"])
        if on_step:
            on_step(self.steps[1], env)
        return {"y": env["y"]}


def cuda_engine():
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32) / 16
    program = TwoStepProgram(torch.from_numpy(w).cuda())
    engine = SimpleNamespace(device="cuda", program=program, select=lambda tensors: program,
                             inputs=[Binding("x", DType.float32, (64, 256))], outputs=[Binding("y", DType.float32, (64, 128))],
                             plan=SimpleNamespace(layers={"mm": {"origin": ["mm"]}, "relu": {"origin": ["relu"]}}))
    x = rng.standard_normal((64, 256)).astype(np.float32)
    return engine, x, np.maximum(x.astype(np.float64) @ w.astype(np.float64), 0)


@pytest.mark.parametrize("graph", [False, True])
def test_bench_split_profile_and_cuda_graph(graph):
    from kiln.tools.bench import benchmark

    engine, x, expected = cuda_engine()
    result = benchmark(engine, {"x": x}, warmup_ms=0, iterations=20, duration_s=0, use_cuda_graph=graph, profile=True,
                       separate_profile_run=True, progress=False)
    np.testing.assert_allclose(result.outputs["y"], expected, rtol=2e-3, atol=2e-3)  # TF32 may be on for matmuls
    assert result.iterations >= 20 and min(result.h2d_ms) > 0 and min(result.d2h_ms) > 0
    assert [layer["name"] for layer in result.layers] == ["mm", "relu"]
    assert result.memory["peak_device_bytes"] >= x.nbytes


def test_no_data_transfers_keeps_outputs_on_the_device():
    from kiln.tools.bench import benchmark

    engine, x, expected = cuda_engine()
    result = benchmark(engine, {"x": x}, warmup_ms=0, iterations=5, duration_s=0, no_data_transfers=True, progress=False)
    assert max(result.h2d_ms) < 0.05 and max(result.d2h_ms) < 0.05  # nothing copied: only clock reads
    np.testing.assert_allclose(result.outputs["y"], expected, rtol=2e-3, atol=2e-3)


def test_layerwise_capture_and_device_memory_peak():
    import torch

    from kiln.tools.compare import run_kiln
    from kiln.tools.memory import MemoryMonitor

    engine, x, expected = cuda_engine()
    outputs, captured = run_kiln(engine, {"x": x}, {"h", "y"})
    assert [c["output"] for c in captured] == ["h", "y"]
    np.testing.assert_allclose(outputs["y"], expected, rtol=2e-3, atol=2e-3)
    with MemoryMonitor(device="cuda") as memory:
        block = torch.ones(64 << 20, device="cuda")  # 256 MiB
        del block
    assert memory.peak_device_bytes >= 256 << 20 and "peak device memory" in memory.describe()


def conv_model_path(tmp_path):
    import onnx
    from helpers import make_model
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool")]
    weights = {"w": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 8, "b": rng.standard_normal(16).astype(np.float32)}
    path = tmp_path / "conv.onnx"
    onnx.save(make_model(nodes, {"x": (np.float32, [2, 8, 32, 32])}, ["y"], weights), str(path))
    return path


def test_kiln_cuda_engine_through_bench_compare_and_doctor(tmp_path):
    import kiln
    from kiln.tools.bench import benchmark, sample_feed
    from kiln.tools.compare import compare
    from kiln.tools.doctor import diagnose

    path = conv_model_path(tmp_path)
    engine = kiln.build(str(path), kiln.BuilderConfig(device="cuda"))
    feed = sample_feed(engine)
    result, _, _ = compare(str(path), engine, feed, atol=1e-3, rtol=1e-3, layerwise=True)
    assert result.passed and result.layers, result.to_json()
    for graph in (False, True):
        timed = benchmark(engine, feed, warmup_ms=0, iterations=10, duration_s=0, use_cuda_graph=graph, progress=False)
        assert timed.settings["cudaGraph"] != "off" or not graph
        np.testing.assert_allclose(timed.outputs["y"], engine.run(feed)["y"], rtol=1e-5, atol=1e-6)
        assert timed.memory["peak_device_bytes"] > 0
    report = diagnose(str(path), kiln.BuilderConfig(device="cuda"))
    assert not report.blocked and report.memory["peak_device_bytes"] > 0, [f.symptom for f in report.findings if f.blocks]


def test_doctor_finds_a_launch_bound_cuda_engine(tmp_path):
    # 60 Gemms of 1x4 by 4x4: each layer measures tens of microseconds in the profile (launch + synchronisation),
    # so only the bytes they move show them tiny. Static shapes replay as the engine's own CUDA graph: said as info;
    # built with --noCudaGraph the fix is --useCudaGraph.
    import onnx
    from helpers import make_model
    from onnx import helper

    import kiln
    from kiln.tools.bench import benchmark, format_result, sample_feed
    from kiln.tools.doctor import diagnose

    rng = np.random.default_rng(0)
    nodes, weights, previous = [], {}, "x"
    for i in range(60):
        weights[f"w{i}"] = (rng.standard_normal((4, 4)) / 2).astype(np.float32)
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"t{i}"], name=f"tanh{i}")]
        previous = f"t{i}"
    path = tmp_path / "chain.onnx"
    onnx.save(make_model(nodes, {"x": (np.float32, [1, 4])}, [previous], weights), str(path))
    graphed = {f.check: f for f in diagnose(str(path), kiln.BuilderConfig(device="cuda")).findings}["launch overhead"]
    assert graphed.status == "info" and "already replays as one CUDA graph" in graphed.cause, graphed
    config = kiln.BuilderConfig(device="cuda")
    config.extra["use_cuda_graph"] = False
    eager = {f.check: f for f in diagnose(str(path), config).findings}["launch overhead"]
    assert eager.status == "warning" and "--useCudaGraph" in eager.fix and eager.details["tiny_layers"] >= 50, eager
    engine = kiln.build(str(path), config)
    text = format_result(benchmark(engine, sample_feed(engine), warmup_ms=0, iterations=5, duration_s=0, progress=False))
    assert "host-to-device" in text and "device-to-host" in text and "peak device" in text, text
