"""kiln doctor: each check finds its problem (symptom, cause, fix), --fix converts old opsets, --json, exit codes."""
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper

from kiln.builder import BuilderConfig
from kiln.cli import main
from kiln.tools.compare import run_reference  # onnxruntime, at an IR version it reads
from kiln.tools import doctor


def save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def mlp(batch=2, opset=18):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, {"x": (np.float32, [batch, 8])}, ["y"], {"w": rng.standard_normal((8, 4)).astype(np.float32)}, opset=opset)


def by_check(report):
    return {f.check: f for f in report.findings}


def test_a_healthy_model_passes_and_reports_memory(tmp_path, capsys):
    report = doctor.diagnose(save(tmp_path, mlp()), BuilderConfig())
    found = by_check(report)
    assert not report.blocked
    for check in ("opset", "operators", "dynamic shapes", "fp16 overflow", "precision fallback", "memory", "launch overhead"):
        assert found[check].status == "ok", (check, found[check])
    assert found["calibration"].status == "n/a" and found["input shapes"].status == "n/a"
    assert report.memory["peak_host_bytes"] > 0 and report.memory["latency_ms"]["median"] > 0
    assert found["memory"].details["weights_bytes"] == 8 * 4 * 4  # the weight, float32
    assert main(["doctor", save(tmp_path, mlp()), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["blocked"] and {"check", "status", "symptom", "cause", "fix", "code", "blocks"} <= set(data["findings"][0])


def test_unsupported_operator_blocks_with_the_frontends_way_out(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Frobnicate", ["r"], ["y"], domain="my.ops", name="frob")]
    model = make_model(nodes, {"x": (np.float32, [2])}, ["y"])
    model.opset_import.append(helper.make_opsetid("my.ops", 1))
    path = save(tmp_path, model)
    finding = by_check(doctor.diagnose(path, BuilderConfig()))["operators"]
    assert finding.status == "error" and finding.code == "KILN-E101" and "my.ops::Frobnicate" in finding.symptom
    assert "plugin" in finding.fix and finding.details["nodes"][0]["node"] == "frob"
    assert main(["doctor", path]) == 1
    text = capsys.readouterr().out
    assert "[ERROR] operators" in text and "cause:" in text and "fix:" in text and "blocked by: operators" in text


def test_old_opset_is_converted_by_fix(tmp_path):
    path = save(tmp_path, mlp(opset=9))
    finding = by_check(doctor.diagnose(path, BuilderConfig()))["opset"]
    assert finding.status == "info" and "--fix" in finding.fix
    fixed = str(tmp_path / "fixed.onnx")
    assert main(["doctor", path, "--fix", "--output", fixed]) == 0
    model = onnx.load(fixed)
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run_reference(model, {"x": x})["y"], run_reference(mlp(), {"x": x})["y"], rtol=1e-6)


def test_opset_too_new_blocks(tmp_path):
    model = mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    report = doctor.diagnose(save(tmp_path, model), BuilderConfig())
    finding = by_check(report)["opset"]
    assert report.blocked and finding.code == "KILN-E103" and "newer" in finding.symptom


def test_dynamic_dims_without_profile_and_with_shapes(tmp_path):
    path = save(tmp_path, mlp(batch="batch"))
    report = doctor.diagnose(path, BuilderConfig())
    finding = by_check(report)["dynamic shapes"]
    assert finding.status == "error" and finding.code == "KILN-E202" and "--minShapes x:" in finding.fix and report.blocked
    covered = doctor.diagnose(path, BuilderConfig(), shapes={"x": (4, 8)})
    assert by_check(covered)["dynamic shapes"].status == "ok" and not covered.blocked
    assert main(["doctor", path, "--shapes", "x:4x8"]) == 0


def test_batch_mismatch_against_a_given_input(tmp_path, capsys):
    path = save(tmp_path, mlp(batch=2))
    finding = by_check(doctor.diagnose(path, BuilderConfig(), given={"x": np.ones((5, 8), np.float32)}))["input shapes"]
    assert finding.status == "error" and finding.code == "KILN-E405" and finding.symptom.startswith("batch size mismatch")
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    assert main(["doctor", path, "--input", f"x={tmp_path / 'x.npy'}"]) == 0
    assert "[ok] input shapes" in capsys.readouterr().out


def test_fp16_overflow_seen_on_sample_data(tmp_path):
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="amplify"), helper.make_node("Div", ["big", "k"], ["y"], name="shrink")]
    model = make_model(nodes, {"x": (np.float32, [64])}, ["y"], {"k": np.float32([1e6])})
    path = save(tmp_path, model)
    finding = by_check(doctor.diagnose(path, BuilderConfig()))["fp16 overflow"]
    assert finding.status == "info" and "big" in finding.symptom and finding.details["tensors"][0]["tensor"] in ("big", "k")
    assert by_check(doctor.diagnose(path, BuilderConfig(best=True)))["fp16 overflow"].status == "warning"


