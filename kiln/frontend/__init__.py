"""Frontends: turn a model in a framework's format into kiln's IR, whichever form the user brought it in."""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from ..errors import BuildError, ParseError

# `pkg.module:function`: the form `kiln build` takes for models that exist only as Python code (PyTorch), since
# pickled .pt files are never loaded.
_ENTRY_POINT = re.compile(r"^(?P<module>[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):(?P<function>[A-Za-z_][\w]*)$")
_TORCH_OPTIONS = ("example_inputs", "dynamic_shapes", "input_names", "output_names")
_TENSORFLOW_OPTIONS = ("input_names", "output_names")


def model_kind(model) -> str:
    """'torch', 'tensorflow', 'entry_point' or 'onnx': which frontend reads `model` (frameworks are not imported
    to find out, so an ONNX build never pays for loading TensorFlow)."""
    from .tensorflow import is_keras_model, is_saved_model

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if is_keras_model(model):
        return "tensorflow"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if is_saved_model(path) or path.suffix.lower() == ".keras":
            return "tensorflow"
        if isinstance(model, str) and not path.exists() and _ENTRY_POINT.match(model):
            return "entry_point"
    return "onnx"


def parse_with_profiles(model, config=None, **options):
    """(graph, profiles the model itself declares): a torch module's torch.export.Dim ranges make one profile, so
    `kiln.build(module, example_inputs=..., dynamic_shapes=...)` needs no separate add_profile. Other formats
    declare none ([]), and none is derived when the config has profiles of its own, since those take precedence."""
    if model_kind(model) == "entry_point":
        model, returned = load_entry_point(model)
        options = {**returned, **options}
    graph = parse_any(model, config, **options)
    if model_kind(model) != "torch" or not options.get("dynamic_shapes") or (config is not None and config.profiles):
        return graph, []
    from .torch import declared_profile

    profile = declared_profile([graph.value(v.name) for v in graph.inputs], options.get("example_inputs"),
                               options["dynamic_shapes"])
    return graph, [profile] if profile is not None else []


def parse_any(model, config=None, **options):
    """kiln's IR from whatever the user brought: an ONNX path or ModelProto, a torch.nn.Module (with
    example_inputs=, dynamic_shapes=, input_names=, output_names=), a Keras model, a .keras file, a SavedModel
    directory, or a `pkg.module:function` entry point that returns one of these."""
    kind = model_kind(model)
    if kind == "entry_point":
        model, returned = load_entry_point(model)
        return parse_any(model, config, **{**returned, **options})
    if kind == "torch":
        from .torch import parse

        _check_options(options, _TORCH_OPTIONS, "a torch module")
        return parse(model, **options)
    if kind == "tensorflow":
        from .tensorflow import parse

        _check_options(options, _TENSORFLOW_OPTIONS, "a TensorFlow model")
        return parse(model, **options)
    from .onnx import parse

    import onnx

    _check_options(options, (), "an ONNX model")
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ParseError(f"kiln cannot build from a {type(model).__module__}.{type(model).__name__}", code="KILN-E106",
                         hint="give an .onnx path or onnx.ModelProto, a torch.nn.Module with example_inputs=, a Keras "
                              "model, a .keras file or a SavedModel directory")
    return parse(model)


def _check_options(options: dict, allowed: tuple[str, ...], what: str) -> None:
    unexpected = sorted(set(options) - set(allowed))
    if unexpected:
        accepted = f"; it accepts {', '.join(allowed)}" if allowed else ""
        raise BuildError(f"unexpected build option(s) {', '.join(unexpected)} for {what}{accepted}", code="KILN-E203",
                         hint="example_inputs and dynamic_shapes apply to torch modules only")


def load_entry_point(spec: str):
    """Import `pkg.module`, call `function()`, and return (model, build options). The function returns a model
    (an nn.Module needs example inputs: return (module, example_inputs) or (module, example_inputs, dynamic_shapes))."""
    match = _ENTRY_POINT.match(spec)
    assert match, spec
    module_name, function_name = match.group("module"), match.group("function")
    form_hint = (f"module {module_name} must be importable from the current directory or PYTHONPATH and define "
                 f"{function_name}() returning (model, example_inputs)")
    # The console script does not put the working directory on sys.path as `python -m` does; a user expects it to.
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ParseError(f"cannot import {module_name!r} for entry point {spec!r}: {error}", code="KILN-E104",
                         hint=form_hint) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ParseError(f"{module_name} has no function {function_name!r} (entry point {spec!r})", code="KILN-E104",
                         hint=form_hint)
    try:
        result = function()
    except Exception as error:  # noqa: BLE001 (the user's code: report what it raised, not where kiln called it)
        raise ParseError(f"entry point {spec} raised {type(error).__name__}: {error}", code="KILN-E104",
                         hint=f"run {module_name}.{function_name}() in Python to debug it") from None
    if isinstance(result, tuple):
        if len(result) not in (2, 3):
            raise ParseError(f"entry point {spec} returned a tuple of {len(result)} items", code="KILN-E106",
                             hint="return (model, example_inputs) or (model, example_inputs, dynamic_shapes)")
        options = {"example_inputs": result[1]}
        if len(result) == 3 and result[2] is not None:
            options["dynamic_shapes"] = result[2]
        return result[0], options
    return result, {}
