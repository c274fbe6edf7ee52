"""Argument groups shared by subcommands, so `build`, `bench` and `compare` spell each option the same way."""
from __future__ import annotations

import argparse


def logging_group() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("logging")
    group.add_argument("--verbose", "-v", action="store_true", help="log every stage: parsing, each pass, lowering, steps")
    group.add_argument("--debug", action="store_true", help="show the Python traceback of a KilnError")
    plugins = parent.add_argument_group("plugins")
    plugins.add_argument("--plugins", action="append", default=[], metavar="MODULE",
                         help="import this module first (a name, or a path to a .py file; repeatable or comma-separated): "
                              "the plugins it registers with @kiln.plugin serve models and engines that need them")
    return parent


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Device and precision flags, named as trtexec names them."""
    group = parser.add_argument_group("build")
    group.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="target device (default: cpu)")
    group.add_argument("--fp16", action="store_true", help="allow fp16 layers (GPU)")
    group.add_argument("--bf16", action="store_true", help="allow bf16 layers (CPUs with AVX512-BF16/AMX, GPUs)")
    group.add_argument("--tf32", action="store_true", help="allow tf32 matrix math (GPU; off unless asked, as in TensorRT)")
    group.add_argument("--int8", action="store_true", help="allow int8 layers (needs --calib or a QDQ model)")
    group.add_argument("--fp8", action="store_true", help="allow fp8 e4m3 layers (GPU, compute capability 8.9+)")
    group.add_argument("--best", action="store_true", help="let the builder choose the fastest precision per layer")
    group.add_argument("--noOptimize", action="store_true", help="run only constant folding and dead-code removal")
    add_quant_arguments(parser)
    cuda = parser.add_argument_group("cuda")
    cuda.add_argument("--timingCacheFile", metavar="PATH", help="read and write tactic timings here (GPU builds): a second "
                      "build of the same model on the same GPU skips the timing")
    cuda.add_argument("--noCudaGraph", action="store_true", help="run GPU engines step by step, never as a CUDA graph "
                      "(by default a static-shape engine replays one whole-engine graph per input shape)")
    cuda.add_argument("--memPoolSize", metavar="workspace:N", help="GPU memory the engine may use beyond its weights, in MiB "
                      "(or with a K/M/G suffix); a build that needs more fails with KILN-E601")


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """INT8 calibration, per-layer precision and accuracy-budget flags (kiln/quant; docs/quantization.md)."""
    group = parser.add_argument_group("int8")
    group.add_argument("--calib", metavar="DATA", help="calibration data for --int8: a directory of .npz feeds (or .npy "
                       "for a one-input model), 100-500 real inputs")
    group.add_argument("--calibCache", metavar="FILE", help="calibration cache: written after calibrating, and read "
                       "instead of calibrating (no --calib needed) when it exists")
    group.add_argument("--calibrator", default="entropy", choices=["entropy", "percentile", "mse", "minmax"],
                       help="how thresholds are chosen (default entropy, as TensorRT; percentile keeps 99.99%%)")
    group.add_argument("--calibBatches", type=int, metavar="N", help="use at most N calibration feeds")
    group.add_argument("--layerPrecisions", metavar="SPEC", help="per-layer precision, e.g. 'conv1:fp32,*:int8' "
                       "(model or kiln layer names, wildcards allowed)")
    group.add_argument("--precisionConstraints", default="none", choices=["none", "prefer", "obey"],
                       help="none: int8 where it is faster; prefer: as --layerPrecisions asks; obey: as asked, and "
                            "fail where a layer cannot")
    group.add_argument("--validation", metavar="DATA", help="validation feeds (like --calib): checks that the "
                       "calibration data covers them, and measures the accuracy budget")
    group.add_argument("--accuracyBudget", type=float, metavar="X", help="most error allowed against fp32: the most "
                       "sensitive int8 layers return to fp32 until it holds (needs --validation)")
    group.add_argument("--accuracyMetric", default="top1", choices=["top1", "relerr"],
                       help="top1: points of top-1 disagreement with fp32; relerr: relative L2 error of the outputs")


def quant_options(args: argparse.Namespace) -> dict:
    from ..quant.config import parse_layer_precisions

    return {"calib": getattr(args, "calib", None), "calib_cache": getattr(args, "calibCache", None),
            "calibrator": getattr(args, "calibrator", "entropy"), "calib_batches": getattr(args, "calibBatches", None),
            "layer_precisions": parse_layer_precisions(getattr(args, "layerPrecisions", None)),
            "precision_constraints": getattr(args, "precisionConstraints", "none"),
            "validation": getattr(args, "validation", None), "accuracy_budget": getattr(args, "accuracyBudget", None),
            "accuracy_metric": getattr(args, "accuracyMetric", "top1")}


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimization profiles for dynamic inputs, in trtexec's syntax; repeating the three flags adds a profile."""
    group = parser.add_argument_group("dynamic shapes")
    for kind, what in (("min", "smallest"), ("opt", "tuned-for"), ("max", "largest")):
        group.add_argument(f"--{kind}Shapes", action="append", metavar="SPEC",
                           help=f"the {what} shape of each dynamic input, e.g. input:1x3x224x224,mask:1x128")
    group.add_argument("--useModelShapes", action="store_true",
                       help="build dynamic inputs without a profile for the shapes the model declares, each "
                            "dimension it gives no size at 1 (a warning names them)")


