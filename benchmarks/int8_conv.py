"""ResNet-50's convolutions one by one on the GPU: kiln's Triton int8 convolutions (the implicit-GEMM kernel and,
on int8 input at stride 1, the TMA 1x1 GEMM and window kernels; each in every block configuration the tactic
chooser offers) against cuDNN fp16 channels-last, the tactic an fp16 engine runs.

    python3 benchmarks/int8_conv.py --out DIR [--batches 1,128] [--configs all|default] [--jobs 12]

For each of the 23 distinct convolution shapes of torchvision's ResNet-50 (with how often it occurs, so the
sums are per network): cuDNN fp16 conv+bias (F.conv2d, channels-last, cudnn.benchmark on; its ReLU not counted,
so the fp16 column is a lower bound of what an engine layer costs), and the int8 kernel with fp16 input
quantized as it loads ("int8"), with input already int8 ("int8-in") and with int8 input and output ("int8-io",
what an engine that hands int8 activations between layers runs). Correctness first: every configuration's output
on batch 2 equals the float64 convolution of the quantized operands (exact int32 sums; fp16 output rounding, or
within one step of the int8 output's rounding). Timing: triton's
do_bench (CUDA events, L2 flushed before each call), median. Triton compiles run first in --jobs processes.
Writes results.json and table.md under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (in channels, out channels, kernel, stride, input size, occurrences in ResNet-50)
SHAPES = [
    (3, 64, 7, 2, 224, 1),
    (64, 64, 1, 1, 56, 1), (256, 64, 1, 1, 56, 2), (64, 64, 3, 1, 56, 3), (64, 256, 1, 1, 56, 4),
    (256, 128, 1, 1, 56, 1), (128, 128, 3, 2, 56, 1), (512, 128, 1, 1, 28, 3), (128, 128, 3, 1, 28, 3),
    (128, 512, 1, 1, 28, 4), (256, 512, 1, 2, 56, 1),
    (512, 256, 1, 1, 28, 1), (256, 256, 3, 2, 28, 1), (1024, 256, 1, 1, 14, 5), (256, 256, 3, 1, 14, 5),
    (256, 1024, 1, 1, 14, 6), (512, 1024, 1, 2, 28, 1),
    (1024, 512, 1, 1, 14, 1), (512, 512, 3, 2, 14, 1), (2048, 512, 1, 1, 7, 2), (512, 512, 3, 1, 7, 2),
    (512, 2048, 1, 1, 7, 3), (1024, 2048, 1, 2, 14, 1),
]
EXTRA_CONFIGS = ((256, 128, 64, 8, 3), (128, 64, 128, 4, 4))  # tried beside kiln's own (conv_configs)


def _case(shape, batch, seed=0):
    import torch

    cin, cout, k, stride, size, _ = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, cin, size, size, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    wq = torch.randint(-127, 128, (cout, cin, k, k), device="cuda", generator=g, dtype=torch.int8)
    w_scale = torch.rand(cout, device="cuda", generator=g) * 0.01 + 0.001
    bias = torch.randn(cout, device="cuda", generator=g)
    x_scale = float(x.abs().max()) / 127
    return x, wq, w_scale, bias, x_scale, (k // 2, stride)


KINDS = {"int8": (False, False), "int8-in": (True, False), "int8-io": (True, True)}  # (int8 input, int8 output)
OUT_SCALE = 0.05


def _runner(shape, batch, config, kind):
    """(a zero-argument call of the int8 kernel on this shape, the case's tensors: x, wq, w_scale, bias, x_scale,
    pad, stride)."""
    import torch

    from kiln.backends.cuda.int8_kernels import CONV_KERNELS, quantize

    x, wq, w_scale, bias, x_scale, (pad, stride) = _case(shape, batch)
    cout, k = wq.shape[0], wq.shape[2]
    weight_nk = wq.permute(0, 2, 3, 1).reshape(cout, -1).contiguous()
    scale = (w_scale * x_scale).contiguous()
    geometry = ((k, k), (stride, stride), (pad, pad), (1, 1))
    quantized_input, quantized_output = KINDS[kind]
    source = x
    if quantized_input:  # quantized as a channels-last tensor and kept so
        source = quantize(x.permute(0, 2, 3, 1), x_scale).permute(0, 3, 1, 2)
    kind, blocks = config
    kernel = CONV_KERNELS[kind]
    out_scale = OUT_SCALE if quantized_output else None
    return lambda: kernel(source, weight_nk, scale, bias, None, x_scale, geometry, "relu", torch.float16, blocks,
                          out_scale), (x, wq, w_scale, bias, x_scale, pad, stride)


def _check(shape, config, kind) -> float:
    """Max |int8 kernel - fp64 reference| / max |reference| on batch 2; for an int8 output, the largest distance
    in quantization steps from the reference's quantization, as a negative number (-1: within one step)."""
    import torch
    import torch.nn.functional as F

    from kiln.ops.quantize import quantize_activation

    run, (x, wq, w_scale, bias, x_scale, pad, stride) = _runner(shape, 2, config, kind)
    got = run()
    xq = quantize_activation(x, x_scale).double()  # the kernels' rounding
    want = F.conv2d(xq, wq.double(), stride=stride, padding=pad) * (w_scale.double() * x_scale)[None, :, None, None]
    want = torch.relu(want + bias.double()[None, :, None, None])
    if got.dtype == torch.int8:
        steps = quantize_activation(want, OUT_SCALE).double() - got.double()
        return -float(steps.abs().max())
    got = got.double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def _named(config) -> str:
    """("tma-1x1", (128, 128, 64, 4, 3)) as "tma-1x1 128x128x64 w4 s3"; "-" for none."""
    if config is None:
        return "-"
    kernel, blocks = config
    return f"{kernel} {'x'.join(map(str, blocks[:-2]))} w{blocks[-2]} s{blocks[-1]}"


