"""Plugins: user-registered operators for what kiln lacks (a custom-domain op, or an override of a standard one).

    import torch, kiln

    @kiln.plugin("Mish", domain="com.example", version="1.0",
                 infer=lambda inputs, attrs: [(inputs[0].dtype, inputs[0].shape)])
    def mish(x):
        return x * torch.tanh(torch.nn.functional.softplus(x))

The decorated function is the CPU kernel: it takes the node's inputs (torch tensors) positionally and the
node's attributes as keyword-only arguments with their defaults. A torch kernel runs on CUDA tensors too;
`cuda=` gives a separate CUDA kernel (a callable, or "module:function" imported only when a CUDA engine is
built, which is how a Triton kernel's launcher is given without importing triton elsewhere).
`infer(inputs, attrs)` returns one (DType, shape) per output, from the input Values; ONNX's shape
inference knows nothing of custom operators, so kiln applies this rule while parsing.

An engine that uses a plugin records its name, version and registering module; loading the engine where
the plugin is not registered raises KILN-E506. The engine file never holds the plugin's code.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .errors import BuildError, EngineFileError
from .ops.registry import PluginInfo, register, unregister, versions

# (domain, op, since) -> the plugin's CUDA kernel, when it has its own.
_CUDA_KERNELS: dict[tuple[str, str, int], Callable | str] = {}


def plugin(op: str, *, domain: str = "", version: str = "1", since: int = 1, until: int | None = None,
           infer: Callable | None = None, cuda: Callable | str | None = None, dtypes=None, check=None,
           name: str | None = None):
    """Register the decorated function as the CPU kernel of `domain::op` for opsets `since`..`until`.

    `infer(inputs, attrs) -> [(DType, shape), ...]` is the shape/dtype rule; `cuda` an optional CUDA kernel
    (callable or "module:function"); `dtypes` the element types of the first input it accepts; `check(node,
    graph)` returns why a node is unsupported, or None; `name` defaults to "domain::op".
    """
    domain = "" if domain == "ai.onnx" else domain
    info = PluginInfo(name or (f"{domain}::{op}" if domain else op), str(version))

    def in_range(node, graph):
        opset = graph.opsets.get(node.domain, 1)
        if until is not None and opset > until:
            return f"plugin {info.name} {info.version} covers opsets {since} to {until}, the model uses opset {opset}"
        return check(node, graph) if check is not None else None

    def decorate(kernel):
        if infer is None and domain:
            raise BuildError(f"plugin {info.name} has no shape/dtype rule", code="KILN-E204", where=info.name,
                             hint="pass infer=lambda inputs, attrs: [(dtype, shape), ...], one entry per output")
        registered = register(op, since=since, domain=domain, infer=infer, dtypes=dtypes, check=in_range,
                              plugin=info)(kernel)
        if cuda is not None:
            _CUDA_KERNELS[(domain, op, since)] = cuda
        else:
            _CUDA_KERNELS.pop((domain, op, since), None)
        return registered

    return decorate


def unregister_plugin(op: str, domain: str = "") -> None:
    """Forget every version of a plugin (tests, notebooks that re-register)."""
    domain = "" if domain == "ai.onnx" else domain
    unregister(op, domain)
    for key in [k for k in _CUDA_KERNELS if k[:2] == (domain, op)]:
        del _CUDA_KERNELS[key]


def kernel_for_device(definition, device: str) -> Callable:
    """The kernel a backend runs for a registered operator: the plugin's CUDA kernel on CUDA where it has one."""
    if device != "cuda" or definition.plugin is None:
        return definition.kernel
    kernel = _CUDA_KERNELS.get((definition.domain, definition.op, definition.since))
    if kernel is None:
        return definition.kernel  # a torch kernel runs on CUDA tensors as it is
    if callable(kernel):
        return kernel
    module_name, _, attribute = kernel.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        missing = getattr(error, "name", None) or module_name
        hint = ("install Triton (pip install triton), which CUDA builds of this plugin need" if missing == "triton"
                else f"make {module_name} importable in this environment")
        raise BuildError(f"plugin {definition.plugin.name}: its CUDA kernel {kernel!r} cannot be imported ({error})",
                         code="KILN-E204", where=definition.plugin.name, hint=hint) from None
    except AttributeError:
        raise BuildError(f"plugin {definition.plugin.name}: {module_name} has no {attribute!r}", code="KILN-E204",
                         where=definition.plugin.name, hint="give cuda= as 'module:function'") from None


