"""Write one self-contained HTML report: latency histogram, per-layer times and errors, memory timeline, build summary.

  kiln report model.onnx -o report.html [build flags] [--iterations 10 --duration 1]
  kiln report model.kiln --model model.onnx -o report.html

The page needs nothing from the network: charts are inline SVG. Per-layer errors compare every
intermediate tensor that survived fusion with onnxruntime, so they need the .onnx model.
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("path", help="an .onnx model (built first with the build flags) or a .kiln engine")
    parser.add_argument("-o", "--output", metavar="FILE.html", help="where to write (default: PATH.report.html)")
    parser.add_argument("--model", metavar="MODEL.onnx", help="the model a .kiln engine was built from (for per-layer errors)")
    group = parser.add_argument_group("measurement")
    group.add_argument("--warmUp", type=float, default=200.0, metavar="MS", help="warm-up time in milliseconds (default 200)")
    group.add_argument("--iterations", type=int, default=10, metavar="N", help="time at least N inferences (default 10)")
    group.add_argument("--duration", type=float, default=1.0, metavar="S", help="time for at least S seconds (default 1)")
    group.add_argument("--shapes", metavar="SPEC", help="shapes of dynamic inputs, e.g. input:4x3x224x224")
    group.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    group.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the comparison (default 1e-4)")
    group.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the comparison (default 1e-3)")
    shared.add_build_arguments(parser)
    shared.add_profile_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    from ..tools.memory import format_bytes
    from ..tools.report import make_report

    output = args.output or str(Path(args.path).with_suffix(".report.html"))
    made = make_report(args.path, output, shared.config_from_args(args), model=args.model,
                       shapes=shared.parse_shape_list(args.shapes), seed=args.seed, warmup_ms=args.warmUp,
                       iterations=args.iterations, duration_s=args.duration, atol=args.atol, rtol=args.rtol)
    bench, comparison = made["bench"], made["comparison"]
    print(f"wrote {output}")
    print(f"  latency median {bench.stats('latency')['median']:.3f} ms over {bench.iterations} runs; "
          f"peak host memory {format_bytes(made['memory']['peak_host_bytes'])}")
    if comparison is not None:
        print(f"  outputs {'PASS' if comparison.passed else 'FAIL'} against onnxruntime; "
              f"{len(comparison.layers)} intermediate tensors compared")
    return 0
