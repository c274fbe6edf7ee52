"""Runs ONNX's backend test cases (node cases and the model tests under onnx/backend/test/data) through a runner.

A runner is "kiln" (kiln.backend: build an engine, run it) or "onnxruntime" (the same cases through an
InferenceSession, to put kiln's count beside it). Each case is compared as ONNX's own runner compares it:
same number of outputs, same shapes and dtypes, and assert_allclose with the case's own rtol/atol.
A case ends "pass", "wrong" (ran, different answer) or "error" (could not build or run), with a one-line reason.
"""
from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "light")
HERE = Path(__file__).parent
EXPECTED_FAILURES = HERE / "expected_failures.txt"
RESULTS = HERE / "results.json"


@dataclass
class Case:
    name: str
    kind: str  # "node" or one of MODEL_KINDS
    model: onnx.ModelProto
    data_sets: list  # [(inputs, expected outputs)]
    rtol: float
    atol: float


def node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Case(c.name, "node", c.model, [(_arrays(i), _arrays(o)) for i, o in c.data_sets], c.rtol, c.atol)
                for c in collect_testcases(None)]


def _arrays(values) -> list:
    """Some generated cases carry TensorProtos (float8, int4, ...) where ONNX's runner reads arrays: convert them."""
    return [numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v for v in values]


def _load(path: str, type_proto) -> object:
    data = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def model_cases(kinds=("pytorch-converted", "pytorch-operator", "simple")) -> list[Case]:
    """The stored model tests with their test_data_set folders."""
    from onnx.backend.test.loader import load_model_tests

    cases = []
    for kind in kinds:
        for test in load_model_tests(kind=kind):
            model_dir = test.model_dir
            model = onnx.load(os.path.join(model_dir, "model.onnx"))
            data_sets = []
            for folder in sorted(glob.glob(os.path.join(model_dir, "test_data_set*"))):
                inputs = [_load(os.path.join(folder, f"input_{i}.pb"), model.graph.input[i].type)
                          for i in range(len(glob.glob(os.path.join(folder, "input_*.pb"))))]
                outputs = [_load(os.path.join(folder, f"output_{i}.pb"), model.graph.output[i].type)
                           for i in range(len(glob.glob(os.path.join(folder, "output_*.pb"))))]
                data_sets.append((inputs, outputs))
            cases.append(Case(test.name, kind, model, data_sets, test.rtol, test.atol))
    return cases


def light_cases() -> list[Case]:
    """The light models, fed the input ONNX's runner generates for them (arange(n) / n) and checked against the stored output."""
    cases = []
    for path in sorted((DATA / "light").glob("light_*.onnx")):
        model = onnx.load(str(path))
        weights = {t.name for t in model.graph.initializer}
        inputs = []
        for value in model.graph.input:
            if value.name in weights:
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
        stem = path.stem
        outputs = [numpy_helper.to_array(onnx.load_tensor(str(path.with_name(f"{stem}_output_{i}.pb"))))
                   for i in range(len(model.graph.output))]
        cases.append(Case("test_" + stem[len("light_"):], "light", model, [(inputs, outputs)], 1e-3, 1e-7))
    return cases


def all_model_cases() -> list[Case]:
    return model_cases(("pytorch-converted", "pytorch-operator", "simple")) + light_cases()


# -- runners -------------------------------------------------------------------------------------------------

def kiln_runner(model: onnx.ModelProto):
    from kiln.backend import KilnBackend

    return KilnBackend.prepare(model, "CPU").run


def onnxruntime_runner(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    weights = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in weights]

    def run(inputs):
        feed = {name: value for name, value in zip(graph_inputs, inputs) if name in names}
        return session.run(None, feed)

    return run


RUNNERS = {"kiln": kiln_runner, "onnxruntime": onnxruntime_runner}


# -- comparison ----------------------------------------------------------------------------------------------

def compare(expected, actual, rtol: float, atol: float, where: str = "output") -> None:
    """Raise AssertionError where ONNX's runner would (assert_similar_outputs), with a short message."""
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):
        if not isinstance(expected, (list, tuple)) or not isinstance(actual, (list, tuple)):
            raise AssertionError(f"{where}: expected {type(expected).__name__}, got {type(actual).__name__}")
        if len(expected) != len(actual):
            raise AssertionError(f"{where}: expected {len(expected)} items, got {len(actual)}")
        for i, (e, a) in enumerate(zip(expected, actual)):
            compare(e, a, rtol, atol, f"{where}[{i}]")
        return
    if expected is None or actual is None:
        if expected is not actual:
            raise AssertionError(f"{where}: expected {type(expected).__name__}, got {type(actual).__name__}")
        return
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise AssertionError(f"{where}: shape {actual.shape}, expected {expected.shape}")
    if expected.dtype == object:
        if not np.array_equal(expected, actual):
            raise AssertionError(f"{where}: strings differ")
        return
    if expected.dtype != actual.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype}, expected {expected.dtype}")
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2 ** -6)
    if expected.dtype.kind not in "biufc":  # float8 / int4 from ml_dtypes: compare as float32
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    elif expected.dtype.name == "bfloat16":
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip().startswith(("Mismatched", "Max abs"))]
        raise AssertionError(f"{where}: " + "; ".join(lines[:2])) from None


def run_case(case: Case, runner: str = "kiln") -> tuple[str, str]:
    """("pass" | "wrong" | "error", one-line reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = RUNNERS[runner](case.model)
            for inputs, expected in case.data_sets:
                outputs = list(run(list(inputs)))
                if len(outputs) != len(expected):
                    return "wrong", f"{len(outputs)} outputs, expected {len(expected)}"
                for i, (e, a) in enumerate(zip(expected, outputs)):
                    compare(e, a, case.rtol, case.atol, f"output {i}")
    except AssertionError as error:
        return "wrong", _one_line(error)
    except Exception as error:  # noqa: BLE001 (every failure is a result here)
        return "error", _one_line(error, type(error).__name__)
    return "pass", ""


def _one_line(error: BaseException, prefix: str = "") -> str:
    text = " ".join(str(error).split())
    code = getattr(error, "code", None)
    text = f"{code} {text}" if code and code not in text else text
    text = f"{prefix}: {text}" if prefix else text
    return text[:200]


def case_operator(case: Case) -> str:
    """The operator a node case tests ("domain::Op" outside ONNX's default domain): its single non-Constant node."""
    ops = [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
           for n in case.model.graph.node if n.op_type != "Constant"]
    if case.kind == "node" and len(set(ops)) == 1:
        return ops[0]
    return ""


def read_expected_failures() -> dict[str, str]:
    """case name -> reason, from expected_failures.txt ("name  # reason" per line)."""
    listed = {}
    if EXPECTED_FAILURES.exists():
        for line in EXPECTED_FAILURES.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition("#")
                listed[name.strip()] = reason.strip()
    return listed
