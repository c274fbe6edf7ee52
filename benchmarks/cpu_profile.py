"""Where the CPU time goes: kiln's per-layer profile and onnxruntime's per-node profile of the same model, summed
by operator, side by side, in one process.

    .venv/bin/python benchmarks/cpu_profile.py [--models resnet50,densenet121,squeezenet] [--batch 1] [--bf16]

The models are benchmarks/cpu.py's (light ImageNet models with fixed-seed random weights, cut before Softmax).
The two run in turns, one inference each per round (this machine's speed changes by 2x within minutes, so
profiles taken one after the other do not compare). kiln: each layer's time (as `kiln bench --dumpProfile` takes
it), summed by kind per run, median over the runs; fused layers under their kiln:: name. onnxruntime: its own
profiler (SessionOptions.enable_profiling, ORT_ENABLE_ALL, the same thread count), per-node kernel time medians; its fused nodes keep the ONNX name of the op they are built on (a Conv
with its Relu or residual Add fused in is a Conv). Rows pair kiln's layer kinds with onnxruntime's by what they run:
convolutions, pooling, concatenation, element-wise work, matrix products, the rest.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


SETTLE_S = 0.05
KIND = {"Conv": "convolution", "kiln::Conv": "convolution", "MaxPool": "pooling", "AveragePool": "pooling",
        "GlobalAveragePool": "pooling", "Concat": "concatenation", "kiln::Elementwise": "element-wise",
        "BatchNormalization": "element-wise", "Relu": "element-wise", "Add": "element-wise", "Mul": "element-wise",
        "Sum": "element-wise", "Gemm": "matrix product", "kiln::Gemm": "matrix product", "MatMul": "matrix product",
        "FusedConv": "convolution", "FusedGemm": "matrix product"}


def kind(op: str) -> str:
    return KIND.get(op, f"other: {op}")


def profiles(model, feed: dict, bf16: bool, threads: int, iterations: int) -> tuple[dict, float, dict, float]:
    """(kiln ms by kind, kiln ms per run, onnxruntime ms by kind, onnxruntime ms per run): the two run in turns, one
    inference each per round, so that a change in the machine's speed during the measurement falls on both."""
    import time

    import onnxruntime as ort
    import torch

    import kiln

    engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
    program, torch_feed = engine.program, {k: torch.from_numpy(v) for k, v in feed.items()}
    kinds = {step.name: kind(step.op) for step in program.steps}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.log_severity_level = 3
    ours, our_runs = collections.defaultdict(list), []
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        options.profile_file_prefix = os.path.join(workdir, "ort")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for round_ in range(10 + iterations):
            # each after a pause: onnxruntime's and OpenMP's threads spin for a while after a run, on the same cores
            time.sleep(SETTLE_S)
            session.run(None, feed)
            time.sleep(SETTLE_S)
            layer_ms = collections.Counter()
            last = [time.perf_counter()]

            def on_step(step, env):
                now = time.perf_counter()
                layer_ms[kinds[step.name]] += (now - last[0]) * 1e3
                last[0] = now

            started = last[0] = time.perf_counter()
            program.execute(torch_feed, on_step=on_step)
            if round_ >= 10:  # warm-up rounds left out, as for onnxruntime below
                our_runs.append((time.perf_counter() - started) * 1e3)
                for name, ms in layer_ms.items():
                    ours[name].append(ms)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node, op_of, runs = collections.defaultdict(list), {}, []
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"]].append(event["dur"] / 1e3)
            op_of[event["name"]] = event["args"].get("op_name", "?")
        elif event.get("name") == "model_run":
            runs.append(event["dur"] / 1e3)
    theirs = collections.Counter()
    for node, times in per_node.items():
        theirs[kind(op_of[node])] += float(np.median(times[10:] or times))
    return ({name: float(np.median(v)) for name, v in ours.items()}, float(np.median(our_runs)), dict(theirs),
            float(np.median(runs[10:] or runs)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,densenet121,squeezenet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="profile kiln's bf16 engine (onnxruntime stays fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args(argv)

    import torch

    from kiln.tools.models import randomized_light_model

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; kiln {'bf16' if args.bf16 else 'fp32'}, onnxruntime fp32, batch "
          f"{args.batch}, {args.threads} threads; per-layer medians summed by kind, ms")
    for name in args.models.split(","):
        model = randomized_light_model(name, batch=args.batch)
        feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)}
        ours, our_run, theirs, their_run = profiles(model, feed, args.bf16, args.threads, args.iterations)
        print(f"\n{name}: kiln {our_run:.1f} ms per run, onnxruntime {their_run:.1f} ms per run (profiled)")
        print("| layers | kiln ms | onnxruntime ms | kiln / onnxruntime |\n|---|---|---|---|")
        for kind in sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, 0), theirs.get(k, 0))):
            a, b = ours.get(kind, 0.0), theirs.get(kind, 0.0)
            print(f"| {kind} | {a:.2f} | {b:.2f} | {a / b:.2f} |" if b else f"| {kind} | {a:.2f} | {b:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
