"""Show what a model or an engine holds.

  kiln inspect model.onnx     opset, operator histogram, inputs/outputs (dynamic dims), unsupported nodes
  kiln inspect model.kiln     target, build info, bindings, layers with precision and tactic
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("path", help="an .onnx model or a .kiln engine")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import json

    from ..tools.inspect import format_report, inspect_path

    report = inspect_path(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
