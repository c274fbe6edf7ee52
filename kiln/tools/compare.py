"""Checking an engine against onnxruntime: per-output errors, cosine similarity, an error histogram and PASS/FAIL,
and, layer by layer, every intermediate tensor that survived fusion, to find the first layer that goes wrong."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import BindingError, KilnError

# Absolute-error histogram bins: exact, then decades from 1e-9 up, then 1 and beyond.
HISTOGRAM_EDGES = [0.0] + [10.0 ** e for e in range(-9, 1)] + [float("inf")]


@dataclass
class TensorComparison:
    name: str
    kiln_shape: list[int]
    reference_shape: list[int]
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    mean_rel: float = 0.0
    cosine: float = 1.0
    histogram: list[int] = field(default_factory=list)  # counts per HISTOGRAM_EDGES bin
    outside: int = 0  # elements beyond atol + rtol * |reference|
    size: int = 0
    passed: bool = True
    problem: str = ""  # why it failed beyond the numbers: shape, NaN, dtype
    layer: str = ""  # the kiln layer that produced it (layerwise)
    op: str = ""
    origin: list[str] = field(default_factory=list)
    model_node: str = ""  # the ONNX node that makes this tensor, "name (OpType)": a layer the frontend added has its own name


@dataclass
class CompareResult:
    atol: float
    rtol: float
    outputs: list[TensorComparison]
    layers: list[TensorComparison] = field(default_factory=list)
    first_failing_layer: TensorComparison | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "histogram_edges": HISTOGRAM_EDGES,
                "outputs": [asdict(o) for o in self.outputs], "layers": [asdict(layer) for layer in self.layers],
                "first_failing_layer": asdict(self.first_failing_layer) if self.first_failing_layer else None}


def compare_tensors(name: str, actual, expected, atol: float, rtol: float) -> TensorComparison:
    """Errors of `actual` (kiln) against `expected` (the reference), in float64."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    result = TensorComparison(name, list(actual.shape), list(expected.shape), size=int(expected.size))
    if actual.shape != expected.shape:
        result.passed, result.problem = False, f"shape {list(actual.shape)} differs from the reference's {list(expected.shape)}"
        return result
    if expected.size == 0:
        return result
    if expected.dtype.kind in "OUS" or actual.dtype.kind in "OUS":
        same = np.array_equal(actual, expected)
        result.passed, result.problem = same, "" if same else "values differ"
        return result
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        result.passed = False
        result.problem = f"{int((nan_a & ~nan_b).sum())} NaN where the reference has a number, {int((nan_b & ~nan_a).sum())} the other way"
    finite = ~(nan_a | nan_b)
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are set to 0 below
        diff = np.abs(a - b)
    same_inf = np.isinf(a) & np.isinf(b) & (a == b)
    diff[same_inf | ~finite] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(b))
    result.max_abs, result.mean_abs = float(diff.max()), float(diff.mean())
    result.max_rel, result.mean_rel = float(rel.max()), float(rel.mean())
    a0, b0 = np.where(finite & ~same_inf, a, 0.0).ravel(), np.where(finite & ~same_inf, b, 0.0).ravel()
    norms = float(np.linalg.norm(a0) * np.linalg.norm(b0))
    result.cosine = float(a0 @ b0 / norms) if norms > 0 else (1.0 if not a0.any() and not b0.any() else 0.0)
    result.histogram = [int(c) for c in np.histogram(diff, bins=HISTOGRAM_EDGES[:-1] + [np.finfo(np.float64).max])[0]]
    result.histogram[-1] += int(np.isinf(diff).sum())
    outside = diff > atol + rtol * np.abs(np.where(np.isinf(b), 0.0, b))
    result.outside = int(outside.sum())
    result.passed = result.passed and result.outside == 0
    return result


