"""Expanding ONNX functions into plain nodes: model-local functions, and the function bodies that
ONNX's operator schemas define, so a composite operator kiln has no kernel for still runs."""
from __future__ import annotations

from typing import Callable

import onnx

from .. import log

_EXPAND_DOMAIN = "kiln.expand"


def inline_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if not model.functions:
        return model
    from onnx import inliner

    log.verbose("inlining %d model-local function(s)", len(model.functions))
    return inliner.inline_local_functions(model)


def schema_function(node: onnx.NodeProto, opset: int, input_types: list[onnx.TypeProto | None]) -> onnx.FunctionProto | None:
    """The function body ONNX defines for `node`'s operator at `opset`, if any."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    body = None
    plain = [v for v in schema.function_opset_versions if v <= opset]
    contextual = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    try:
        if plain:
            body = schema.get_function_with_opset_version(max(plain))
        elif contextual and all(t is not None for name, t in zip(node.input, input_types) if name):
            # An omitted optional input ("") goes to ONNX's function builder as an empty type.
            types = [t if t is not None else onnx.TypeProto() for t in input_types]
            body = schema.get_context_dependent_function_with_opset_version(
                max(contextual), node.SerializeToString(), [t.SerializeToString() for t in types])
    except Exception:  # noqa: BLE001 (onnx raises plain errors for types its function builder cannot handle)
        return None
    if isinstance(body, bytes):
        body = onnx.FunctionProto.FromString(body) if body else None
    if body is None or not body.node:
        return None
    function = onnx.FunctionProto()
    function.CopyFrom(body)
    function.domain = _EXPAND_DOMAIN
    function.name = node.op_type
    if not function.opset_import:
        function.opset_import.add(domain="", version=opset)
    present = {a.name for a in function.attribute_proto}
    for name, attribute in schema.attributes.items():
        if name not in present and attribute.default_value.type != onnx.AttributeProto.UNDEFINED:
            default = onnx.AttributeProto()
            default.CopyFrom(attribute.default_value)
            default.name = name
            function.attribute_proto.append(default)
    declared = list(function.attribute)
    del function.attribute[:]
    function.attribute.extend(name for name in declared if name not in {a.name for a in function.attribute_proto})
    return function


def expand_schema_functions(model: onnx.ModelProto, needs_expansion: Callable[[onnx.NodeProto], bool],
                            types: dict[str, onnx.TypeProto]) -> tuple[onnx.ModelProto, list[str]]:
    """Replace every node that `needs_expansion` and that has a schema function by its body."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    expanded: list[str] = []
    functions: dict[str, onnx.FunctionProto] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)
            # ai.onnx.preview operators (FlexAttention) are defined by function bodies over standard operators too.
            if node.domain not in ("", "ai.onnx", "ai.onnx.preview") or not needs_expansion(node):
                continue
            input_types = [types.get(name) if name else None for name in node.input]
            function = schema_function(node, opset, input_types)
            if function is None:
                continue
            key = node.op_type if not _context_dependent(node, opset) else f"{node.op_type}__{len(functions)}"
            function.name = key
            functions.setdefault(key, function)
            node.domain = _EXPAND_DOMAIN
            node.op_type = key
            expanded.append(f"{node.name or key}")

    visit(model_copy.graph)
    if not functions:
        return model, []
    model_copy.functions.extend(functions.values())
    model_copy.opset_import.add(domain=_EXPAND_DOMAIN, version=1)
    from onnx import inliner

    inlined = inliner.inline_local_functions(model_copy, convert_version=True)
    kept = [o for o in inlined.opset_import if o.domain != _EXPAND_DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    log.verbose("expanded %d node(s) into their ONNX function bodies: %s", len(expanded), ", ".join(expanded[:10]))
    return inlined, expanded


def _context_dependent(node: onnx.NodeProto, opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return False
    return not schema.has_function and schema.has_context_dependent_function
