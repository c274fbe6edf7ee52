"""The TensorFlow/Keras frontend (extra `kiln[tensorflow]`): a Keras model, a .keras file or a SavedModel directory
converts through tf2onnx into kiln's ONNX frontend, in memory. This replaces UFF, which TensorRT removed."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

from .. import log
from ..errors import BuildError, ParseError

# The pair pinned by the extra; tf2onnx 1.17 is the first to trace Keras 3 models (TensorFlow 2.16 and newer).
# tensorflow-cpu 2.20.0 has wheels for Python 3.9 to 3.13 and kiln needs 3.11, hence the range; the extra's pins carry
# python_version < "3.14", so that on a newer Python it installs nothing and require() says why.
TESTED = {"tensorflow-cpu": "2.20.0", "tf2onnx": "1.17.0", "python": "3.11 to 3.13"}
NEWEST_PYTHON = (3, 13)
INSTALL_HINT = (f"pip install 'kiln[tensorflow]' (tensorflow-cpu=={TESTED['tensorflow-cpu']} with "
                f"tf2onnx=={TESTED['tf2onnx']}, Python {TESTED['python']}); or convert the model to ONNX with "
                "python -m tf2onnx.convert and build the .onnx file")
KERAS_SUFFIXES = (".keras",)
OPSET = 18  # kiln's canonical opset, so the ONNX frontend converts nothing
_UNKNOWN_DIM = re.compile(r"^unk__\d+$")


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())


def is_keras_model(obj) -> bool:
    """A Keras model object, recognised by its class's module so that TensorFlow is not imported to ask."""
    return any(cls.__module__.split(".")[0] in ("keras", "tf_keras", "tensorflow")
               and cls.__name__ in ("Model", "Sequential", "Functional") for cls in type(obj).__mro__)


def require():
    """(tensorflow, tf2onnx), or ParseError KILN-E108 saying how to install the extra and which versions work."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, unless the user wants it
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as error:
        version = _python_version()
        if version > NEWEST_PYTHON:
            python = ".".join(map(str, version))
            raise ParseError(f"TensorFlow models need kiln's tensorflow extra, which cannot work on Python {python}: "
                             f"tensorflow-cpu {TESTED['tensorflow-cpu']} has no wheels for it, so the extra installs "
                             f"nothing here ({error})", code="KILN-E108",
                             hint=f"use Python {TESTED['python']} for TensorFlow models (pip install 'kiln[tensorflow]' "
                                  "in a virtual environment of that Python), or convert the model to ONNX there with "
                                  "python -m tf2onnx.convert and build the .onnx file here") from None
        raise ParseError(f"TensorFlow models need kiln's tensorflow extra, which is not installed here ({error})",
                         code="KILN-E108", hint=INSTALL_HINT) from None
    except Exception as error:  # noqa: BLE001 (a TensorFlow built for other numpy/protobuf fails while importing)
        raise ParseError(f"TensorFlow or tf2onnx is installed but cannot be imported: {type(error).__name__}: {error}",
                         code="KILN-E108", hint=f"reinstall the versions that work together: {INSTALL_HINT}") from None
    tested_minor = ".".join(TESTED["tensorflow-cpu"].split(".")[:2])
    if not tf.__version__.startswith(tested_minor + ".") or tf2onnx.__version__ != TESTED["tf2onnx"]:
        log.warning("kiln's TensorFlow frontend is tested with tensorflow %s and tf2onnx %s; found %s and %s",
                    TESTED["tensorflow-cpu"], TESTED["tf2onnx"], tf.__version__, tf2onnx.__version__)
    return tf, tf2onnx


def _python_version() -> tuple[int, int]:
    return sys.version_info[:2]


@contextlib.contextmanager
def _quiet():
    """tf2onnx logs every step and TensorFlow warns about its own v1 APIs that tf2onnx calls; a build shows them
    only at --verbose."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG if log.is_verbose() else logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def parse(source, *, input_names=None, output_names=None):
    """kiln's IR for a Keras model object, a .keras file or a SavedModel directory."""
    from .onnx import parse as parse_onnx

    return parse_onnx(export(source, input_names=input_names, output_names=output_names))


