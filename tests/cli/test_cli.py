"""The kiln command: build, run, inspect, ops; exit codes 0 / 1 (KilnError, no traceback) / 2 (usage)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import LIGHT

import kiln
from kiln.cli import main

SQUEEZENET = str(LIGHT / "light_squeezenet.onnx")


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "squeezenet.kiln"
    assert main(["build", SQUEEZENET, "--saveEngine", str(path)]) == 0
    return path


def test_build_reports_the_engine(engine_path, capsys):
    assert engine_path.exists()
    assert main(["build", SQUEEZENET, "--saveEngine", str(engine_path)]) == 0
    out = capsys.readouterr().out
    assert "data_0: float32[1x3x224x224]" in out and "layers for cpu" in out


def test_verbose_build_logs_parsing_passes_and_lowering(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "build", SQUEEZENET, "--saveEngine", str(tmp_path / "s.kiln"), "--verbose"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for words in ("converting model from opset 9", "parsed", "pass constant_folding", "constant_folding: folded",
                  "lowered to", "steps per tactic", "built cpu engine"):
        assert words in result.stderr, words
    # the per-step summary: one line per layer of the engine, with its op, precision, tactic and shapes
    steps = [line for line in result.stderr.splitlines() if line.startswith("[kiln VERBOSE] step ")]
    engine = kiln.load(tmp_path / "s.kiln")
    assert len(steps) == len(engine.plan.graph.nodes) > 0
    first = engine.plan.graph.nodes[0]
    assert first.name in steps[0] and "fp32" in steps[0] and "float32[1x3x224x224] ->" in steps[0]
    assert engine.plan.layers[first.name]["tactic"] in steps[0]


def test_run_with_random_inputs_and_output_dir(engine_path, tmp_path, capsys):
    assert main(["run", str(engine_path), "--output-dir", str(tmp_path)]) == 0
    assert "softmaxout_1: float32[1, 1000, 1, 1]" in capsys.readouterr().out
    assert np.load(tmp_path / "softmaxout_1.npy").shape == (1, 1000, 1, 1)


def test_run_with_an_input_file(engine_path, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(engine_path), "--input", f"data_0={tmp_path / 'x.npy'}"]) == 0
    np.save(tmp_path / "bad.npy", x[0])
    assert main(["run", str(engine_path), "--input", f"data_0={tmp_path / 'bad.npy'}"]) == 1
    assert "KILN-E404" in capsys.readouterr().err


def test_inspect_model_and_engine(engine_path, capsys):
    assert main(["inspect", SQUEEZENET]) == 0
    text = capsys.readouterr().out
    assert "opset 9" in text and "Conv" in text and "every node is supported" in text
    assert main(["inspect", str(engine_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "engine" and report["inputs"][0]["name"] == "data_0" and report["layers"]


def test_inspect_text_shows_int8_inputs_and_the_whole_engine_choice():
    """A CUDA engine's report (as inspect_engine reads it from the file): layers that take int8 from the layer before
    say so, and the whole-engine variants the build timed are listed with the one it kept."""
    from kiln.tools.inspect import format_report

    binding = {"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8], "dynamic": False}
    layer = {"name": "conv2", "op": "kiln::QConv", "origin": ["Conv_2"], "precision": "int8",
             "tactic": "triton-int8-implicit-gemm-64x64x64", "int8_inputs": ["input", "residual"]}
    report = {"kind": "engine", "path": "e.kiln", "size_bytes": 10, "weights_bytes": 4, "memory": {},
              "target": {"device": "cuda", "name": "H200", "capability": "90"}, "inputs": [binding], "outputs": [binding],
              "build_info": {"cuda_tuning": {"whole_engine_ms": {"per-layer choice": 3.403, "int8 hand-off": 3.305},
                                             "variant_layers": {
                                                 "per-layer choice": {"conv1": ["cudnn/fp16", 0.2], "conv2": ["cudnn/fp16", 0.1],
                                                                      "add": ["fused into norm/fp16", None]},
                                                 "int8 hand-off": {"conv1": ["cudnn/fp16", 0.2], "conv2": ["triton/int8", 0.075],
                                                                   "add": ["fused into norm/fp16", None]}}}},
              "layers": [layer, {**layer, "name": "conv1", "int8_inputs": []}]}
    text = format_report(report)
    assert "(int8 input and residual in)" in text and text.count("int8 input") == 1
    assert "whole engine: kept 'int8 hand-off' of the variants timed whole (per-layer choice 3.403 ms, int8 hand-off 3.305 ms)" in text
    assert "'per-layer choice' ran other tactics in 1 layer(s), timed one by one there 0.100 ms against 0.075 ms" in text
    report["build_info"] = {}
    assert "whole engine" not in format_report(report)


def test_inspect_shows_dynamic_dims_and_unsupported_nodes(tmp_path, capsys):
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mystery", ["a"], ["y"], domain="com.acme")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.acme", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"][0]["shape"] == ["batch", 4] and report["inputs"][0]["dynamic"]
    assert report["unsupported"][0]["op"] == "Mystery"


def test_ops_lists_the_registry(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "Conv" in out and "MatMul" in out and "operators" in out


def test_kiln_error_exits_1_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(tmp_path / "nope.kiln")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "KILN-E501" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(tmp_path / "nope.kiln"), "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_error_exits_2():
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "build"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
