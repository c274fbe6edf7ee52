"""The fast int8 CPU tactics (oneDNN int8 convolution, torch._int_mm) compute what kiln::QConv / kiln::QGemm's
reference kernels compute: residual, activation, groups, stride and padding included."""
import numpy as np
import torch
from onnx import helper

import kiln
from helpers import make_model


def _residual_model(rng):
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    weights = {"w1": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, "b1": rng.standard_normal(8).astype(np.float32),
               "w2": rng.standard_normal((8, 2, 3, 3)).astype(np.float32) * 0.2, "b2": rng.standard_normal(8).astype(np.float32),
               "w3": rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.2,
               "fc": rng.standard_normal((16 * 5 * 5, 6)).astype(np.float32) * 0.05}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=4),
             helper.make_node("Add", ["c2", "x"], ["s"]),
             helper.make_node("Relu", ["s"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], strides=[2, 2]),
             helper.make_node("Flatten", ["c3"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    return make_model(nodes, {"x": x}, ["y"], weights), x


def test_fast_int8_tactics_match_reference_kernels():
    from kiln.backends.cpu.program import CpuProgram
    from kiln.quant.cpu_tactics import exact_int8_dot_products
    from kiln.tensors import numpy_to_torch

    rng = np.random.default_rng(0)
    model, x = _residual_model(rng)
    calib = [{"x": rng.standard_normal(x.shape).astype(np.float32)} for _ in range(4)]
    engine = kiln.build(model, kiln.BuilderConfig(int8=True, calib=calib, layer_precisions={"*": "int8"}))
    tactics = {row["op"]: row["tactic"] for row in engine.plan.layers.values() if row["precision"] == "int8"}
    exact = exact_int8_dot_products()  # without VNNI / AMX-INT8 oneDNN's int8 sums saturate: the reference kernel runs
    assert tactics == {"kiln::QConv": "onednn-int8" if exact else "torch-int8", "kiln::QGemm": "torch-int8"}
    assert engine.plan.build_info["counters"]["int8_layers"] == 4
    reference = CpuProgram(engine.plan.graph)  # the registered reference kernels of the same int8 graph
    with torch.inference_mode():
        want = reference.execute({"x": numpy_to_torch(x)})["y"].numpy()
    got = engine.run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_int8_convolutions_skip_onednn_on_a_cpu_without_vnni(monkeypatch):
    """oneDNN's AVX2 int8 kernels saturate 16-bit partial sums: without VNNI / AMX-INT8 the exact reference runs."""
    from kiln.engine import target
    from kiln.quant import cpu_tactics

    model, x = _residual_model(np.random.default_rng(1))
    calib = [{"x": x}]
    monkeypatch.setattr(target, "cpu_features", lambda: frozenset({"avx2", "fma"}))
    engine = kiln.build(model, kiln.BuilderConfig(int8=True, calib=calib, layer_precisions={"*": "int8"}))
    assert {row["tactic"] for row in engine.plan.layers.values() if row["op"] == "kiln::QConv"} == {"torch-int8"}
    assert not cpu_tactics.exact_int8_dot_products()
    monkeypatch.setattr(target, "cpu_features", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert cpu_tactics.exact_int8_dot_products()


def test_fp8_pass_gives_matrix_layers_their_calibrated_input_range():
    """--fp8 (a CUDA build) calibrates and sets x_amax, the largest |x| seen, on each kiln::Gemm; nothing is rewritten."""
    from kiln.frontend import parse_with_profiles
    from kiln.passes.context import PassContext
    from kiln.passes.pipeline import optimize

    rng = np.random.default_rng(0)
    model, x = _residual_model(rng)
    calib = [{"x": rng.standard_normal(x.shape).astype(np.float32)} for _ in range(3)]
    config = kiln.BuilderConfig(fp8=True, calib=calib)  # not validated: the CPU refuses fp8, the pass does not care
    graph, _ = parse_with_profiles(model, config)
    ctx = optimize(graph, PassContext(config=config), config=config)
    gemms = [n for n in graph.nodes if n.op_key == "kiln::Gemm"]
    assert len(gemms) == 1 and ctx.counters["fp8_calibrated_layers"] == 1
    assert not any(n.op in ("QGemm", "QConv") for n in graph.nodes)
    assert np.isfinite(gemms[0].attrs["x_amax"]) and gemms[0].attrs["x_amax"] > 0
