"""`kiln inspect m.kiln`: the layers after fusion, and --export-onnx writing the optimized graph as ONNX."""
import json
import subprocess
import sys

import numpy as np
import onnx
from helpers import make_model
from onnx import helper

import kiln


def conv_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "s": np.ones(4, np.float32),
             "t": np.zeros(4, np.float32), "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32)}
    return make_model(nodes, {"x": np.zeros((1, 3, 8, 8), np.float32)}, ["y"], inits)


def kiln_cli(*args):
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True)


def test_inspect_lists_fused_layers_and_exports_onnx(tmp_path):
    kiln.build(conv_model()).save(tmp_path / "m.kiln")
    result = kiln_cli("inspect", str(tmp_path / "m.kiln"), "--json", "--export-onnx", str(tmp_path / "fused.onnx"))
    assert result.returncode == 0, result.stderr
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["op"] == "kiln::Conv" and layer["origin"] == ["conv", "bn", "relu"]
    # which kernel runs it the build decides by timing: oneDNN's, or (3 input channels) kiln's stem kernel
    assert layer["precision"] == "fp32" and layer["tactic"] in {"onednn-packed", "onednn-primitive", "native-stem"}
    assert layer["input_shapes"] == ["float32[1x3x8x8]"] and layer["output_shapes"] == ["float32[1x4x8x8]"]
    model = onnx.load(str(tmp_path / "fused.onnx"))
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "kiln" and node.op_type == "Conv" and attrs["activation"] == b"relu"
    assert attrs["kiln_origin"] == [b"conv", b"bn", b"relu"]
    assert {o.domain: o.version for o in model.opset_import}["kiln"] == 1
    assert layer["tactic"] in node.doc_string


def test_export_onnx_of_a_model_is_a_clear_error(tmp_path):
    onnx.save(conv_model(), str(tmp_path / "m.onnx"))
    result = kiln_cli("inspect", str(tmp_path / "m.onnx"), "--export-onnx", str(tmp_path / "fused.onnx"))
    assert result.returncode != 0 and "KILN-E501" in result.stderr and "needs a .kiln engine" in result.stderr