def test_calibration_missing_unrepresentative_and_good(tmp_path):
    path = save(tmp_path, mlp())
    missing = by_check(doctor.diagnose(path, BuilderConfig(int8=True)))["calibration"]
    assert missing.status == "error" and missing.code == "KILN-E302"
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    narrow.mkdir(), wide.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        np.savez(narrow / f"{i}.npz", x=rng.uniform(0, 0.05, (2, 8)).astype(np.float32))
        np.savez(wide / f"{i}.npz", x=(8 * rng.standard_normal((2, 8))).astype(np.float32))
    bad = by_check(doctor.diagnose(path, BuilderConfig(int8=True, calibrator="minmax"), calib=str(narrow)))["calibration"]
    assert bad.status == "warning" and "unrepresentative" in bad.symptom
    rates = {row["tensor"]: row["clipping_rate"] for row in bad.details["tensors"]}
    w = onnx.numpy_helper.to_array(mlp().graph.initializer[0]).astype(np.float64)
    calibrated = np.concatenate([np.load(narrow / f"{i}.npz")["x"].astype(np.float64) @ w for i in range(3)])
    sample = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32).astype(np.float64) @ w  # doctor's sample
    expected = np.mean(np.abs(sample) > np.abs(calibrated).max())  # minmax: the threshold is the largest |x| calibrated
    assert rates["h"] == pytest.approx(expected, abs=1 / sample.size) and rates["h"] > 0.01
    good = by_check(doctor.diagnose(path, BuilderConfig(int8=True), calib=str(wide)))["calibration"]
    assert good.status == "ok" and good.details["batches"] == 3


def test_memory_beyond_what_is_available_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("kiln.tools.memory.host_available_bytes", lambda: 100)
    finding = by_check(doctor.diagnose(save(tmp_path, mlp(batch=64)), BuilderConfig()))["memory"]
    assert finding.status == "error" and finding.code == "KILN-E601" and finding.blocks


def test_peak_live_bytes_frees_after_last_use():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Relu", ["b"], ["y"])]
    model = make_model(nodes, {"x": (np.float32, [100])}, ["y"])
    values = {name: np.zeros(100, np.float32) for name in ("a", "b", "y")}
    # each Relu holds its input and its output; everything else is freed: two tensors at a time, never all four
    assert doctor.peak_live_bytes(model, values, {"x": np.zeros(100, np.float32)}) == 2 * 400


