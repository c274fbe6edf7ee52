"""Build an engine from a model.

  kiln build model.onnx --saveEngine model.kiln [--bf16] [--verbose]
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--saveEngine", metavar="PATH", help="where to write the engine (default: MODEL.kiln)")
    shared.add_build_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    from ..builder import build

    engine = build(args.model, shared.config_from_args(args))
    path = args.saveEngine or str(Path(args.model).with_suffix(".kiln"))
    engine.save(path)
    info = engine.plan.build_info
    print(f"built {path}: {len(engine.plan.graph.nodes)} layers for {engine.device} in {info['build_seconds']:.2f} s")
    print(f"  inputs:  {', '.join(str(b) for b in engine.inputs)}")
    print(f"  outputs: {', '.join(str(b) for b in engine.outputs)}")
    return 0