def reference_model(model, extra_outputs: list[str] = ()):
    """A copy of the ONNX model that also outputs `extra_outputs` (intermediate tensors), for onnxruntime."""
    import onnx

    from ..frontend.onnx import load_model

    model = load_model(model)
    if not extra_outputs:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in extra_outputs:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def run_reference(model, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """onnxruntime's CPU results for `feed` (all graph outputs, or the named ones)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = _session(ort, model, options)
        wanted = {i.name for i in session.get_inputs()}
        names = outputs or [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted})))
    except Exception as error:  # noqa: BLE001 (onnxruntime raises its own Fail/InvalidArgument types)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KilnError(f"onnxruntime, the reference, cannot run the model on these inputs: {first}", code="KILN-E408",
                        hint="check the model with onnx.checker.check_model; compare needs a model onnxruntime runs") from None


def _session(ort, model, options):
    """An onnxruntime session; a model stamped with an IR version newer than this onnxruntime reads (a newer onnx
    package wrote it) is retried at the newest IR version onnxruntime names, which changes nothing it computes."""
    import re

    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        newest = re.search(r"Unsupported model IR version: \d+, max supported IR version: (\d+)", str(error))
        if not newest:
            raise
        import onnx

        from .. import log

        log.verbose("onnxruntime %s reads IR versions up to %s; running the reference at that version", ort.__version__,
                    newest.group(1))
        older = onnx.ModelProto()
        older.CopyFrom(model)
        older.ir_version = int(newest.group(1))
        return ort.InferenceSession(older.SerializeToString(), options, providers=["CPUExecutionProvider"])


def model_tensor_names(model) -> set[str]:
    """Every tensor the ONNX model's nodes produce and another node reads, by name.

    Outputs nothing reads (a Dropout's mask) are left out: they cannot affect the result, and runtimes
    disagree about them (onnxruntime returns an opset-9 Dropout mask of zeros)."""
    read = {name for node in model.graph.node for name in node.input if name}
    return {name for node in model.graph.node for name in node.output if name and name in read}


def run_kiln(engine, feed: dict[str, np.ndarray], capture: set[str] | None = None) -> tuple[dict, list[dict]]:
    """The engine's outputs, and the captured intermediates in execution order, read through `on_step`.

    The engine runs exactly as built: nothing is re-fused or re-lowered to expose the intermediates.
    """
    import torch

    from ..engine.bindings import check_feed
    from ..tensors import tensor_to_numpy

    tensors, _ = check_feed(feed, engine.inputs)
    captured: list[dict] = []

    def on_step(step, env=None) -> None:
        if env is None:
            raise KilnError(f"the {engine.device} program does not expose intermediate values", code="KILN-E408",
                            hint="run compare without --layerwise")
        for name in step.outputs:
            if name in capture and env.get(name) is not None and hasattr(env[name], "shape"):
                captured.append({"output": name, "layer": step.name, "op": step.op,
                                 "value": np.array(tensor_to_numpy(env[name]), copy=True)})

    program = engine.select(tensors)
    if engine.device == "cuda":
        tensors = {name: t.to("cuda") for name, t in tensors.items()}
    with torch.inference_mode():
        results = program.execute(tensors, on_step=on_step if capture else None)
    outputs = {}
    for name, value in results.items():
        if value is None or isinstance(value, list):
            continue  # sequences and empty optionals: compared by engine tests, not here
        outputs[name] = np.array(tensor_to_numpy(value), copy=True)
    return outputs, captured


def compare(model, engine, feed: dict[str, np.ndarray], *, atol: float = 1e-4, rtol: float = 1e-3,
            layerwise: bool = False) -> tuple[CompareResult, dict, dict]:
    """Compare `engine` with onnxruntime running `model` on `feed`: (result, kiln outputs, reference outputs)."""
    if atol < 0 or rtol < 0:
        raise KilnError(f"tolerances must not be negative (atol {atol}, rtol {rtol})", code="KILN-E203",
                        hint="e.g. --atol 1e-4 --rtol 1e-3")
    original = reference_model(model)
    model_inputs = {i.name for i in original.graph.input} - {t.name for t in original.graph.initializer}
    engine_inputs = {b.name for b in engine.inputs}
    if model_inputs != engine_inputs:
        raise BindingError(f"the engine's inputs ({', '.join(sorted(engine_inputs))}) are not the model's "
                           f"({', '.join(sorted(model_inputs))})", code="KILN-E402",
                           hint="give --engine an engine built from this model, or leave it out to build one")
    capture = set()
    if layerwise:
        producible = model_tensor_names(original) - {o.name for o in original.graph.output}
        capture = {name for step in getattr(engine.program, "steps", []) for name in step.outputs if name in producible}
    kiln_outputs, captured = run_kiln(engine, feed, capture | {o.name for o in engine.outputs} if layerwise else None)
    reference_names = [o.name for o in original.graph.output]
    extra = sorted({c["output"] for c in captured})
    reference = run_reference(reference_model(original, extra), feed, reference_names + extra)
    result = CompareResult(atol, rtol, [])
    for name in reference_names:
        if name not in kiln_outputs:
            if name in {o.name for o in engine.outputs}:
                continue  # a sequence or optional output
            result.outputs.append(TensorComparison(name, [], list(np.shape(reference[name])), passed=False,
                                                   problem="the engine has no output of this name"))
            continue
        result.outputs.append(compare_tensors(name, kiln_outputs[name], reference[name], atol, rtol))
    producers = {name: f"{node.name or f'#{index}'} ({node.op_type})" for index, node in enumerate(original.graph.node)
                 for name in node.output if name}
    for item in captured:
        layer = compare_tensors(item["output"], item["value"], reference[item["output"]], atol, rtol)
        layer.layer, layer.op, layer.model_node = item["layer"], item["op"], producers.get(item["output"], "")
        layer.origin = list(engine.plan.layers.get(item["layer"], {}).get("origin", []))
        result.layers.append(layer)
    result.first_failing_layer = next((layer for layer in result.layers if not layer.passed), None)
    return result, kiln_outputs, {name: reference[name] for name in reference_names}


# -- reporting ---------------------------------------------------------------------------------------

def _bin_label(index: int) -> str:
    low, high = HISTOGRAM_EDGES[index], HISTOGRAM_EDGES[index + 1]
    if index == 0:
        return f"[0, {high:.0e})"
    return f"[{low:.0e}, {'inf' if high == float('inf') else f'{high:.0e}'})"


def format_histogram(counts: list[int], width: int = 40) -> list[str]:
    total = max(sum(counts), 1)
    peak = max(counts) or 1
    return [f"      {_bin_label(i):<16} {'#' * max(1 if c else 0, round(width * c / peak)):<{width}} {c} ({100 * c / total:.1f}%)"
            for i, c in enumerate(counts) if c]


def format_result(result: CompareResult) -> str:
    lines = [f"kiln vs onnxruntime (atol {result.atol:g}, rtol {result.rtol:g}; an element passes when "
             f"|kiln - reference| <= atol + rtol * |reference|)"]
    for o in result.outputs:
        lines.append(f"  {o.name}: {'PASS' if o.passed else 'FAIL'}  shape {o.reference_shape}")
        if o.problem:
            lines.append(f"    {o.problem}")
        if o.histogram:
            lines.append(f"    max abs {o.max_abs:.3e}  mean abs {o.mean_abs:.3e}  max rel {o.max_rel:.3e}  "
                         f"mean rel {o.mean_rel:.3e}  cosine {o.cosine:.6f}  outside tolerance {o.outside}/{o.size}")
            lines.append("    absolute error histogram:")
            lines += format_histogram(o.histogram)
    if result.layers:
        failing = [layer for layer in result.layers if not layer.passed]
        lines.append(f"  layerwise: {len(result.layers)} intermediate tensors survived fusion; {len(failing)} outside tolerance")
        first = result.first_failing_layer
        if first is not None:
            lines.append(f"  first layer outside tolerance: {first.layer} ({first.op}, from {', '.join(first.origin) or '?'}) "
                         f"output {first.name}{f', made in the model by {first.model_node}' if first.model_node else ''}: "
                         f"max abs {first.max_abs:.3e}, "
                         f"max rel {first.max_rel:.3e}, cosine {first.cosine:.6f}{'; ' + first.problem if first.problem else ''}")
    lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    try:
        np.savez(path, **arrays)
    except OSError as error:
        raise KilnError(f"cannot write {path!r}: {error.strerror}", code="KILN-E203", hint="give a path in a writable directory") from None


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """Inputs from an .npz file (name -> array), as --save-inputs writes them."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise BindingError(f"cannot read inputs from {path!r}: {error}", code="KILN-E402",
                           hint="give an .npz file written by numpy.savez or by kiln compare --save-inputs") from None
