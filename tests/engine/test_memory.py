"""The memory plan: lifetimes, buffer sharing, the lower bound, and what `kiln inspect` reports of it."""
import json
import subprocess
import sys

import numpy as np
from helpers import make_model
from onnx import helper

import kiln
from kiln.engine.memory import ALIGNMENT, plan_memory
from kiln.frontend.onnx import parse


def chain_model():
    # a = relu(x); b = relu(a); c = a + b; y = relu(c): at the Add, a, b and c are all live.
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, {"x": np.zeros((4, 64), np.float32)}, ["y"])


def test_buffers_are_shared_by_lifetime():
    memory = plan_memory(parse(chain_model()))
    size = 4 * 64 * 4
    assert memory["naive_bytes"] == 4 * size
    assert memory["lower_bound_bytes"] == 3 * size
    assert memory["peak_bytes"] == 3 * size, "y reuses a's or b's bytes"
    buffers = {b["value"]: b for b in memory["buffers"]}
    assert buffers["y"]["last"] == 4, "a graph output lives to the end"
    for one in memory["buffers"]:
        assert one["offset"] % ALIGNMENT == 0
        for other in memory["buffers"]:
            if one is other or one["last"] < other["first"] or other["last"] < one["first"]:
                continue
            assert one["offset"] + one["bytes"] <= other["offset"] or other["offset"] + other["bytes"] <= one["offset"], \
                f"{one['value']} and {other['value']} are live together but overlap"


def test_symbolic_dims_are_planned_at_one_and_said_so():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    memory = plan_memory(parse(make_model(nodes, {"x": (np.float32, ["batch", 8])}, ["y"])))
    assert memory["assumed"] == {"batch": 1}
    assert memory["peak_bytes"] == 2 * ALIGNMENT


def test_inspect_reports_peak_naive_and_bound(tmp_path):
    kiln.build(chain_model(), kiln.BuilderConfig(optimize=False)).save(tmp_path / "m.kiln")  # keep all four buffers
    command = [sys.executable, "-m", "kiln", "inspect", str(tmp_path / "m.kiln")]
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "activation memory: peak 0.00 MB" in text and "naive sum" in text and "lower bound" in text
    report = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert report["memory"]["peak_bytes"] == 3 * 4 * 64 * 4 and report["memory"]["naive_bytes"] == 4 * 4 * 64 * 4
    assert [layer["output_shapes"] for layer in report["layers"]][0] == ["float32[4x64]"]


def test_derived_dimensions_are_planned_at_the_profiles_sizes():
    from kiln.engine.memory import lifetimes
    from kiln.ir import DType, Graph, Node, Value

    x = Value("x", DType.float32, ("batch", 4))
    doubled = Value("d", DType.float32, ("2*batch", 4))
    odd = Value("o", DType.float32, ("unk__0", 4))
    graph = Graph([Node("Concat", ("x", "x"), ("d",), {"axis": 0}, "cat"), Node("Relu", ("d",), ("o",), {}, "relu")],
                  [x], [odd], values={"x": x, "d": doubled, "o": odd})
    tensors, unknown, assumed = lifetimes(graph, {"batch": 5})
    # d: 2*5 x 4 float32 = 160 bytes, aligned to 64; o: its unknown at 1, 16 bytes, aligned
    assert {t.name: t.size for t in tensors} == {"d": 192, "o": 64} and assumed == {"unk__0": 1}
