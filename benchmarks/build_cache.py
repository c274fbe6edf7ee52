"""What a timing cache saves a user: the same `kiln build --device cuda --fp16` run three times, each in a fresh
process, as a user runs it from the command line.

    python3 benchmarks/build_cache.py --out DIR [--cases resnet50:1,bert:1,bert:32] [--profile]

1. cold: no timing cache, and an empty Triton kernel cache (TRITON_CACHE_DIR, fresh per case): the first build
   of a model on a machine;
2. warm: the timing cache the cold build wrote (and Triton's disk cache it filled): the second build;
3. no cache file, Triton's disk cache warm: what the second build would cost without the timing cache, so that
   (3) / (2) is the timing cache's own share of the speed-up.

Each build's seconds are `kiln.build`'s own (build_info.build_seconds, with its parse/optimize/lower split), not
the process's start-up (importing torch, creating the CUDA context), which is printed beside them. The models are
benchmarks/gpu.py's (ResNet-50 from torchvision, BERT-base from transformers, random weights, static shapes).
Writes build_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILD = """
import cProfile, json, pstats, sys, time
started = time.perf_counter()
import kiln
config = kiln.BuilderConfig(device="cuda", fp16=True, extra={"timing_cache_file": sys.argv[2] or None})
profiler = cProfile.Profile() if sys.argv[3] else None
if profiler:
    profiler.enable()
engine = kiln.build(sys.argv[1], config)
if profiler:
    profiler.disable()
    with open(sys.argv[3], "w") as report:
        for order in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=report).sort_stats(order).print_stats(40)
info = engine.plan.build_info
print(json.dumps({"build_s": info["build_seconds"], "stages_s": info["stage_seconds"], "process_s": time.perf_counter() - started,
                  "cache_hits": info.get("cuda_tuning", {}).get("cache_hits"),
                  "cache_misses": info.get("cuda_tuning", {}).get("cache_misses")}))
"""


def build_in_fresh_process(onnx_path: str, cache: str, triton_cache: str, profile: str = "") -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "KILN_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BUILD, onnx_path, cache, profile], check=False, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cases", default="resnet50:1,bert:1,bert:32")
    parser.add_argument("--profile", action="store_true", help="profile each warm build (cProfile) into DIR/profile-*.txt")
    args = parser.parse_args()

    from benchmarks.gpu import export, make_inputs, make_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kiln-build-cache-"))
    rows = []
    for case in args.cases.split(","):
        name, batch = case.split(":")
        model = make_model(name)
        onnx_path = str(work / f"{name}-{batch}.onnx")
        export(model, make_inputs(name, int(batch)), onnx_path)
        del model
        cache, triton = str(work / f"{name}-{batch}.cache"), str(work / f"triton-{name}-{batch}")
        row = {"model": name, "batch": int(batch)}
        for label, cache_file in (("cold", cache), ("warm", cache), ("no_cache_file", "")):
            profile = str(out / f"profile-{name}-{batch}.txt") if args.profile and label == "warm" else ""
            row[label] = build_in_fresh_process(onnx_path, cache_file, triton, profile)
            print(f"{name} b{batch} {label:14s} build {row[label]['build_s']:6.2f} s  {row[label]['stages_s']}  "
                  f"(process {row[label]['wall_s']:.1f} s)", flush=True)
        row["speedup"] = row["cold"]["build_s"] / row["warm"]["build_s"]
        row["timing_cache_share"] = row["no_cache_file"]["build_s"] / row["warm"]["build_s"]
        rows.append(row)
        print(f"{name} b{batch}: cold / warm {row['speedup']:.1f}x; without the cache file / warm "
              f"{row['timing_cache_share']:.1f}x", flush=True)
        (out / "build_cache.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
