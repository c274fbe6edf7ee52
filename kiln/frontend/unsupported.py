"""The one KILN-E101 error that names every unsupported node, where it is, and the concrete way out for each:
an opset conversion, an automatic decomposition (ONNX function bodies), or a plugin skeleton whose
signature has the operator's inputs and attributes."""
from __future__ import annotations

import keyword
import re

import onnx

from ..errors import ParseError
from ..ir import Graph, Node


def _kernel_opsets(node: Node) -> list[int]:
    from ..ops import registry

    return [d.since for d in registry.versions(node.op, node.domain)]


def _schema(node: Node, opset: int | None = None):
    """ONNX's schema for the node's operator at `opset` (the newest one when None), or None."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        if opset is None:
            return onnx.defs.get_schema(node.op, domain)
        return onnx.defs.get_schema(node.op, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _function_from(schema) -> int | None:
    """The first opset at which ONNX defines `schema`'s operator as a function body, or None."""
    found = list(schema.function_opset_versions) + list(schema.context_dependent_function_opset_versions)
    return min(found) if found else None


def way_out(node: Node, opset: int, reason: str, graph: Graph | None = None) -> str:
    """The concrete thing a user can do about one unsupported node (the first line; a skeleton may follow).
    `graph`, the model's graph, lets the advice for an operator written under too old an opset say whether
    raising the model's opset is safe."""
    known = _kernel_opsets(node)
    here = _schema(node, opset)
    newest = _schema(node)
    convert = "convert the model with onnx.version_converter.convert_version(model, {0}) and rebuild"
    if here is None and newest is not None and newest.since_version > opset and not node.domain:
        return _too_new(node, opset, known, graph)
    if known and min(known) > opset:
        return f"kiln implements {node.op} from opset {min(known)}: {convert.format(min(known))}"
    if here is not None:
        function_opset = _function_from(here)
        if function_opset is None and newest is not None:  # a later version of the operator has a body
            function_opset = _function_from(newest)
        if function_opset is not None and function_opset > opset:
            return (f"ONNX defines {node.op} as a function from opset {function_opset}, which kiln expands automatically: "
                    f"{convert.format(function_opset)}")
        if function_opset is not None:
            return (f"ONNX defines {node.op} as a function, but its body needs the input types, which shape inference "
                    f"did not find here: declare the input types (onnx.shape_inference.infer_shapes) and kiln expands "
                    f"it automatically; or register a plugin:")
    if reason.startswith("no kernel for") and " in " in reason:
        return f"cast the input to one of the listed types in the model, or register a plugin that overrides {node.op_key}:"
    if here is None and newest is None and not node.domain:
        return f"{node.op} is not an ONNX operator (check the exporter), or register a plugin for it:"
    return f"register a plugin for {node.op_key} (docs/plugins.md):"


def _first_opset(op: str) -> int:
    """The opset in which ONNX's default-domain operator `op` first appears."""
    return min(s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == "")


def _too_new(node: Node, opset: int, known: list[int], graph: Graph | None) -> str:
    """The way out for an operator that exists only in opsets newer than the model's: the exporter wrote it under
    too old an opset. onnx.version_converter cannot help (it has no adapter for a node its source opset lacks), but
    where no other operator of the model changes up to the opset that has it, raising the opset import is exact."""
    first = _first_opset(node.op)
    body = _function_from(_schema(node, first))
    target = max(first, min(known)) if known else (max(first, body) if body is not None else None)
    if target is None:
        return (f"{node.op} is an ONNX operator from opset {first}, not in opset {opset}, and kiln has no kernel for it "
                f"at any opset: register a plugin for it (docs/plugins.md):")
    how = "kiln runs it there" if known else "ONNX defines it as a function there, which kiln expands automatically"
    start = f"{node.op} is an ONNX operator from opset {first}, not in opset {opset} ({how})"
    changed = _changed_operators(graph, opset, target) if graph is not None else None
    raise_import = (f"set the model's opset import to {target}: next(o for o in model.opset_import if o.domain in "
                    f"('', 'ai.onnx')).version = {target}; onnx.version_converter cannot convert a node its source "
                    f"opset lacks")
    if changed is None:
        return (f"{start}: re-export at opset {target} or newer; or, if no other operator of the model changes between "
                f"opset {opset} and {target}, {raise_import}")
    if not changed:
        return f"{start}: no other operator of the model changes between opset {opset} and {target}, so {raise_import}"
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return (f"{start}: re-export the model at opset {target} or newer (onnx.version_converter cannot convert a node "
            f"its source opset lacks, and {shown} change{'s' if len(changed) == 1 else ''} between opset {opset} and "
            f"{target}, so raising the opset import alone is not exact)")


