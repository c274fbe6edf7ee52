"""Plugins: registering custom operators, their shape/dtype rules, engines that record them, and the
documented Mish example run end to end (build, save, load in a fresh process, run, compare)."""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper

import kiln
from kiln.ir import DType
from kiln.plugins import kernel_for_device, unregister_plugin

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "test.kiln.plugins"


@pytest.fixture(autouse=True)
def _forget_test_plugins():
    yield
    for op in ("SplitScaled", "Cube"):
        unregister_plugin(op, DOMAIN)


def _register_split_scaled(version="1.0", **options):
    # Two outputs and an attribute: the halves of x along `axis`, the second one times `scale`.
    def infer(inputs, attrs):
        x = inputs[0]
        axis = attrs.get("axis", 0) % len(x.shape)
        half = x.shape[axis] // 2 if isinstance(x.shape[axis], int) else None
        shape = tuple(half if i == axis else d for i, d in enumerate(x.shape))
        return [(x.dtype, shape), (x.dtype, shape)]

    @kiln.plugin("SplitScaled", domain=DOMAIN, version=version, infer=infer, **options)
    def split_scaled(x, *, axis: int = 0, scale: float = 1.0):
        first, second = x.chunk(2, dim=axis)
        return first, second * scale


def _split_scaled_model(domain_opset=1):
    nodes = [helper.make_node("SplitScaled", ["x"], ["a", "b"], domain=DOMAIN, axis=1, scale=3.0),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "plugin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, domain_opset)])


def _build(model):
    config = kiln.BuilderConfig()
    config.add_profile({"x": ((1, 6), (4, 6), (8, 6))})
    return kiln.build(model, config)


def test_plugin_runs_and_its_infer_rule_types_what_follows():
    _register_split_scaled()
    engine = _build(_split_scaled_model())
    # ONNX cannot infer the custom node; the plugin's rule typed a/b and ONNX carried it on to y.
    assert str(engine.outputs[0]) == "y: float32[nx3]"
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    expected = x[:, :3].astype(np.float64) + 3.0 * x[:, 3:].astype(np.float64)
    np.testing.assert_allclose(engine.run({"x": x})["y"], expected, rtol=1e-6, atol=1e-6)
    assert engine.plan.plugins == [{"name": f"{DOMAIN}::SplitScaled", "version": "1.0", "op": "SplitScaled",
                                    "domain": DOMAIN, "module": __name__}]


def test_plugin_inside_a_branch_is_recorded_and_runs():
    _register_split_scaled()
    branch = helper.make_graph([helper.make_node("SplitScaled", ["x"], ["a", "b"], domain=DOMAIN, axis=1, scale=-1.0),
                                helper.make_node("Mul", ["a", "b"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Slice", ["x", "zero", "three", "one"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("zero", 0), ("three", 3), ("one", 1))]
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)], "nested",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    engine = kiln.build(model)
    assert [p["name"] for p in engine.plan.plugins] == [f"{DOMAIN}::SplitScaled"]
    x = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(engine.run({"x": x, "flag": np.array(True)})["y"], -x[:, :3] * x[:, 3:], rtol=1e-6)
    np.testing.assert_array_equal(engine.run({"x": x, "flag": np.array(False)})["y"], x[:, :3])


def test_engine_needs_the_same_plugin_version_to_load():
    _register_split_scaled("1.0")
    blob = _build(_split_scaled_model()).serialize()
    unregister_plugin("SplitScaled", DOMAIN)
    with pytest.raises(kiln.KilnError) as caught:
        kiln.load(blob)
    assert caught.value.code == "KILN-E506" and f"{DOMAIN}::SplitScaled" in str(caught.value)
    assert "import " + __name__ in caught.value.hint
    _register_split_scaled("2.0")
    with pytest.raises(kiln.KilnError) as caught:
        kiln.load(blob)
    assert caught.value.code == "KILN-E506" and "version 1.0" in str(caught.value) and "2.0" in str(caught.value)
    unregister_plugin("SplitScaled", DOMAIN)
    _register_split_scaled("1.0")
    assert kiln.load(blob).run({"x": np.ones((1, 6), np.float32)})["y"].tolist() == [[4.0, 4.0, 4.0]]


def test_opset_range_is_enforced():
    _register_split_scaled(since=1, until=2)
    with pytest.raises(kiln.KilnError) as caught:
        _build(_split_scaled_model(domain_opset=3))
    assert caught.value.code == "KILN-E101" and "covers opsets 1 to 2" in str(caught.value)


def test_custom_domain_plugin_without_infer_rule_is_refused():
    with pytest.raises(kiln.KilnError) as caught:
        kiln.plugin("Cube", domain=DOMAIN)(lambda x: x ** 3)
    assert caught.value.code == "KILN-E204" and "infer" in caught.value.hint


def test_infer_rule_that_fails_is_reported_as_the_plugins():
    kiln.plugin("Cube", domain=DOMAIN, infer=lambda inputs, attrs: [(inputs[5].dtype, None)])(lambda x: x ** 3)
    graph = helper.make_graph([helper.make_node("Cube", ["x"], ["y"], domain=DOMAIN)], "cube",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(kiln.KilnError) as caught:
        kiln.build(model)
    assert caught.value.code == "KILN-E204" and "infer rule failed" in str(caught.value)


def test_cuda_kernel_slot_is_resolved_only_for_cuda_and_imported_lazily():
    from kiln.ops import registry

    def on_cuda(x):
        return x

    kiln.plugin("Cube", domain=DOMAIN, infer=lambda i, a: [(DType.float32, None)], cuda=on_cuda)(lambda x: x ** 3)
    definition = registry.lookup("Cube", DOMAIN, 1)
    assert kernel_for_device(definition, "cuda") is on_cuda
    assert kernel_for_device(definition, "cpu") is definition.kernel
    # Bound into a program, the kernel follows its inputs: CUDA tensors go to the CUDA kernel.
    from kiln.backends.cpu.kernels import bind_kernel
    from kiln.ir import Node

    class OnCuda:  # stands in for a CUDA tensor on this GPU-less machine
        is_cuda = True

    bound = bind_kernel(Node("Cube", ("x",), ("y",), domain=DOMAIN), 1)
    marker = OnCuda()
    assert bound(marker) is marker
    import torch

    assert bound(torch.tensor([2.0])).item() == 8.0
    # A Triton launcher named by module: nothing is imported until a CUDA engine needs it.
    kiln.plugin("Cube", domain=DOMAIN, infer=lambda i, a: [(DType.float32, None)],
                cuda="kiln_test_missing_triton_kernels:cube")(lambda x: x ** 3)
    definition = registry.lookup("Cube", DOMAIN, 1)
    assert "kiln_test_missing_triton_kernels" not in sys.modules
    with pytest.raises(kiln.KilnError) as caught:
        kernel_for_device(definition, "cuda")
    assert caught.value.code == "KILN-E204" and "kiln_test_missing_triton_kernels" in str(caught.value)


def _doc_files(directory: Path) -> list[str]:
    """Write docs/plugins.md's python blocks to the files their first line names; return those names."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    names = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        name = block.splitlines()[0].removeprefix("#").strip()
        (directory / name).write_text(block)
        names.append(name)
    return names


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)]), "KILN_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_documented_mish_example_end_to_end(tmp_path, monkeypatch, capsys):
    assert _doc_files(tmp_path) == ["mish_plugin.py", "build_mish.py", "run_mish.py", "mish_triton.py"]
    compile((tmp_path / "mish_triton.py").read_text(), "mish_triton.py", "exec")  # no triton here: syntax only
    # Build here (the script registers the plugin in this process), load and run in fresh processes.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        runpy.run_path(str(tmp_path / "build_mish.py"), run_name="__main__")
    finally:
        unregister_plugin("Mish", "com.example")
        sys.modules.pop("mish_plugin", None)
    assert "y: float32[batchx4]" in capsys.readouterr().out and (tmp_path / "mish.kiln").exists()
    ran = _python(open(tmp_path / "run_mish.py").read(), tmp_path)  # a fresh process: load, run, compare
    assert ran.returncode == 0, ran.stderr
    difference = float(re.search(r"max abs difference to the reference: (\S+)", ran.stdout).group(1))
    assert difference < 1e-5
    # Without the plugin: KILN-E506 naming it and how to register it, and the file made nothing get imported.
    refused = _python("import sys, kiln\n"
                      "try:\n    kiln.load('mish.kiln')\n"
                      "except kiln.KilnError as e:\n    print(e.code, e, e.hint)\n"
                      "print('imported' if 'mish_plugin' in sys.modules else 'not imported')\n", tmp_path)
    assert refused.returncode == 0, refused.stderr
    assert "KILN-E506" in refused.stdout and "com.example::Mish" in refused.stdout
    assert "import mish_plugin" in refused.stdout and refused.stdout.strip().endswith("not imported")


def test_documented_command_line_plugins(tmp_path):
    # docs/plugins.md section 5, with the `kiln` console script (which, unlike python -m, does not put the current
    # directory on sys.path): build with --plugins MODULE, run with --plugins FILE.py, compare with float64 torch.
    _doc_files(tmp_path)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Mish", ["h"], ["a"], domain="com.example", beta=1.0), helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "mish_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "mish.onnx"))
    x = rng.standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = Path(sys.executable).with_name("kiln")
    env = {**os.environ, "KILN_PROGRESS": "0"}
    env.pop("PYTHONPATH", None)

    def kiln_command(*args, cwd=tmp_path):
        return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    built = kiln_command("build", "mish.onnx", "--plugins", "mish_plugin", "--saveEngine", "mish.kiln")
    assert built.returncode == 0, built.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = kiln_command("run", str(tmp_path / "mish.kiln"), "--plugins", str(tmp_path / "mish_plugin.py"),
                       "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", "out", cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr
    import torch

    reference = torch.relu(torch.nn.functional.mish(torch.from_numpy(x.astype(np.float64) @ weights.astype(np.float64))))
    np.testing.assert_allclose(np.load(elsewhere / "out" / "y.npy"), reference.numpy(), rtol=1e-5, atol=1e-6)
    refused = kiln_command("run", "mish.kiln")
    assert refused.returncode == 1 and "KILN-E506" in refused.stderr and "--plugins mish_plugin" in refused.stderr
    missing = kiln_command("build", "mish.onnx", "--plugins", "no_such_plugin_module")
    assert missing.returncode == 1 and "KILN-E204" in missing.stderr and "Traceback" not in missing.stderr
