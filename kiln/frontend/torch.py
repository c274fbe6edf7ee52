"""The PyTorch frontend: export an nn.Module through torch.export and torch.onnx (dynamo) into kiln's IR, in memory.

Dimensions declared with torch.export.Dim keep the Dim's name as the IR's symbolic dim ("batch"), input names come
from forward's signature (or the user), and an export that fails comes back as KILN-E107 with torch's own reason.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from typing import Any

from .. import log
from ..errors import BuildError, ParseError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Hints by what went wrong, checked in order against the export's message; the last one always applies.
_HINTS = (
    (("data-dependent", "GuardOnDataDependent", "Dynamic control flow", "data dependent"),
     "the model branches or sizes a tensor on a tensor's value, which an engine cannot record: write the branch with "
     "torch.cond, fix the value (or the shapes) the branch depends on, or build the submodule that exports "
     "(e.g. kiln.build(model.backbone, ...))"),
    (("Constraints violated", "specialized", "not in range", "Dim("),
     "a dimension declared dynamic is fixed (or limited) by the model's code: drop it from dynamic_shapes, widen "
     "its Dim(min=, max=), or use torch.export.Dim.AUTO and let torch decide"),
    (("",),
     "make the module exportable with torch.export: express data-dependent branches with torch.cond, build with fixed "
     "shapes (no dynamic_shapes), or build the submodule that exports; see torch.export's 'exportdb' for rewrites"),
)


def parse(module, example_inputs=None, *, dynamic_shapes=None, input_names=None, output_names=None):
    """kiln's IR for a torch.nn.Module called with `example_inputs` (a tensor, a tuple of forward's positional
    arguments, or a dict of its keyword arguments)."""
    from .onnx import parse as parse_onnx

    return parse_onnx(export(module, example_inputs, dynamic_shapes=dynamic_shapes, input_names=input_names,
                             output_names=output_names))


def export(module, example_inputs=None, *, dynamic_shapes=None, input_names=None, output_names=None):
    """An onnx.ModelProto for the module, exported in memory by torch.onnx.export(dynamo=True)."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise BuildError(f"expected a torch.nn.Module, got {type(module).__name__}", code="KILN-E203",
                         hint="pass the module itself (not its state_dict or a file path)")
    args, kwargs = _example_arguments(module, example_inputs)
    # An engine is for inference: dropout off, batch norm on its running statistics. Each submodule's own mode is
    # restored afterwards (a model in training with frozen, eval-mode parts keeps them so).
    modes = [(layer, layer.training) for layer in module.modules()]
    module.eval()
    try:
        try:
            program = _run_export(module, args, kwargs, dynamic_shapes)
        except ParseError as error:
            raise _fails_eagerly(module, args, kwargs) or error from None
    finally:
        for layer, training in modes:
            layer.training = training
    _rename(program, "input", program.model.graph.inputs, input_names)
    # Default names first, so that an error about the user's names lists the outputs as forward names them.
    _rename(program, "output", program.model.graph.outputs, _default_output_names(program))
    _rename(program, "output", program.model.graph.outputs, output_names)
    model = program.model_proto
    _check_dynamic_dims(model, dynamic_shapes)
    log.verbose("exported %s: inputs %s, outputs %s", type(module).__name__,
                ", ".join(i.name for i in model.graph.input), ", ".join(o.name for o in model.graph.output))
    return model


def _check_dynamic_dims(model, dynamic_shapes) -> None:
    """torch.export may fix a dimension declared dynamic when the model's code needs one size (a Linear's features):
    say so, since the engine will then accept only that size."""
    declared = dim_ranges(dynamic_shapes)
    kept = {dim.dim_param for info in model.graph.input for dim in info.type.tensor_type.shape.dim if dim.dim_param}
    for name, (low, high) in declared.items():
        if name in kept:
            log.verbose("dynamic dimension %s: %d to %s", name, low, "unbounded" if high is None else high)
        else:
            log.warning("dimension %r was declared dynamic, but torch.export fixed it to the example's size (the "
                        "model's code needs that size); the engine accepts only that size there", name)