def _changed_operators(graph: Graph, opset: int, target: int) -> list[str]:
    """The default-domain operators of `graph` (subgraphs included) that ONNX defines at `opset` differently than
    at `target`. Operators that are not in opset `opset` at all are left out: raising the opset is what makes the
    ones that come later real, and custom ones are in neither."""
    changed = set()
    for _, other in graph.walk():
        if other.domain or other.op in changed:
            continue
        before, after = _schema(other, opset), _schema(other, target)
        if before is not None and (after is None or before.since_version != after.since_version):
            changed.add(other.op)
    return sorted(changed)


def plugin_skeleton(node: Node, opset: int) -> str:
    """A plugin declaration with the right signature for `node`'s operator, to fill in."""
    schema = _schema(node, opset) or _schema(node)
    params = _input_params(node, schema)
    attributes = _attribute_params(node, schema)
    keyword_only = [] if params and params[-1].startswith("*") else ["*"]  # after *inputs they already are
    signature = ", ".join(params + (keyword_only + attributes if attributes else []))
    domain = f", domain=\"{node.domain}\"" if node.domain else ""
    # ONNX infers outputs of its own operators; a custom one needs the rule.
    infer = "" if schema is not None else ",\n             infer=lambda inputs, attrs: [(inputs[0].dtype, inputs[0].shape)]"
    rule = "" if schema is not None else "  # infer: one (dtype, shape) per output"
    return (f"@kiln.plugin(\"{node.op}\"{domain}, version=\"1.0\"{infer}){rule}\n"
            f"def {_identifier(_snake(node.op))}({signature}):\n"
            f"    ...  # torch code; return {len(node.outputs)} tensor(s)")


def _input_params(node: Node, schema) -> list[str]:
    if schema is None:
        return [f"x{i}" for i in range(len(node.inputs))] or ["x"]
    params = []
    for formal in schema.inputs:
        name = _identifier(_snake(formal.name))
        if formal.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            params.append(f"*{name}")
            break
        params.append(f"{name}=None" if formal.option == onnx.defs.OpSchema.FormalParameterOption.Optional else name)
    return params


def _attribute_params(node: Node, schema) -> list[str]:
    if schema is None:
        return [f"{_identifier(name)}={_literal(value)}" for name, value in sorted(node.attrs.items())]
    params = []
    for name, attribute in sorted(schema.attributes.items()):
        default = attribute.default_value
        if default.type != onnx.AttributeProto.UNDEFINED:
            params.append(f"{_identifier(name)}={_literal(onnx.helper.get_attribute_value(default))}")
        else:
            params.append(f"{_identifier(name)}=None")
    return params


def _literal(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
        return repr(list(value))
    return "None"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name) or "x"
    name = f"_{name}" if name[0].isdigit() else name
    return f"{name}_" if keyword.iskeyword(name) else name


def describe_unsupported(problems: list[tuple[Node, int, str]], graph: Graph) -> ParseError:
    kinds = sorted({node.op_key for node, _, _ in problems})
    lines = [f"{len(problems)} node(s) use {len(kinds)} operator(s) kiln cannot run: {', '.join(kinds)}"]
    shown = problems[:50]
    skeletons_shown: set[str] = set()
    for node, opset, reason in shown:
        domain = node.domain or "ai.onnx"
        lines.append(f"  - node {node.name!r}: {node.op} (domain {domain}, opset {opset}): {reason}")
        first = way_out(node, opset, reason, graph)
        lines.append(f"      way out: {first}")
        if first.endswith(":") and node.op_key not in skeletons_shown:
            skeletons_shown.add(node.op_key)
            lines.extend("        " + line for line in plugin_skeleton(node, opset).splitlines())
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return ParseError("\n".join(lines), code="KILN-E101", where=", ".join(n.name for n, _, _ in problems[:10]),
                      hint="each node above has its way out; a plugin is registered before kiln.build, or on the command "
                           "line with kiln build --plugins my_plugins.py (docs/plugins.md)")