def device_dispatch(definition) -> Callable:
    """The kernel to bind for `definition`: for a plugin with its own CUDA kernel, a callable that runs that
    kernel when its inputs are CUDA tensors (resolved, and for "module:function" imported, at the first
    such call) and the CPU kernel otherwise. Every other operator gets its kernel unchanged."""
    if definition.plugin is None or (definition.domain, definition.op, definition.since) not in _CUDA_KERNELS:
        return definition.kernel
    resolved: list[Callable] = []

    def run(*inputs, **attributes):
        if any(getattr(x, "is_cuda", False) for x in inputs):
            if not resolved:
                resolved.append(kernel_for_device(definition, "cuda"))
            return resolved[0](*inputs, **attributes)
        return definition.kernel(*inputs, **attributes)

    return run


def plugins_used(graph) -> list[dict[str, str]]:
    """What an engine built from `graph` needs registered to load: name, version, op, domain, module."""
    from .ops import registry

    found = {}
    for owner, node in graph.walk():
        definition = registry.lookup(node.op, node.domain, owner.opsets.get(node.domain, graph.opsets.get(node.domain, 1)))
        if definition is not None and definition.plugin is not None:
            found[definition.plugin.name] = {"name": definition.plugin.name, "version": definition.plugin.version,
                                             "op": node.op, "domain": node.domain,
                                             "module": getattr(definition.kernel, "__module__", "") or ""}
    return sorted(found.values(), key=lambda p: p["name"])


def load_plugin_modules(specs: list[str]) -> list[str]:
    """Import the modules that register plugins, as the command line's `--plugins` names them: module names
    (importable, or found in the current directory, as `python -m` finds them) or paths to .py files; each entry
    may hold several, comma-separated. Returns the modules' names. This runs the code the user names, never code an
    engine file names."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    loaded = []
    for spec in (item.strip() for entry in specs for item in entry.split(",")):
        if not spec:
            continue
        path = Path(spec)
        try:
            if spec.endswith(".py"):
                if not path.is_file():
                    raise BuildError(f"plugin file {spec!r} does not exist", code="KILN-E204", where=spec,
                                     hint="give the path of a .py file that registers plugins with @kiln.plugin, or "
                                          "an importable module name")
                name = path.stem
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module  # the kernels' __module__, which engines record, names it
                module_spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())
                name = importlib.import_module(spec).__name__
        except BuildError:
            raise
        except ModuleNotFoundError as error:
            _forget(spec)
            raise BuildError(f"plugin module {spec!r} cannot be imported: no module named {error.name!r}",
                             code="KILN-E204", where=spec,
                             hint="run from the directory that holds it, add its directory to PYTHONPATH, or give "
                                  "the path of its .py file") from None
        except Exception as error:  # noqa: BLE001 (the user's module may raise anything while registering)
            _forget(spec)
            raise BuildError(f"plugin module {spec!r} failed while being imported: {type(error).__name__}: {error}",
                             code="KILN-E204", where=spec, hint="fix the module (--debug shows the traceback)") from error
        loaded.append(name)
    return loaded


def _forget(spec: str) -> None:
    """Drop a .py plugin file's half-imported module, so that a second attempt imports it afresh."""
    import sys
    from pathlib import Path

    if spec.endswith(".py"):
        sys.modules.pop(Path(spec).stem, None)