def _warm(job):
    """Compile (and check) one shape x config x input kind in a worker process."""
    return _check(*job)


def _cudnn(shape, batch):
    import torch
    import torch.nn.functional as F

    x, wq, w_scale, bias, _, (pad, stride) = _case(shape, batch)
    weight = (wq.float() * w_scale[:, None, None, None]).half().contiguous(memory_format=torch.channels_last)
    return lambda: F.conv2d(x, weight, bias.half(), stride=stride, padding=pad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--configs", default="all", choices=["all", "default"])
    parser.add_argument("--jobs", type=int, default=12)
    args = parser.parse_args()

    import multiprocessing

    import torch
    from triton.testing import do_bench

    from kiln.backends.cuda.int8_kernels import conv_kernels

    torch.backends.cudnn.benchmark = True

    def configs(shape, kind) -> list:
        """(kernel kind, blocks) kiln's tactic chooser times for this shape and input kind (conv_kernels: the
        implicit-GEMM kernel, and on int8 input at stride 1 the TMA kernels), with --configs all a few more."""
        cin, cout, k, stride, _, _ = shape
        geometry = ((k, k), (stride, stride), (k // 2, k // 2), (1, 1))
        found = [(name, c) for name, c, _ in conv_kernels(cin, cout, geometry, KINDS[kind][0], torch.float16)]
        extra = [("implicit-gemm", c) for c in EXTRA_CONFIGS] if args.configs == "all" and cin >= 16 else []
        return found + [c for c in extra if c not in found]

    jobs = [(s, c, kind) for s in SHAPES for kind in KINDS for c in configs(s, kind)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = dict(zip(jobs, pool.map(_warm, jobs)))
    wrong = {job: e for job, e in errors.items() if not (-1 <= e < 2e-3)}
    worst = max(e for e in errors.values() if e >= 0)
    print(f"correctness: worst relative error over {len(jobs)} kernels {worst:.2e}; {len(wrong)} disagree with the "
          "fp64 reference (left out of the timings):", flush=True)
    for job, e in list(wrong.items())[:30]:
        print("  ", job, e)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        totals = {"fp16": 0.0, **{kind: 0.0 for kind in KINDS}, **{f"best of fp16/{kind}": 0.0 for kind in KINDS}}
        lines += [f"\n## batch {batch}\n", "| conv | n | cuDNN fp16 ms | " + " | ".join(f"{k} ms (config)" for k in KINDS)
                  + " |", "|---|---:|---:|" + "---:|" * len(KINDS)]
        for shape in SHAPES:
            cin, cout, k, stride, size, count = shape
            fp16 = do_bench(_cudnn(shape, batch), warmup=10, rep=50, return_mode="median")
            best = {}
            for kind in KINDS:
                times = {c: do_bench(_runner(shape, batch, c, kind)[0], warmup=10, rep=40, return_mode="median")
                         for c in configs(shape, kind) if (shape, c, kind) not in wrong}
                chosen = min(times, key=times.get) if times else None
                best[kind] = (times[chosen] if times else float("nan"), chosen, times)
            totals["fp16"] += count * fp16
            for kind in KINDS:
                totals[kind] += count * best[kind][0]
                totals[f"best of fp16/{kind}"] += count * min(fp16, best[kind][0])
            name = f"{cin}->{cout} {k}x{k}/{stride} @{size}"
            lines.append(f"| {name} | {count} | {fp16:.4f} | "
                         + " | ".join(f"{best[k][0]:.4f} ({_named(best[k][1])})" for k in KINDS) + " |")
            rows.append({"batch": batch, "conv": name, "count": count, "cudnn_fp16_ms": fp16,
                         **{kind: {str(c): t for c, t in best[kind][2].items()} for kind in KINDS}})
            print(lines[-1], flush=True)
        lines.append("\nper network (sum over the 53 convolutions, ms): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()))
        print(lines[-1], flush=True)
        rows.append({"batch": batch, "totals_ms": totals})
    results = {"worst_error": worst, "wrong": [[*job, e] for job, e in wrong.items()], "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
