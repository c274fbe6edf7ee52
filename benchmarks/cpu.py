"""CPU benchmark: kiln (fp32 and bf16) against onnxruntime and torch eager, all in one process.

    .venv/bin/python benchmarks/cpu.py [--threads 2] [--runs 20] [--models resnet50,bert] [--onednn-only] [--json out.json]

Models: four of onnx's light ImageNet models with fixed-seed random weights (their shipped weights are
constants), cut before the final Softmax, and a BERT-base-shaped encoder (12 layers, hidden 768,
12 heads, seq 128) exported from torch with torch.onnx.export(dynamo=True). Batch 1 and 8.
onnxruntime runs with ORT_ENABLE_ALL and the same intra-op thread count as torch.
"torch eager" is the torch module itself for the encoder; for the ONNX zoo models, which have no
torch module, it is kiln's unoptimized engine: the graph run op by op with plain torch calls.
Each timing is the median of --runs timed runs after warm-up, the runners taking turns; errors are relative L2 against
onnxruntime's output on the same input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIGHT_NAMES = ["resnet50", "densenet121", "inception_v1", "squeezenet"]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def encoder(batch: int, layers: int, workdir: Path):
    """A BERT-base-shaped encoder as a torch module and its ONNX export, with a feed."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert(vocab=30522, hidden=768, heads=12, layers=layers, max_len=128).eval()
    ids = torch.randint(0, 30522, (batch, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, 128, dtype=torch.int64)
    mask[:, 100:] = 0
    path = workdir / f"encoder_b{batch}.onnx"
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=True, verbose=False)
    return module, str(path), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def ort_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def without_native():
    """kiln's native kernels off (KILN_NATIVE=0) for the engines built and first run inside: the oneDNN and torch
    tactics kiln falls back to without a compiler."""
    from kiln.backends.cpu import native

    os.environ["KILN_NATIVE"] = "0"
    native._load.cache_clear()
    try:
        yield
    finally:
        del os.environ["KILN_NATIVE"]
        native._load.cache_clear()


def built_and_run(model, feed: dict, **config):
    """An engine and its first output on `feed` (running it lowers its program, under whatever is in force)."""
    import kiln

    engine = kiln.build(model, kiln.BuilderConfig(**config))
    return engine, next(iter(engine.run(feed).values()))


def bench_row(name: str, batch: int, model, feed: dict, eager, runs: int, threads: int, onednn_only: bool = False) -> dict:
    import torch

    from kiln.tools.bench import interleaved_medians

    session = ort_session(model, threads)
    output = session.get_outputs()[0].name
    reference = session.run([output], feed)[0]
    row = {"model": name, "batch": batch}
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    if eager is None:  # no torch module: kiln's unoptimized engine is the graph in plain torch calls
        with without_native():
            unoptimized, _ = built_and_run(model, feed, optimize=False)
        eager = lambda: unoptimized.run(torch_feed)  # noqa: E731
    runners = {"onnxruntime": lambda: session.run([output], feed), "torch_eager": eager}
    for precision in ("fp32", "bf16"):
        engine, engine_output = built_and_run(model, feed, bf16=precision == "bf16")
        row[f"kiln_{precision}_error"] = relative_error(engine_output, reference)
        runners[f"kiln_{precision}"] = lambda engine=engine: engine.run(torch_feed)
        if precision == "fp32":
            memory = engine.plan.memory
            row["layers"] = len(engine.plan.graph.nodes)
            row["peak_activation_mb"] = round(memory["peak_bytes"] / 1e6, 2)
            row["lower_bound_mb"] = round(memory["lower_bound_bytes"] / 1e6, 2)
    if onednn_only:
        for precision in ("fp32", "bf16"):
            with without_native():
                onednn, onednn_output = built_and_run(model, feed, bf16=precision == "bf16")
            row[f"kiln_{precision}_onednn_error"] = relative_error(onednn_output, reference)
            runners[f"kiln_{precision}_onednn"] = lambda onednn=onednn: onednn.run(torch_feed)
    with torch.inference_mode():
        medians = interleaved_medians(runners, runs)
    row.update({f"{name}_ms": ms for name, ms in medians.items()})
    print(format_row(row), flush=True)
    if onednn_only:
        ratio = lambda key: f"{row[key]:.1f} ({row[key] / row['onnxruntime_ms']:.2f})"  # noqa: E731
        print(f"|   without native kernels (oneDNN only) | {batch} | | | {ratio('kiln_fp32_onednn_ms')} "
              f"| {ratio('kiln_bf16_onednn_ms')} | {row['kiln_fp32_onednn_error']:.1e} "
              f"| {row['kiln_bf16_onednn_error']:.1e} |", flush=True)
    return row


HEADER = ("| model | batch | onnxruntime ms | torch eager ms (x ort) | kiln fp32 ms (x ort) | kiln bf16 ms (x ort) "
          "| fp32 rel err | bf16 rel err |\n|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    ort_ms = row["onnxruntime_ms"]
    ratio = lambda key: f"{row[key]:.1f} ({row[key] / ort_ms:.2f})"  # noqa: E731
    return (f"| {row['model']} | {row['batch']} | {ort_ms:.1f} | {ratio('torch_eager_ms')} | {ratio('kiln_fp32_ms')} "
            f"| {ratio('kiln_bf16_ms')} | {row['kiln_fp32_error']:.1e} | {row['kiln_bf16_error']:.1e} |")


def summary(rows: list[dict]) -> dict:
    speedups = [r["onnxruntime_ms"] / r["kiln_bf16_ms"] for r in rows]
    return {
        "fp32_rows_at_most_onnxruntime": sum(r["kiln_fp32_ms"] <= r["onnxruntime_ms"] for r in rows),
        "rows": len(rows),
        "fp32_worst_ratio": max(r["kiln_fp32_ms"] / r["onnxruntime_ms"] for r in rows),
        "bf16_geomean_speedup_over_onnxruntime_fp32": math.exp(sum(map(math.log, speedups)) / len(speedups)),
        "bf16_worst_error": max(r["kiln_bf16_error"] for r in rows),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--models", default=",".join(LIGHT_NAMES + ["bert"]), help="comma-separated subset")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--encoder-layers", type=int, default=12)
    parser.add_argument("--onednn-only", action="store_true",
                        help="also time kiln fp32 and bf16 with its native kernels off (KILN_NATIVE=0), in the same turns")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "cpu.json"), help="where to write the results")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    import kiln
    from kiln.tools.models import randomized_light_model

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"kiln {kiln.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    print(HEADER, flush=True)
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            for batch in batches:
                if name == "bert":
                    module, path, feed = encoder(batch, args.encoder_layers, Path(workdir))
                    ids, mask = (torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))
                    rows.append(bench_row(f"bert-base encoder ({args.encoder_layers} layers, seq 128)", batch, path, feed,
                                          lambda: module(ids, mask), args.runs, args.threads, args.onednn_only))
                else:
                    model = randomized_light_model(name, batch=batch)
                    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                    rows.append(bench_row(name, batch, model, {model.graph.input[0].name: x}, None, args.runs, args.threads,
                                          args.onednn_only))
    result = {"summary": summary(rows), "rows": rows, "threads": args.threads, "runs": args.runs,
              "load_average_before": load, "load_average_after": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "versions": {"kiln": kiln.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    print(json.dumps(result["summary"], indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
