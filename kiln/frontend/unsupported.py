"""The one KILN-E101 error that names every unsupported node, where it is, and the way out for each."""
from __future__ import annotations

import onnx

from ..errors import ParseError
from ..ir import Graph, Node


def _kernel_opsets(node: Node) -> list[int]:
    from ..ops import registry

    return [d.since for d in registry.versions(node.op, node.domain)]


def way_out(node: Node, opset: int, reason: str) -> str:
    """The concrete thing a user can do about one unsupported node."""
    if node.domain not in ("", "ai.onnx"):
        return (f"register a plugin for {node.domain}::{node.op}: "
                f"@kiln.plugin(\"{node.op}\", domain=\"{node.domain}\", version=\"1.0\", "
                f"infer=...) def {_snake(node.op)}({', '.join(f'x{i}' for i in range(len(node.inputs))) or 'x'}"
                f"{', *, ' + ', '.join(sorted(node.attrs)) if node.attrs else ''}): ... (see docs/plugins.md)")
    known = _kernel_opsets(node)
    if known and min(known) > opset:
        return f"convert the model to opset {min(known)} or newer (onnx.version_converter.convert_version)"
    if reason.startswith("no kernel for") or reason.startswith("attribute"):
        return "export the model without this variant, or register a plugin that overrides it (docs/plugins.md)"
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain)
        if schema.has_function or schema.has_context_dependent_function:
            return ("ONNX defines this operator as a function, but its body could not be expanded for these input "
                    "types; re-export with the operator decomposed")
    except onnx.defs.SchemaError:
        return f"{node.op} is not an operator of ONNX opset {opset}: check the exporter, or register a plugin (docs/plugins.md)"
    return (f"register a plugin for {node.op} (docs/plugins.md): @kiln.plugin(\"{node.op}\", version=\"1.0\", infer=...) "
            f"def {_snake(node.op)}(...): ...; or replace it in the model before export")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def describe_unsupported(problems: list[tuple[Node, int, str]], graph: Graph) -> ParseError:
    kinds = sorted({node.op_key for node, _, _ in problems})
    lines = [f"{len(problems)} node(s) use {len(kinds)} operator(s) kiln cannot run: {', '.join(kinds)}"]
    shown = problems[:50]
    for node, opset, reason in shown:
        domain = node.domain or "ai.onnx"
        lines.append(f"  - node {node.name!r}: {node.op} (domain {domain}, opset {opset}): {reason}")
        lines.append(f"      way out: {way_out(node, opset, reason)}")
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return ParseError("\n".join(lines), code="KILN-E101", where=", ".join(n.name for n, _, _ in problems[:10]),
                      hint="each line above names the node and its way out; `kiln doctor model.onnx` explains more")
