"""What dynamic shapes cost on the CPU: a kiln engine built with an optimization profile against a static engine of
the same model, both run at the profile's opt shape, in one process (target: dynamic at most 1.1x static).

    .venv/bin/python benchmarks/dynamic.py [--threads 2] [--runs 20] [--models resnet50,bert,tiny_bert] [--json out.json]

Models: onnx's light ResNet-50 with fixed-seed random weights (batch dynamic through Reshape (0, -1); profile batch
1..8, opt 4); a 2-layer BERT-base-width encoder (hidden 768, 12 heads) exported from torch with dynamic batch and
sequence length (profile batch 1..4 opt 1, seq 16..128 opt 128); and the tiny BERT layer of tests/engine/
test_dynamic_shapes.py (hidden 32), where per-run overhead is largest against the compute. Both engines of a model see
the same input; runs alternate between them so that load from other processes on the machine falls on both alike.
The outputs of the two engines are compared (max abs difference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def resnet50(workdir: Path):
    """(static model, dynamic model, profile, feed at opt): light ResNet-50, batch 4 static, N in 1..8 dynamic."""
    import onnx

    from kiln.tools.models import randomized_light_model

    batch = 4
    static = randomized_light_model("resnet50", batch=batch)
    dynamic = randomized_light_model("resnet50", batch=1)
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del dynamic.graph.value_info[:]  # the opset conversion recorded shapes at batch 1
    for node in dynamic.graph.node:  # the classifier's Reshape (1, -1): copy the batch instead (0)
        if node.op_type == "Reshape":
            for tensor in dynamic.graph.initializer:
                if tensor.name == node.input[1]:
                    shape = onnx.numpy_helper.to_array(tensor).copy()
                    shape[0] = 0
                    tensor.CopyFrom(onnx.numpy_helper.from_array(shape, tensor.name))
    name = dynamic.graph.input[0].name
    image = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    profile = {name: ((1, 3, 224, 224), (batch, 3, 224, 224), (8, 3, 224, 224))}
    return static, dynamic, profile, {name: image}


def bert(workdir: Path, hidden: int = 768, heads: int = 12, layers: int = 2):
    import torch
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert(vocab=30522, hidden=hidden, heads=heads, layers=layers, max_len=128).eval()
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 128, dtype=torch.int64)
    mask[:, 100:] = 0
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamo=True, verbose=False)
    static_path, dynamic_path = workdir / "bert_static.onnx", workdir / "bert_dynamic.onnx"
    torch.onnx.export(module, (ids, mask), str(static_path), **names)
    batch, seq = torch.export.Dim("batch", max=4), torch.export.Dim("seq", min=16, max=128)
    axes = {0: batch, 1: seq}
    torch.onnx.export(module, (ids, mask), str(dynamic_path), dynamic_shapes={"input_ids": axes, "attention_mask": axes}, **names)
    profile = {"input_ids": ((1, 16), (1, 128), (4, 128)), "attention_mask": ((1, 16), (1, 128), (4, 128))}
    return str(static_path), str(dynamic_path), profile, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def tiny_bert(workdir: Path):
    import onnx
    from engine.test_dynamic_shapes import MAX_SEQ, VOCAB, encoder_model

    dynamic = encoder_model()
    static = onnx.ModelProto()
    static.CopyFrom(dynamic)
    for info in static.graph.input:
        for dim, size in zip(info.type.tensor_type.shape.dim, (2, 8)):
            dim.dim_value = size
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, VOCAB, (2, 8)).astype(np.int64), "attention_mask": np.ones((2, 8), np.int64)}
    profile = {"input_ids": ((1, 1), (2, 8), (4, MAX_SEQ)), "attention_mask": ((1, 1), (2, 8), (4, MAX_SEQ))}
    return static, dynamic, profile, feed


MODELS = {"resnet50": resnet50, "bert": bert, "tiny_bert": tiny_bert}


def measure(name: str, make, runs: int, workdir: Path) -> dict:
    import torch

    import kiln
    from kiln.tools.bench import interleaved_medians

    static_model, dynamic_model, profile, feed = make(workdir)
    static = kiln.build(static_model)
    config = kiln.BuilderConfig()
    config.add_profile(profile)
    dynamic = kiln.build(dynamic_model, config)
    dynamic_inputs = [str(b) for b in dynamic.inputs]
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    difference = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
                     for a, b in zip(static.run(feed).values(), dynamic.run(feed).values()))
    medians = interleaved_medians({"static": lambda: static.run(torch_feed), "dynamic": lambda: dynamic.run(torch_feed)}, runs)
    static_ms, dynamic_ms = medians["static"], medians["dynamic"]
    return {"model": name, "opt_shapes": {k: list(v.shape) for k, v in feed.items()}, "dynamic_inputs": dynamic_inputs,
            "static_ms": round(static_ms, 3), "dynamic_ms": round(dynamic_ms, 3), "ratio": round(dynamic_ms / static_ms, 3),
            "static_layers": len(static.plan.graph.nodes), "dynamic_layers": len(dynamic.plan.graph.nodes),
            "max_abs_difference": difference}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("KILN_PROGRESS", "0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = measure(name, MODELS[name], args.runs, Path(tmp))
            rows.append(row)
            print(f"{row['model']:10s} opt {row['opt_shapes']}: static {row['static_ms']:.2f} ms ({row['static_layers']} layers), "
                  f"dynamic {row['dynamic_ms']:.2f} ms ({row['dynamic_layers']} layers), ratio {row['ratio']:.3f} "
                  f"(target <= 1.1), outputs differ by {row['max_abs_difference']:.2e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
