"""Check a model before building it: each finding as symptom, cause and fix; exit 1 when one blocks the build.

  kiln doctor model.onnx [build flags] [--input NAME=FILE.npy | --load-inputs in.npz] [--shapes x:4x3x224x224]
  kiln doctor model.onnx --int8 --calib calib_dir/     is the calibration data representative?
  kiln doctor old_model.onnx --fix                     write the model converted to kiln's opset
  kiln doctor model.onnx --json
  kiln doctor model.kiln                               is the engine whole and runnable here? fallbacks, memory

Checks: opset too new or too old, unsupported operators, dynamic inputs without profiles, inputs that do
not match the model (batch, shape, dtype), calibration data missing or unrepresentative, fp16 overflow on
sample data, memory needed against memory available, layers falling back to a slower precision or tactic,
and launch-bound engines (many tiny layers); for an engine file also whether it is whole and built for
this machine and its plugins. Peak host and device memory while checking are reported.
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("model", help="an .onnx model, or a .kiln engine (the checks that apply to a built engine)")
    group = parser.add_argument_group("doctor")
    group.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input to check against the model (repeatable)")
    group.add_argument("--load-inputs", metavar="FILE.npz", help="inputs from an .npz file (name -> array)")
    group.add_argument("--shapes", metavar="SPEC", help="shapes to sample dynamic inputs with, e.g. input:4x3x224x224")
    group.add_argument("--seed", type=int, default=0, help="seed of the random sample inputs (default 0)")
    group.add_argument("--fix", action="store_true", help="write the model converted to an opset kiln reads (see --output)")
    group.add_argument("--output", metavar="PATH", help="where --fix writes (default: MODEL.opsetN.onnx beside the model)")
    group.add_argument("--json", action="store_true", help="print the findings as JSON")
    shared.add_build_arguments(parser)
    shared.add_profile_arguments(parser)
    if "--calib" not in parser._option_string_actions:  # the INT8 build flags may define it already
        group.add_argument("--calib", metavar="PATH", help="calibration data: an .npz feed or a directory of them")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..frontend.onnx import CANONICAL_OPSET
    from ..tools import doctor
    from ..tools.compare import load_arrays
    from ..tools.inputs import load_inputs

    given = load_arrays(args.load_inputs) if args.load_inputs else {}
    given.update(load_inputs(shared.parse_named_files(args.input)))
    fix_path = None
    if args.fix:
        fix_path = args.output or str(Path(args.model).with_suffix(f".opset{CANONICAL_OPSET}.onnx"))
    config = shared.config_from_args(args)
    calib = getattr(args, "calib", None)
    report = doctor.diagnose(args.model, config, given=given, shapes=shared.parse_shape_list(args.shapes),
                             calib=calib if isinstance(calib, str) else None, fix_path=fix_path, seed=args.seed)
    if args.json:
        data = report.to_json()
        data["memory"].pop("timeline", None)
        print(json.dumps(data, indent=1, default=str))
    else:
        print(doctor.format_report(report))
    return 1 if report.blocked else 0
