"""Time an engine (or a model, built first) with trtexec's options: throughput and latency percentiles.

  kiln bench model.kiln [--warmUp 200] [--iterations 10] [--duration 3] [--shapes input:1x3x224x224]
  kiln bench model.onnx --bf16 --dumpProfile --exportTimes times.json --exportProfile profile.json

Runs warm-up for --warmUp milliseconds, then at least --iterations inferences for at least --duration
seconds. Latency is host-to-device + compute + device-to-host per inference; on a GPU the split is shown.
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a .kiln engine, or an .onnx model to build first with the build flags below")
    group = parser.add_argument_group("benchmark (trtexec's names)")
    group.add_argument("--warmUp", type=float, default=200.0, metavar="MS", help="warm-up time in milliseconds (default 200)")
    group.add_argument("--iterations", type=int, default=10, metavar="N", help="run at least N inferences (default 10)")
    group.add_argument("--duration", type=float, default=3.0, metavar="S", help="run for at least S seconds (default 3)")
    group.add_argument("--shapes", metavar="SPEC", help="shapes of dynamic inputs, e.g. input:4x3x224x224,mask:4x128")
    group.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    group.add_argument("--useCudaGraph", action="store_true", help="capture the engine in a CUDA graph and replay it (GPU)")
    group.add_argument("--noDataTransfers", action="store_true", help="leave inputs on the device and outputs uncopied")
    group.add_argument("--separateProfileRun", action="store_true",
                       help="profile layers in a run of their own, so profiling does not perturb the latency figures")
    group.add_argument("--dumpProfile", action="store_true", help="print per-layer times")
    group.add_argument("--exportTimes", metavar="FILE.json", help="write every iteration's timings as JSON")
    group.add_argument("--exportProfile", metavar="FILE.json", help="write the per-layer profile as JSON")
    group.add_argument("--exportOutput", metavar="FILE.json", help="write the last iteration's outputs as JSON")
    shared.add_build_arguments(parser)
    shared.add_profile_arguments(parser)


def run(args) -> int:
    from ..tools import bench
    from ..tools.inputs import load_inputs
    from ..tools.memory import MemoryMonitor

    with MemoryMonitor(device=args.device) as build_memory:
        engine = bench.open_engine(args.path, shared.config_from_args(args), build_memory)
    feed = bench.sample_feed(engine, args.seed, shared.parse_shape_list(args.shapes),
                             load_inputs(shared.parse_named_files(args.input)))
    profile = bool(args.dumpProfile or args.exportProfile)
    result = bench.benchmark(engine, feed, warmup_ms=args.warmUp, iterations=args.iterations, duration_s=args.duration,
                             use_cuda_graph=args.useCudaGraph, no_data_transfers=args.noDataTransfers, profile=profile,
                             separate_profile_run=args.separateProfileRun,
                             monitor=MemoryMonitor(device=engine.device))
    print(f"kiln bench {args.path}: {engine}")
    if build_memory.timeline and build_memory.timeline[-1]["label"] == "build":
        print(f"build: {engine.plan.build_info.get('build_seconds', '?')} s, {build_memory.describe()}")
    print(bench.format_result(result))
    if args.dumpProfile:
        print(bench.format_profile(result))
    for option, write in ((args.exportTimes, bench.export_times), (args.exportProfile, bench.export_profile),
                          (args.exportOutput, bench.export_output)):
        if option:
            write(result, option)
            print(f"wrote {option}")
    return 0