def export(source, *, input_names=None, output_names=None):
    """An onnx.ModelProto converted by tf2onnx, with the model's own input/output names (or the ones given)."""
    tf, tf2onnx = require()
    if is_keras_model(source):
        model = _convert(lambda: tf2onnx.convert.from_keras(source, opset=OPSET), source.name)
    else:
        path = Path(source)
        if path.suffix.lower() in KERAS_SUFFIXES:
            model = _convert_keras_file(path, tf2onnx)
        elif is_saved_model(path):
            model = _convert_saved_model(path, tf, tf2onnx)
        else:
            raise ParseError(f"{str(path)!r} is neither a SavedModel directory nor a .keras file", code="KILN-E104",
                             hint="give a directory with saved_model.pb (model.export(dir) or tf.saved_model.save), "
                                  "or a file written by model.save('name.keras')")
    _name_dynamic_dims(model)
    _rename(model, "input", [i.name for i in model.graph.input if i.name not in _weights(model)], input_names)
    _rename(model, "output", [o.name for o in model.graph.output], output_names)
    log.verbose("converted with tf2onnx: inputs %s, outputs %s", ", ".join(i.name for i in model.graph.input),
                ", ".join(o.name for o in model.graph.output))
    return model


def _convert(conversion, what: str):
    try:
        with log.timed(f"tf2onnx conversion of {what}"), _quiet():
            model, _ = conversion()
    except ParseError:
        raise
    except Exception as error:  # noqa: BLE001 (tf2onnx and TensorFlow raise many types, all with a readable message)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ParseError(f"cannot convert {what} with tf2onnx: {type(error).__name__}: {reason}", code="KILN-E107",
                         hint="tf2onnx converts TensorFlow ops it knows into ONNX; give the model a fixed input "
                              "signature (keras.Input(shape=...)), replace custom layers, or convert with "
                              "python -m tf2onnx.convert --verbose to see the failing op") from None
    return model


def _convert_keras_file(path: Path, tf2onnx):
    import keras

    if not path.is_file():
        raise ParseError(f"Keras file {str(path)!r} does not exist", code="KILN-E104", hint="check the path")
    try:
        # safe_mode (the default, kept on purpose) refuses to deserialize Python lambdas: loading runs no user code.
        loaded = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001
        raise ParseError(f"{path.name} cannot be loaded by Keras {keras.__version__}: {error}", code="KILN-E104",
                         hint="kiln loads .keras files in Keras's safe mode; for a model with custom or Lambda "
                              "layers, build it in Python and pass the object (kiln.build(model)), or export a "
                              "SavedModel with model.export(dir)") from None
    return _convert(lambda: tf2onnx.convert.from_keras(loaded, opset=OPSET), path.name)


def _convert_saved_model(path: Path, tf, tf2onnx):
    from tf2onnx import tf_loader

    try:
        signatures = list(tf.saved_model.load(str(path)).signatures.keys())
    except Exception as error:  # noqa: BLE001
        raise ParseError(f"SavedModel {str(path)!r} cannot be loaded: {error}", code="KILN-E104",
                         hint="check that the directory is a complete SavedModel (saved_model.pb and variables/)") from None
    usable = [name for name in signatures if not name.startswith("_")]
    if not usable:
        raise ParseError(f"SavedModel {str(path)!r} has no serving signature", code="KILN-E104",
                         hint="save it with a signature: model.export(dir), or tf.saved_model.save(module, dir, "
                              "signatures=module.__call__.get_concrete_function(tf.TensorSpec(...)))")
    signature = "serving_default" if "serving_default" in usable else usable[0]
    log.verbose("SavedModel %s: converting signature %r of %s", path, signature, usable)

    def conversion():
        graph_def, inputs, outputs, _tables, renames = tf_loader.from_saved_model(
            str(path), None, None, tag=["serve"], signatures=[signature], return_initialized_tables=True,
            return_tensors_to_rename=True)
        return tf2onnx.convert.from_graph_def(graph_def, name=path.name, input_names=inputs, output_names=outputs,
                                              opset=OPSET, tensors_to_rename=renames)

    return _convert(conversion, f"SavedModel {path.name}")


def _weights(model) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _name_dynamic_dims(model) -> None:
    """tf2onnx names each unknown dimension `unk__12`; kiln's profiles and bindings read better with `batch` for a
    leading unknown dimension and `<binding>_dim<axis>` for the others."""
    for info in list(model.graph.input) + list(model.graph.output):
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and _UNKNOWN_DIM.match(dim.dim_param):
                dim.dim_param = "batch" if axis == 0 else f"{info.name}_dim{axis}"


def _rename(model, role: str, current: list[str], names) -> None:
    if names is None:
        return
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(current) or len(set(names)) != len(names):
        raise BuildError(f"{role} names {names} do not match the converted model's {len(current)} {role}(s) "
                         f"({', '.join(current)})", code="KILN-E203",
                         hint=f"give one distinct name per {role}, in the model's order")
    rename_values(model.graph, dict(zip(current, names)))


def rename_values(graph, mapping: dict[str, str]) -> None:
    """Rename values everywhere in an ONNX graph, subgraphs included (they may read outer values by name)."""
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        info.name = mapping.get(info.name, info.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                rename_values(attribute.g, mapping)
            for subgraph in attribute.graphs:
                rename_values(subgraph, mapping)
