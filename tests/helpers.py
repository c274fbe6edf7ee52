"""Shared test helpers: small ONNX models, references from onnxruntime, and closeness checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from kiln.tools.models import randomized_light_model  # noqa: F401 (the tests' randomized light models)

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
                "vgg19", "zfnet512"]

_ELEM = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
         np.dtype("float64"): TensorProto.DOUBLE, np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
         np.dtype("int8"): TensorProto.INT8, np.dtype("uint8"): TensorProto.UINT8, np.dtype("bool"): TensorProto.BOOL}


def make_model(nodes, inputs: dict[str, np.ndarray | tuple], outputs: list[str], initializers: dict[str, np.ndarray] | None = None,
               opset: int = 18, output_types: dict | None = None) -> onnx.ModelProto:
    """A one-graph model. `inputs` maps names to example arrays (or (dtype, shape) with symbolic dims)."""
    graph_inputs = []
    for name, example in inputs.items():
        if isinstance(example, tuple):
            dtype, shape = example
            graph_inputs.append(helper.make_tensor_value_info(name, _ELEM[np.dtype(dtype)], shape))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, _ELEM[example.dtype], example.shape))
    graph_outputs = [helper.make_tensor_value_info(name, output_types[name], None) if name in (output_types or {})
                     else helper.make_empty_tensor_value_info(name) for name in outputs]
    inits = [onnx.numpy_helper.from_array(array, name) for name, array in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", graph_inputs, graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run_onnxruntime(model: onnx.ModelProto | str, feed: dict[str, np.ndarray], unfused: bool = False) -> dict[str, np.ndarray]:
    """onnxruntime's outputs on its CPU provider; unfused: with its graph optimizations off, so that QDQ pairs run
    as written (float convolutions between DequantizeLinear and QuantizeLinear), not as its fused int8 kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if unfused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def light_input(model_name: str) -> tuple[str, np.ndarray]:
    """The input ONNX's own test runner feeds the light models: arange(n) / n, float32."""
    model = onnx.load(str(LIGHT / f"light_{model_name}.onnx"))
    weights = {t.name for t in model.graph.initializer}
    value = next(i for i in model.graph.input if i.name not in weights)
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return value.name, (np.arange(n).reshape(shape) / n).astype(np.float32)


def light_reference(model_name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{model_name}_output_0.pb")))


def assert_close(actual, expected, rtol: float, atol: float, what: str = "") -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def build_for_data(case):
    """An engine for an ONNX backend test case (.model, .data_sets), with a profile spanning the shapes its data
    sets feed to its dynamic inputs."""
    import kiln

    config = kiln.BuilderConfig()
    names = [i.name for i in case.model.graph.input]
    ranges = {}
    for inputs, _ in case.data_sets:
        for name, value in zip(names, inputs):
            if isinstance(value, np.ndarray):
                low, high = ranges.get(name, (value.shape, value.shape))
                ranges[name] = (tuple(map(min, low, value.shape)), tuple(map(max, high, value.shape)))
    dynamic = [i.name for i in case.model.graph.input if i.type.HasField("tensor_type") and (
        not i.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim))]
    if any(name in ranges for name in dynamic):
        config.add_profile({name: (ranges[name][0], ranges[name][1], ranges[name][1]) for name in dynamic if name in ranges})
    return kiln.build(case.model, config)


def onnx_node_cases(*modules: str) -> dict:
    """ONNX's node test cases (name -> case with .model, .data_sets, .rtol, .atol) from the given modules of
    onnx.backend.test.case.node only: importing a module generates its cases, and importing all of them
    (collect_testcases) takes many seconds."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in modules:
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
        from onnx.backend.test.case.node import _NodeTestCases

    return {case.name: case for case in _NodeTestCases}