def profiles_from_args(args: argparse.Namespace) -> list:
    """The profiles --minShapes/--optShapes/--maxShapes give; as in trtexec, a build given only --shapes gets one
    profile of exactly those shapes."""
    from ..engine.profiles import profiles_from_flags

    mins, opts, maxs = (getattr(args, f"{kind}Shapes", None) for kind in ("min", "opt", "max"))
    if not (mins or opts or maxs) and getattr(args, "shapes", None):
        opts = [args.shapes]
    return profiles_from_flags(mins, opts, maxs)


def config_from_args(args: argparse.Namespace):
    from ..builder import BuilderConfig

    config = BuilderConfig(device=args.device, fp16=args.fp16, bf16=args.bf16, tf32=args.tf32, int8=args.int8,
                           fp8=args.fp8, best=args.best, optimize=not args.noOptimize, **quant_options(args))
    cuda_options = {"timing_cache_file": getattr(args, "timingCacheFile", None),
                    "use_cuda_graph": False if getattr(args, "noCudaGraph", False) else None,
                    "mem_pool_size": getattr(args, "memPoolSize", None)}
    if args.device != "cuda" and any(v is not None for v in cuda_options.values()):
        from ..errors import BuildError

        raise BuildError("--timingCacheFile, --noCudaGraph and --memPoolSize apply to GPU builds only", code="KILN-E203",
                         hint="add --device cuda, or drop the GPU options")
    config.extra.update({k: v for k, v in cuda_options.items() if v is not None})
    config.profiles = profiles_from_args(args)
    config.use_model_shapes = getattr(args, "useModelShapes", False)
    return config


def parse_named_files(items: list[str] | None, what: str = "--input") -> dict[str, str]:
    """`name=path` pairs to a dict; input names may contain ':' or '/' but not '='."""
    from ..errors import BindingError

    named = {}
    for item in items or []:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            raise BindingError(f"{what} {item!r} is not of the form name=file.npy", code="KILN-E402",
                               hint=f"write {what} input_name=path/to/array.npy")
        named[name] = path
    return named


def parse_shape_list(text: str | None, option: str = "--shapes") -> dict[str, tuple[int, ...]]:
    """trtexec's shape syntax, `name:1x3x224x224,other:1x128`, to {name: shape}; input names may contain ':'."""
    from ..errors import BindingError

    shapes: dict[str, tuple[int, ...]] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, dims = item.strip().rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name.strip("'\"")] = tuple(int(d) for d in dims.split("x")) if dims.strip() else ()
        except ValueError:
            raise BindingError(f"{option} {item!r} is not of the form name:1x3x224x224", code="KILN-E405",
                               hint=f"write {option} input:1x3x224x224[,other:1x128]") from None
    return shapes
