"""Build an engine from a model.

  kiln build model.onnx --saveEngine model.kiln [--bf16] [--verbose]
  kiln build saved_model_dir/          (TensorFlow SavedModel; pip install kiln[tensorflow])
  kiln build model.keras               (Keras; pip install kiln[tensorflow])
  kiln build my_package.models:make_model
                                       (PyTorch: make_model() returns (module, example_inputs) or
                                        (module, example_inputs, dynamic_shapes); .pt files are never unpickled)
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("model", help="an .onnx file, a SavedModel directory, a .keras file, or a PyTorch entry point "
                                      "pkg.module:function that returns (module, example_inputs)")
    parser.add_argument("--saveEngine", metavar="PATH", help="where to write the engine (default: MODEL.kiln)")
    shared.add_build_arguments(parser)
    shared.add_profile_arguments(parser)
    parser.add_argument("--useCudaGraph", action="store_true", help="replay the whole engine as CUDA graphs (GPU; the default "
                        "for static shapes, so this forces it for dynamic ones)")


def run(args) -> int:
    from ..builder import build
    from ..tools.memory import MemoryMonitor

    with MemoryMonitor(device=args.device) as build_memory:
        engine = build(args.model, _config(args))
    engine.plan.build_info["build_memory"] = {k: v for k, v in build_memory.summary().items() if k != "device"}
    path = args.saveEngine or _default_engine_path(args.model)
    engine.save(path)
    info = engine.plan.build_info
    print(f"built {path}: {len(engine.plan.graph.nodes)} layers for {engine.device} in {info['build_seconds']:.2f} s")
    print(f"  inputs:  {', '.join(str(b) for b in engine.inputs)}")
    print(f"  outputs: {', '.join(str(b) for b in engine.outputs)}")
    for index, profile in enumerate(engine.profiles):
        print(f"  profile {index}: {profile}")
    if "quantization" in info:
        from ..quant.report import describe

        print(describe(info["quantization"]))
    if args.verbose:
        print(f"  build: {build_memory.describe()}")
        print(f"  run:   {_run_memory(engine).describe()} (one inference on fixed-seed random inputs)")
    return 0


def _default_engine_path(model: str) -> str:
    """MODEL.kiln beside an .onnx/.keras file or SavedModel directory; FUNCTION.kiln for an entry point."""
    from pathlib import Path

    from ..frontend import model_kind

    if model_kind(model) == "entry_point":
        return model.rpartition(":")[2] + ".kiln"
    path = Path(model)
    if path.is_dir():
        return str(path.resolve().parent / (path.resolve().name + ".kiln"))
    return str(path.with_suffix(".kiln"))


def _config(args):
    config = shared.config_from_args(args)
    if args.useCudaGraph:
        if args.device != "cuda":
            from ..errors import BuildError

            raise BuildError("--useCudaGraph needs a GPU build", code="KILN-E203", hint="add --device cuda, or drop --useCudaGraph")
        config.extra["use_cuda_graph"] = True
    return config


def _run_memory(engine):
    """Memory of one inference, so a verbose build shows what running the engine will need."""
    from ..tools.inputs import random_feed
    from ..tools.memory import MemoryMonitor

    feed = random_feed(engine.inputs, seed=0)
    with MemoryMonitor(device=engine.device) as memory:
        engine.run(feed)
    return memory