def test_precision_fallback_and_launch_bound_findings():
    engine = SimpleNamespace(device="cuda", plan=SimpleNamespace(layers={
        "conv": {"op": "Conv", "precision": "bf16"}, "norm": {"op": "LayerNormalization", "precision": "fp32"},
        "gather": {"op": "Gather", "precision": "bf16", "fallback": "no bf16 tactic"},
        "pool": {"op": "MaxPool", "precision": "follow"}, "old_pool": {"op": "MaxPool", "precision": "input"}}))
    finding = doctor.check_precision_fallback(engine, ["fp32", "bf16"])
    assert finding.status == "warning" and "2 of 5 layers" in finding.symptom and "LayerNormalization" in finding.symptom
    assert doctor.check_precision_fallback(engine, ["fp32"]).symptom.startswith("1 of 5")
    tactics = SimpleNamespace(device="cpu", plan=SimpleNamespace(layers={
        "conv1": {"op": "kiln::Conv", "precision": "fp32", "tactic": "onednn-packed"},
        "conv2": {"op": "kiln::Conv", "precision": "fp32", "tactic": "torch"}, "relu": {"op": "Relu", "tactic": "torch"}}))
    slow = doctor.check_precision_fallback(tactics, ["fp32"])
    assert slow.status == "warning" and [f["layer"] for f in slow.details["layers"]] == ["conv2"]
    tiny = [{"name": f"l{i}", "averageMs": 0.05} for i in range(60)]
    small = {f"l{i}": 1 << 10 for i in range(60)}
    engine.program = SimpleNamespace(use_cuda_graph=False)
    assert doctor.check_launch_bound(engine, tiny, small).status == "warning"
    assert "--useCudaGraph" in doctor.check_launch_bound(engine, tiny, small).fix
    engine.program.use_cuda_graph = True  # already a graph: said, and no warning
    graphed = doctor.check_launch_bound(engine, tiny, small)
    assert graphed.status == "info" and "already replays as one CUDA graph" in graphed.cause
    assert doctor.check_launch_bound(SimpleNamespace(device="cpu"), tiny, small).status == "info"
    assert doctor.check_launch_bound(engine, tiny[:10], small).status == "ok"
    # 2 MiB layers are no tiny kernels on either device, however long the profile says they took
    assert doctor.check_launch_bound(engine, tiny, {name: 2 << 20 for name in small}).status == "ok"
    # tiny layers that take under half the time do not make the engine launch-bound
    heavy = tiny[:31] + [dict(layer, averageMs=5.0) for layer in tiny[31:]]
    assert doctor.check_launch_bound(engine, heavy, dict(small, **{f"l{i}": 2 << 20 for i in range(31, 60)})).status == "ok"


