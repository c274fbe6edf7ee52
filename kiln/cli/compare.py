"""Check an engine against onnxruntime on the same inputs: errors per output, PASS/FAIL (exit code 0/1).

  kiln compare model.onnx [--engine model.kiln | build flags] [--atol 1e-4] [--rtol 1e-3]
  kiln compare model.onnx --bf16 --layerwise          name the first layer that leaves the tolerance
  kiln compare model.onnx --save-inputs in.npz --save-outputs out.npz
  kiln compare model.onnx --load-inputs in.npz

Inputs are fixed-seed random (--seed) unless loaded. An element passes when
|kiln - onnxruntime| <= atol + rtol * |onnxruntime|; every element of every output must pass.
--layerwise compares each intermediate tensor that survived fusion, reading it from the engine as built.
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .onnx model: onnxruntime runs it as the reference")
    parser.add_argument("--engine", metavar="PATH", help="a .kiln engine built from the model (default: build one now)")
    group = parser.add_argument_group("comparison")
    group.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    group.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    group.add_argument("--layerwise", action="store_true", help="compare every intermediate tensor that survived fusion")
    group.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    group.add_argument("--shapes", metavar="SPEC", help="shapes of dynamic inputs, e.g. input:4x3x224x224")
    group.add_argument("--load-inputs", metavar="FILE.npz", help="inputs from an .npz file (name -> array)")
    group.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="one input from a .npy file (repeatable)")
    group.add_argument("--save-inputs", metavar="FILE.npz", help="write the inputs used")
    group.add_argument("--save-outputs", metavar="FILE.npz", help="write both sides' outputs as kiln/NAME and onnxruntime/NAME")
    group.add_argument("--json", action="store_true", help="print the comparison as JSON")
    shared.add_build_arguments(parser)
    shared.add_profile_arguments(parser)


def run(args) -> int:
    import json

    from ..tools import bench, compare
    from ..tools.inputs import load_inputs

    engine = bench.open_engine(args.engine, None) if args.engine else bench.open_engine(args.model, shared.config_from_args(args))
    given = compare.load_arrays(args.load_inputs) if args.load_inputs else {}
    given.update(load_inputs(shared.parse_named_files(args.input)))
    feed = bench.sample_feed(engine, args.seed, shared.parse_shape_list(args.shapes), given)
    if args.save_inputs:
        compare.save_arrays(args.save_inputs, feed)
    result, kiln_outputs, reference = compare.compare(args.model, engine, feed, atol=args.atol, rtol=args.rtol,
                                                      layerwise=args.layerwise)
    if args.save_outputs:
        arrays = {f"kiln/{name}": value for name, value in kiln_outputs.items()}
        arrays.update({f"onnxruntime/{name}": value for name, value in reference.items()})
        compare.save_arrays(args.save_outputs, arrays)
    print(json.dumps(result.to_json(), indent=1) if args.json else compare.format_result(result))
    return 0 if result.passed else 1
