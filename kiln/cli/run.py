"""Run an engine on inputs from .npy files, or on fixed-seed random inputs, and summarise its outputs.

  kiln run model.kiln [--input name=file.npy ...] [--output-dir DIR] [--seed 0]
"""
from __future__ import annotations

from . import args as shared


def add_arguments(parser) -> None:
    parser.add_argument("engine", help="a .kiln engine file")
    parser.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input from a .npy file (repeatable)")
    parser.add_argument("--output-dir", metavar="DIR", help="write each output to DIR/<name>.npy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs for inputs not given (default 0)")


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from ..engine.runtime import load
    from ..tools.inputs import load_inputs, random_feed

    engine = load(args.engine)
    feed = random_feed(engine.inputs, seed=args.seed)
    feed.update(load_inputs(shared.parse_named_files(args.input)))
    outputs = engine.run(feed)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}  {summary(value)}")
    if args.output_dir:
        directory = Path(args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for name, value in outputs.items():
            path = directory / (safe_filename(name) + ".npy")
            np.save(path, value)
            print(f"wrote {path}")
    return 0


def summary(value) -> str:
    import numpy as np

    if value.size == 0:
        return "(empty)"
    data = value.astype(np.float64) if value.dtype.kind in "fiub" or value.dtype.name == "bfloat16" else value
    head = ", ".join(f"{v:.6g}" for v in np.ravel(data)[:5])
    return f"min {data.min():.6g} max {data.max():.6g} mean {data.mean():.6g}  [{head}{', ...' if value.size > 5 else ''}]"


def safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
