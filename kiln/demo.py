"""`make demo`: build a real network into an engine (fp32, and bf16 where the CPU runs it natively), load each
in a fresh process, check it against onnxruntime and time them all in turns. The network is ResNet-50 from ONNX's
own test data (onnx/backend/test/data/light), with its placeholder weights replaced by fixed-seed random ones so the
outputs mean something (kiln/tools/models.py); its output is the classifier's logits."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEMO_DIR = Path("build/demo")
SEED = 0


def demo_model(path: Path) -> None:
    """Write light_resnet50 with fixed-seed random weights, its output the logits, to `path`."""
    import onnx

    from .tools.models import randomized_light_model

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(randomized_light_model("resnet50", SEED), str(path))


def check_engines(model_path: Path, engine_paths: list[Path]) -> None:
    """Run in a fresh process: load each engine, compare it with onnxruntime, and time them all in turns."""
    import onnxruntime as ort
    import torch

    import kiln
    from kiln.tools.bench import interleaved_medians

    engines = [kiln.load(path) for path in engine_paths]
    binding, output_name = engines[0].inputs[0], engines[0].outputs[0].name
    x = np.random.default_rng(SEED).standard_normal(binding.shape).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    reference = session.run([output_name], {binding.name: x})[0]
    runners, failed = {}, []
    for path, engine in zip(engine_paths, engines):
        precision = "bf16" if engine.plan.config.get("bf16") else "fp32"
        ours = engine.run({binding.name: x})[output_name]
        error = np.abs(ours.astype(np.float64) - reference).max()
        relative = error / max(np.abs(reference).max(), 1e-30)
        top1 = int(np.argmax(ours)) == int(np.argmax(reference))
        print(f"loaded {path} in a fresh process: {engine}")
        print(f"  {precision} accuracy vs onnxruntime: max abs error {error:.3g}, max rel error {relative:.3g}, "
              f"top-1 {'agrees' if top1 else 'DIFFERS'}")
        if precision == "fp32" and not (relative < 1e-3 and top1):
            failed.append(precision)
        runners[f"kiln {precision}"] = lambda engine=engine: engine.run({binding.name: x})
    runners["onnxruntime"] = lambda: session.run([output_name], {binding.name: x})
    medians = interleaved_medians(runners, runs=15)
    ort_ms = medians["onnxruntime"]
    print(f"{'runtime':<14}{'median latency':>16}   (batch 1, {torch.get_num_threads()} threads, 15 runs each, in turns, "
          f"after warm-up)")
    for name, ms in medians.items():
        ratio = "" if name == "onnxruntime" else f"   {ort_ms / ms:.2f}x onnxruntime's speed"
        print(f"{name:<14}{ms:>13.2f} ms{ratio}")
    if failed:
        sys.exit("demo FAILED: kiln's fp32 result differs from onnxruntime's beyond fp32 tolerance")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", nargs="+", metavar="PATH", help=argparse.SUPPRESS)  # MODEL ENGINE...
    args = parser.parse_args(argv)
    if args.check:
        check_engines(Path(args.check[0]), [Path(p) for p in args.check[1:]])
        return 0
    import kiln
    from kiln.backends.cpu.fast import bf16_supported

    model_path = DEMO_DIR / "resnet50.onnx"
    demo_model(model_path)
    print(f"model: ResNet-50 (onnx test data, fixed-seed random weights) -> {model_path}")
    precisions = ["fp32"] + (["bf16"] if bf16_supported() else [])
    if len(precisions) == 1:
        print("(this CPU has no AVX512-BF16/AMX: the fp32 engine only)")
    engine_paths = []
    for precision in precisions:
        engine_path = DEMO_DIR / f"resnet50_{precision}.kiln"
        start = time.perf_counter()
        engine = kiln.build(str(model_path), kiln.BuilderConfig(bf16=precision == "bf16"))
        engine.save(engine_path)
        print(f"built {engine_path} ({precision}) in {time.perf_counter() - start:.1f} s: {len(engine.plan.graph.nodes)} "
              f"layers, {engine_path.stat().st_size / 1e6:.0f} MB")
        engine_paths.append(str(engine_path))
    return subprocess.call([sys.executable, "-m", "kiln.demo", "--check", str(model_path), *engine_paths])


if __name__ == "__main__":
    sys.exit(main())