def _example_arguments(module, example_inputs) -> tuple[tuple, dict]:
    import numpy as np
    import torch

    if example_inputs is None:
        raise BuildError(f"building from a torch module ({type(module).__name__}) needs example inputs", code="KILN-E203",
                         hint="kiln.build(module, config, example_inputs=(torch.randn(1, 3, 224, 224),)); they fix "
                              "dtypes and the shapes of every dimension not declared dynamic")

    def as_tensor(value):
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    if isinstance(example_inputs, dict):
        return (), {name: as_tensor(value) for name, value in example_inputs.items()}
    if isinstance(example_inputs, (list, tuple)):
        return tuple(as_tensor(value) for value in example_inputs), {}
    return (as_tensor(example_inputs),), {}


class _Collector(logging.Handler):
    """Keeps the records torch logs during an export (each once, though a record may reach several loggers)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(record is seen for seen in self.records):
            self.records.append(record)


@contextlib.contextmanager
def _quiet_export():
    """torch.onnx prints its progress and logs warnings (missing torchvision, training mode), and torch's fake-tensor
    and export code log the failure they are about to raise, traceback and all, at ERROR; a build shows all of it
    only at --verbose, so CI logs and terminals keep to kiln's own report. torch's loggers write to the stderr they
    were configured with, which redirecting sys.stderr does not reach, so their handlers are swapped for a collector."""
    captured = io.StringIO()
    collector = _Collector()
    # Loggers torch already configured keep their own levels and handlers, so quiet each of them, not only "torch".
    loggers = [logging.getLogger("torch")] + [logger for name, logger in logging.root.manager.loggerDict.items()
                                              if name.startswith("torch.") and isinstance(logger, logging.Logger)]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    for logger in loggers:
        if not log.is_verbose():
            logger.setLevel(logging.ERROR)
        if logger.handlers or logger.name == "torch":
            logger.handlers[:] = [collector]
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured), \
                contextlib.redirect_stderr(captured):
            warnings.simplefilter("always")
            yield captured
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
        if log.is_verbose():
            for line in captured.getvalue().splitlines():
                log.verbose("torch.onnx: %s", line)
            for warning in caught:
                log.verbose("torch.onnx warning: %s", warning.message)
            for record in collector.records:
                log.verbose("%s: %s", record.name, collector.format(record))


def _run_export(module, args, kwargs, dynamic_shapes):
    import torch

    with log.timed("torch.onnx.export (dynamo)"), _quiet_export():
        try:
            return torch.onnx.export(module, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, dynamo=True,
                                     verbose=False)
        except Exception as error:  # noqa: BLE001 (export raises torch's own error types from each of its three stages)
            raise export_error(error, type(module).__name__) from None


def _fails_eagerly(module, args, kwargs) -> ParseError | None:
    """After a failed export: if forward raises on the example inputs in plain PyTorch too, the fault is in the
    model or its example inputs, not in what export supports, and the hint should say so (torch.cond would not help)."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 (the user's code: report what it raised)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return ParseError(f"cannot export {type(module).__name__} from PyTorch: its forward raises "
                          f"{type(error).__name__}{': ' + reason if reason else ''} on the example inputs, without "
                          "export too", code="KILN-E107", where=_user_frame(error),
                          hint="give example inputs of the shapes and dtypes forward expects (call "
                               "module(*example_inputs) in PyTorch to check), or fix the model's code at the line shown")
    return None