def matmul_chain(width, layers=60):
    """x @ w0 -> tanh -> ... : `layers` Gemms of width x width on a batch of 1."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], {}, "x"
    for i in range(layers):
        weights[f"w{i}"] = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"t{i}"], name=f"tanh{i}")]
        previous = f"t{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"], name="out"))
    return make_model(nodes, {"x": (np.float32, [1, width])}, ["y"], weights)


def test_launch_bound_engine_of_many_tiny_layers(tmp_path):
    # 60 Gemms of 1x4 by 4x4 (a hundred bytes each): every layer is dispatch overhead. Measured per layer they
    # take tens of microseconds (kiln's step, oneDNN's call), which a time threshold of 20 us called fine.
    report = doctor.diagnose(save(tmp_path, matmul_chain(4)), BuilderConfig())
    finding = by_check(report)["launch overhead"]
    assert finding.status == "info" and finding.symptom.startswith("many tiny layers") and "larger batch" in finding.fix
    assert finding.details["tiny_layers"] == finding.details["layers"] == 61  # 60 Gemm+Tanh and the Identity
    # The same chain 512 wide reads a 1 MiB weight per layer: real work, not launch-bound.
    wide = by_check(doctor.diagnose(save(tmp_path, matmul_chain(512), "wide.onnx"), BuilderConfig()))["launch overhead"]
    assert wide.status == "ok" and wide.details["tiny_layers"] <= 1, wide.symptom


def test_layer_bytes_are_the_tensors_each_layer_reads_and_writes():
    import kiln

    engine = kiln.build(matmul_chain(8, layers=2))
    sizes = doctor.layer_bytes(engine, {"x": np.ones((1, 8), np.float32)})
    # mm0: x (1x8) in, its weight (8x8, as the engine stores it), t0 (1x8) out; float32
    assert sizes["mm0"] == 4 * (8 + 8 * 8 + 8), sizes
    assert sizes["out"] == 2 * 4 * 8


def conv_pool_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["p", "p"], ["cat"], name="concat", axis=1),
             helper.make_node("Flatten", ["cat"], ["y"], name="flatten")]
    return make_model(nodes, {"x": (np.float32, [1, 3, 16, 16])}, ["y"], {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32)})


def cpu_bf16() -> bool:
    from kiln.backends.cpu.fast import bf16_supported

    return bf16_supported()


@pytest.mark.skipif(not cpu_bf16(), reason="this CPU has no AVX512-BF16/AMX, so kiln builds no bf16 CPU engine")
def test_bf16_build_layers_that_follow_their_input_are_no_fallback(tmp_path):
    # The CPU backend labels pooling, concatenation and reshapes "follow" in a bf16 engine: they run in the type
    # their input arrives in. Only a layer that really runs in fp32 while bf16 was asked for is a fallback.
    report = doctor.diagnose(save(tmp_path, conv_pool_model()), BuilderConfig(bf16=True))
    finding = by_check(report)["precision fallback"]
    assert finding.status == "ok", finding.symptom
    assert "bf16" in finding.symptom and not report.blocked
    # its 3-channel convolution may take the stem kernel, whose undilated form computes in bf16: no fp32 stem to name
    assert ("native-stem" in finding.symptom) == bool(finding.details["fp32_stems"])
    assert not finding.details["fp32_stems"]


def test_int8_layers_kept_fp32_because_faster_are_no_fallback(tmp_path):
    layers = {"conv": {"op": "kiln::Conv", "precision": "fp32", "tactic": "onednn-packed"},
              "conv2": {"op": "kiln::Conv", "precision": "int8", "tactic": "onednn-int8"},
              "pool": {"op": "MaxPool", "precision": "fp32", "tactic": "torch-pool"}}
    decisions = {"conv": {"precision": "fp32", "int8_ms": 0.3, "fp32_ms": 0.2, "why": "int8 slower on this CPU"},
                 "conv2": {"precision": "int8", "int8_ms": 0.1, "fp32_ms": 0.2, "why": "faster"}}
    engine = SimpleNamespace(device="cpu", plan=SimpleNamespace(layers=layers, build_info={"quantization": {"layers": decisions}}))
    finding = doctor.check_precision_fallback(engine, ["fp32", "int8"])
    assert [f["layer"] for f in finding.details["layers"]] == ["pool"]  # no int8 pooling: a real fallback
    assert "1 of 3 layers" in finding.symptom and "conv 0.3 vs 0.2 ms" in finding.symptom
    del layers["pool"]
    assert doctor.check_precision_fallback(engine, ["fp32", "int8"]).status == "ok"
    # A real int8 build: whichever way its timings went, no layer it kept in fp32 for speed is listed as a fallback.
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        np.savez(calib / f"{i}.npz", x=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    report = doctor.diagnose(save(tmp_path, conv_pool_model()), BuilderConfig(int8=True, calib=str(calib)))
    found = by_check(report)["precision fallback"]
    kept = set(found.details["kept_fp32_by_timing"])
    assert not kept & {f["layer"] for f in found.details.get("layers", [])}
    assert all(d["precision"] == "fp32" and d["int8_ms"] >= d["fp32_ms"] for d in found.details["kept_fp32_by_timing"].values())


def test_unreadable_model_is_a_finding(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    report = doctor.diagnose(str(tmp_path / "junk.onnx"), BuilderConfig())
    assert report.blocked and report.findings[0].code == "KILN-E104"


def test_engine_files_damaged_foreign_target_and_healthy(tmp_path, capsys):
    import kiln

    engine = kiln.build(mlp())
    path = tmp_path / "mlp.kiln"
    engine.save(str(path))
    report = doctor.diagnose(str(path), BuilderConfig())
    found = by_check(report)
    assert not report.blocked and found["engine file"].status == "ok" and found["memory"].status == "ok"
    assert found["launch overhead"].status == "ok" and report.memory["peak_host_bytes"] > 0
    mismatch = by_check(doctor.diagnose(str(path), BuilderConfig(), given={"x": np.ones((3, 8), np.float32)}))["input shapes"]
    assert mismatch.status == "error" and mismatch.symptom.startswith("batch size mismatch")
    blob = path.read_bytes()
    (tmp_path / "cut.kiln").write_bytes(blob[: len(blob) // 2])
    assert main(["doctor", str(tmp_path / "cut.kiln")]) == 1
    assert "KILN-E502" in capsys.readouterr().out
    engine.plan.target["machine"] = "sparc64"
    engine.save(str(tmp_path / "foreign.kiln"))
    foreign = doctor.diagnose(str(tmp_path / "foreign.kiln"), BuilderConfig())
    assert foreign.blocked and foreign.findings[0].code == "KILN-E505" and "rebuild" in foreign.findings[0].fix


def test_planned_activations_come_from_the_cpu_plan_or_the_cuda_lowering():
    cpu = SimpleNamespace(plan=SimpleNamespace(memory={"peak_bytes": 4096}, build_info={}))
    cuda = SimpleNamespace(plan=SimpleNamespace(memory={}, build_info={"cuda_tuning": {"activation_bytes": 8192}}))
    neither = SimpleNamespace(plan=SimpleNamespace(memory={}, build_info={}))
    assert [doctor.planned_activation_bytes(e) for e in (cpu, cuda, neither)] == [4096, 8192, None]


def conv_model(batch: int = 1):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, {"x": (np.float32, [batch, 16, 12, 12])}, ["y"],
                      {"w": (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)})


def test_native_kernels_missing_is_a_warning_with_the_way_out(tmp_path, monkeypatch):
    from kiln.backends.cpu import native

    if native.available()[0]:
        finding = by_check(doctor.diagnose(save(tmp_path, conv_model()), BuilderConfig()))["native kernels"]
        assert finding.status == "ok" and "of 1 convolution" in finding.symptom
    monkeypatch.setattr(native, "available", lambda: (False, "no C++ compiler found (set CXX, or install g++)"))
    finding = by_check(doctor.diagnose(save(tmp_path, conv_model()), BuilderConfig()))["native kernels"]
    assert finding.status == "warning" and "no C++ compiler" in finding.symptom and "g++" in finding.fix
    assert by_check(doctor.diagnose(save(tmp_path, mlp()), BuilderConfig()))["native kernels"].status == "n/a"


def test_onednn_primitives_missing_is_a_warning_with_the_way_out(tmp_path, monkeypatch):
    from kiln.backends.cpu import native, onednn, select

    # oneDNN wins every layer's race, so that the convolution stays on oneDNN
    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {name: select.ONEDNN for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.ONEDNN)
    if onednn.available()[0]:
        finding = by_check(doctor.diagnose(save(tmp_path, conv_model()), BuilderConfig()))["oneDNN primitives"]
        assert finding.status == "ok" and finding.symptom.startswith("1 of 1 oneDNN convolution")
    monkeypatch.setattr(onednn, "available", lambda: (False, "no oneDNN headers and library under /venv"))
    monkeypatch.setattr(native, "available", lambda: (False, "disabled by the test"))
    finding = by_check(doctor.diagnose(save(tmp_path, conv_model()), BuilderConfig()))["oneDNN primitives"]
    assert finding.status == "warning" and "no oneDNN headers" in finding.symptom and "onednn-devel-cpu-gomp" in finding.fix
    assert by_check(doctor.diagnose(save(tmp_path, mlp()), BuilderConfig()))["oneDNN primitives"].status == "n/a"
    if cpu_bf16():  # a bf16 engine's convolutions on oneDNN are diagnosed alike
        finding = by_check(doctor.diagnose(save(tmp_path, conv_model()), BuilderConfig(bf16=True)))["oneDNN primitives"]
        assert finding.status == "warning" and "no oneDNN headers" in finding.symptom
