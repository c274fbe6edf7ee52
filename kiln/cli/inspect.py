"""Show what a model or an engine holds.

  kiln inspect model.onnx     opset, operator histogram, inputs/outputs (dynamic dims), unsupported nodes
  kiln inspect model.kiln     target, build info, bindings, layers after fusion (the model nodes each came
                              from, op, precision, tactic, shapes), activation memory (peak, naive sum, lower bound);
                              precision "follow" marks a layer that runs in the float type its inputs arrive in
  kiln inspect model.kiln --export-onnx fused.onnx
                              also write the optimized graph as ONNX (fused layers in domain "kiln"), for Netron
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("path", help="an .onnx model or a .kiln engine")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--export-onnx", metavar="FILE", help="write an engine's optimized graph as an ONNX file")


def run(args) -> int:
    import json

    from ..tools.inspect import export_onnx, format_report, inspect_path

    report = inspect_path(args.path)
    if args.export_onnx:
        if report["kind"] != "engine":
            from ..errors import EngineFileError

            raise EngineFileError(f"--export-onnx needs a .kiln engine; {args.path} is an ONNX model", code="KILN-E501",
                                  hint=f"build it first: kiln build {args.path} --saveEngine m.kiln, then inspect m.kiln")
        report["exported_onnx"] = {"path": args.export_onnx, "nodes": export_onnx(args.path, args.export_onnx)}
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    if args.export_onnx and not args.json:
        print(f"  wrote the optimized graph ({report['exported_onnx']['nodes']} nodes) to {args.export_onnx}")
    return 0