def export_error(error: BaseException, what: str) -> ParseError:
    """KILN-E107 from a failed torch export: the stage and torch's own reason, without the traceback."""
    text = _ANSI.sub("", str(error))
    stage = text.strip().splitlines()[0].strip() if text.strip() else type(error).__name__
    stage = stage.split(". This is step", 1)[0].rstrip(".") + "."  # torch's pointer to its own issue tracker goes
    summary = text.split("## Exception summary", 1)[1] if "## Exception summary" in text else text
    lines = [line.rstrip() for line in summary.strip().splitlines()]
    reason = next((line.strip() for line in lines if line.strip()), type(error).__name__)
    reason = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:\s*", r"\1: ", reason)
    if reason == stage:
        stage = ""
    where = _raising_call(lines) or _user_frame(error)
    message = f"cannot export {what} from PyTorch: {stage + ' ' if stage else ''}{reason}"
    hint = next(h for keys, h in _HINTS if any(key in text for key in keys))
    return ParseError(message, code="KILN-E107", where=where, hint=hint)


def _raising_call(lines: list[str]) -> str:
    """The user's source line torch points at ('File "m.py", line 10, in forward: if x.sum() > 0:'), if it does."""
    for index, line in enumerate(lines):
        if line.strip().startswith("The following call raised this error"):
            call = [entry.strip() for entry in lines[index + 1:index + 3] if entry.strip()]
            return ": ".join(call)
    return ""


def _user_frame(error: BaseException) -> str:
    """'File "m.py", line 10, in forward: if x.sum() > 0:', the innermost line outside torch, kiln and Python's own
    library in the traceback of `error` or of the errors it was raised from (torch wraps the model's error in its own)."""
    import sys
    import sysconfig
    import traceback
    from pathlib import Path

    # torch and the libraries torch.onnx runs on are not where the model's code is
    libraries = [sys.modules[name] for name in ("torch", "onnxscript", "onnx_ir", "onnx", "sympy", "numpy") if name in sys.modules]
    skipped = [str(Path(module.__file__).parent) for module in libraries if getattr(module, "__file__", None)]
    skipped += [str(Path(__file__).parents[1]), sysconfig.get_paths()["stdlib"]]
    found, seen = "", set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame in traceback.extract_tb(error.__traceback__):
            if not frame.filename.startswith("<") and not any(frame.filename.startswith(path) for path in skipped):
                found = f'File "{frame.filename}", line {frame.lineno}, in {frame.name}: {(frame.line or "").strip()}'
        error = error.__cause__ or error.__context__
    return found


def _default_output_names(program) -> list[str]:
    """Names from what forward returns: a dict's keys, else "output" for one tensor, "output_0".. for several."""
    outputs = program.model.graph.outputs
    spec = getattr(getattr(program.exported_program, "call_spec", None), "out_spec", None)
    context = getattr(spec, "context", None)
    if spec is not None and getattr(spec, "type", None) is dict and isinstance(context, (list, tuple)) \
            and len(context) == len(outputs) and all(isinstance(key, str) for key in context):
        return list(context)
    if len(outputs) == 1:
        return ["output"]
    return [f"output_{index}" for index in range(len(outputs))]


def _rename(program, role: str, values, names) -> None:
    if names is None:
        return
    names = [names] if isinstance(names, str) else list(names)
    current = [value.name for value in values]
    if len(names) != len(values):
        raise BuildError(f"{len(names)} {role} name(s) given ({', '.join(names)}) for {len(values)} {role}(s) of the "
                         f"exported model ({', '.join(current)})", code="KILN-E203",
                         hint=f"give one name per {role}, in the order forward takes or returns them")
    if len(set(names)) != len(names):
        raise BuildError(f"{role} names repeat: {', '.join(names)}", code="KILN-E203", hint=f"give each {role} its own name")
    if len({id(value) for value in values}) != len(values):
        log.verbose("the module returns one tensor more than once; keeping the exporter's %s names %s", role, current)
        return
    taken = {value.name for value in _all_values(program.model.graph)} - set(current)
    clashes = sorted(set(names) & taken)
    if clashes:
        raise BuildError(f"{role} name(s) {', '.join(clashes)} are already used inside the exported graph",
                         code="KILN-E203", hint=f"choose other {role} names")
    # Two passes so that swapping names between values never leaves two values with one name at a time.
    for index, value in enumerate(values):
        value.name = f"__kiln_rename_{role}_{index}"
    for value, name in zip(values, names):
        value.name = name