def check_plugins(required: list[dict[str, str]], source: str = "engine") -> None:
    """Raise KILN-E506 unless every plugin the engine needs is registered here at the version it was built with.
    Nothing is imported or executed on the file's say-so: the user registers plugins before loading."""
    for entry in required:
        registered = [d.plugin for d in versions(entry["op"], entry["domain"]) if d.plugin is not None]
        module = entry.get("module", "")
        how = (f"import {module} (it registers the plugin with @kiln.plugin(\"{entry['op']}\", domain=\"{entry['domain']}\", "
               f"version=\"{entry['version']}\")) before kiln.load")
        if module in ("", "__main__"):
            how = (f"register it with @kiln.plugin(\"{entry['op']}\", domain=\"{entry['domain']}\", "
                   f"version=\"{entry['version']}\") before kiln.load")
        if module not in ("", "__main__"):
            how += f" (on the command line: --plugins {module})"
        if not registered:
            raise EngineFileError(
                f"{source} needs the plugin {entry['name']} (version {entry['version']}, operator "
                f"{entry['domain'] or 'ai.onnx'}::{entry['op']}), which is not registered in this process",
                code="KILN-E506", where=entry["name"], hint=f"{how}; engine files never carry plugin code")
        if all(p.version != entry["version"] for p in registered):
            have = ", ".join(p.version for p in registered)
            raise EngineFileError(f"{source} was built with plugin {entry['name']} version {entry['version']}; "
                                  f"this process registers version {have}", code="KILN-E506", where=entry["name"],
                                  hint="register the same plugin version, or rebuild the engine with this one")


def apply_infer_rules(model, infer_shapes: Callable):
    """Fill in the output types of custom-domain nodes from their plugins' `infer` rules, then let ONNX's shape
    inference carry them on through the standard nodes after them. Returns the annotated ModelProto."""
    from onnx import helper

    from .frontend.onnx import _value_types
    from .ir.dtypes import DType
    from .ops import registry

    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    for _ in range(len(custom)):  # each round can unlock the next plugin node in a chain
        types = _value_types(model.graph)
        known = {t.name for t in model.graph.initializer}
        added = False
        for node in custom:
            if all(_fully_typed(types.get(out)) for out in node.output if out):
                continue
            definition = registry.lookup(node.op_type, node.domain, opsets.get(node.domain, 1))
            if definition is None or definition.infer is None:
                continue
            if any(name and name not in types and name not in known for name in node.input):
                continue  # its inputs are not typed yet
            inputs = [_input_value(name, types, model.graph) for name in node.input]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            for attr_name, value in attrs.items():
                if isinstance(value, bytes):
                    attrs[attr_name] = value.decode("utf-8", errors="replace")
            try:
                rules = list(definition.infer(inputs, attrs))
            except Exception as error:  # noqa: BLE001 (user code: report it as the plugin's)
                raise BuildError(f"plugin {definition.plugin.name if definition.plugin else node.op_type}: its infer rule "
                                 f"failed on node {node.name!r}: {type(error).__name__}: {error}", code="KILN-E204",
                                 where=node.name, hint="infer(inputs, attrs) gets kiln Values (dtype, shape) and the "
                                                       "node's attributes, and returns [(DType, shape), ...]") from None
            for out, (dtype, shape) in zip(node.output, rules):
                if not out:
                    continue
                dtype = DType[dtype] if isinstance(dtype, str) else dtype
                typed = helper.make_tensor_value_info(out, dtype.value, None if shape is None else list(shape))
                declared = next((o for o in model.graph.output if o.name == out), None)
                if declared is not None:  # a graph output declared without a full type
                    declared.type.CopyFrom(typed.type)
                else:
                    model.graph.value_info.append(typed)
                added = True
        if not added:
            break
        model = infer_shapes(model)
    return model


def _fully_typed(type_proto) -> bool:
    return (type_proto is not None and type_proto.HasField("tensor_type") and bool(type_proto.tensor_type.elem_type)
            and type_proto.tensor_type.HasField("shape"))


def _input_value(name: str, types: dict, graph):
    from onnx import numpy_helper

    from .frontend.onnx import _value
    from .ir import Value
    from .ir.dtypes import from_numpy

    if not name:
        return None
    if name in types:
        return _value(name, types[name])
    for tensor in graph.initializer:
        if tensor.name == name:
            array = numpy_helper.to_array(tensor)
            return Value(name, from_numpy(array.dtype), tuple(array.shape))
    return Value(name)