def _all_values(graph) -> list[Any]:
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph:
        values.extend(output for output in node.outputs if output is not None)
    return values


def declared_profile(inputs, example_inputs, dynamic_shapes):
    """The optimization profile the module's torch.export.Dim declarations describe, for the graph's `inputs`
    (Values): min and max from each Dim (min at least 1), opt the size of the example traced. None when no input is
    dynamic. A Dim with no max cannot size an engine: KILN-E202 says how to bound it."""
    from ..engine.profiles import Profile

    ranges = dim_ranges(dynamic_shapes)
    dynamic = [value for value in inputs if value.shape is not None and any(isinstance(d, str) for d in value.shape)]
    if not dynamic:
        return None
    examples = _example_sizes(inputs, example_inputs)
    profile = Profile()
    for value in dynamic:
        if any(isinstance(d, str) and d not in ranges for d in value.shape):
            return None  # a dimension torch named itself (Dim.AUTO): the user's profile must cover it
        unbounded = [d for d in value.shape if isinstance(d, str) and ranges[d][1] is None]
        if unbounded:
            raise BuildError(f"torch.export.Dim {unbounded[0]!r} of input {value.name!r} has no max, so kiln cannot "
                             "size the engine's optimization profile", code="KILN-E202", where=value.name,
                             hint=f"bound it: torch.export.Dim({unbounded[0]!r}, min=1, max=64), or give a profile: "
                                  f"config.add_profile({{{value.name!r}: (min_shape, opt_shape, max_shape)}})")
        shapes = []
        for pick in (lambda low, high, seen: low, lambda low, high, seen: min(max(seen, low), high),
                     lambda low, high, seen: high):
            shapes.append(tuple(d if isinstance(d, int) else
                                pick(max(ranges[d][0], 1), ranges[d][1], examples.get(d, ranges[d][1])) for d in value.shape))
        profile.set_shape(value.name, *shapes)
    log.verbose("optimization profile from torch.export.Dim ranges: %s", profile)
    return profile


def _example_sizes(inputs, example_inputs) -> dict[str, int]:
    """Each symbolic dim's size in the example traced: the graph's inputs are the example's tensors, flattened in
    order (positional, then keyword), so they pair up when the counts agree."""
    import torch
    from torch.utils import _pytree

    if isinstance(example_inputs, dict):
        leaves = _pytree.tree_leaves(example_inputs)
    elif isinstance(example_inputs, (list, tuple)):
        leaves = _pytree.tree_leaves(tuple(example_inputs))
    else:
        leaves = [example_inputs]
    shapes = [tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor) or hasattr(leaf, "shape")]
    sizes: dict[str, int] = {}
    if len(shapes) != len(inputs):
        return sizes
    for value, shape in zip(inputs, shapes):
        for dim, size in zip(value.shape or (), shape):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    return sizes


def dim_ranges(dynamic_shapes) -> dict[str, tuple[int, int | None]]:
    """{Dim name: (min, max)} for every torch.export.Dim in a dynamic_shapes structure (max None: unbounded)."""
    ranges: dict[str, tuple[int, int | None]] = {}

    def visit(item) -> None:
        if isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)
        elif hasattr(item, "__name__") and hasattr(item, "min") and hasattr(item, "max"):
            ranges[item.__name__] = (_bound(item.min) or 0, _bound(item.max))

    visit(dynamic_shapes)
    return ranges


def from_torch(module, example_inputs, config=None, *, dynamic_shapes=None, input_names=None, output_names=None):
    """Build an Engine from a torch.nn.Module: the same as kiln.build(module, config, example_inputs=..., ...)."""
    from ..builder import build

    return build(module, config, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
                 input_names=input_names, output_names=output_names)


def _bound(value) -> int | None:
    """A Dim's min or max as an int; None for unbounded (torch uses sympy's infinity there)."""
    try:
        number = int(value)
    except Exception:  # noqa: BLE001 (sympy's infinities raise several types on int())
        return None
    return number if abs(number) < 2**62 else None
