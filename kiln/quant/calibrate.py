"""Run the fp32 graph over calibration (or validation) data and collect a histogram per wanted tensor."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KilnError, PrecisionError
from ..ir import Graph
from ..progress import Progress
from .data import HINT, feeds
from .histogram import Histogram


def collect(graph: Graph, source: Any, wanted: list[str], *, what: str = "calibration",
            limit: int | None = None) -> tuple[dict[str, Histogram], int]:
    """Histograms of `wanted` tensors over every feed in `source`; (histograms, number of feeds)."""
    import torch

    from ..backends.cpu.program import CpuProgram

    histograms = {name: Histogram() for name in wanted}
    wanted_set = set(wanted)
    program = CpuProgram(graph)
    input_names = graph.input_names()

    def on_step(step, env):
        for name in step.outputs:
            if name in wanted_set:
                histograms[name].add(env[name].detach().float().numpy())

    count = 0
    total = limit or _length(source)
    with Progress(f"kiln {what}", total=total or 1, enabled=None if total else False) as bar, torch.inference_mode():
        for feed in feeds(source, input_names, what):
            tensors = _tensors(feed, graph, count, what)
            for name in wanted_set.intersection(tensors):  # a layer reading a graph input
                histograms[name].add(tensors[name].float().numpy())
            try:
                program.execute(tensors, on_step=on_step)
            except KilnError as error:
                raise PrecisionError(f"{what} feed {count} does not run through the model: {error.message}",
                                     code="KILN-E302", where=error.where, hint=HINT) from None
            count += 1
            bar.advance(f"batch {count}")
            if limit and count >= limit:
                break
    if count == 0:
        raise PrecisionError(f"the {what} data holds no feeds", code="KILN-E302", hint=HINT)
    return histograms, count


def _length(source: Any) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


def _tensors(feed: dict, graph: Graph, index: int, what: str) -> dict:
    from ..tensors import numpy_to_torch

    names = graph.input_names()
    missing = [n for n in names if n not in feed]
    unknown = [n for n in feed if n not in names]
    if missing or unknown:
        raise PrecisionError(f"{what} feed {index} does not match the model's inputs: "
                             f"missing {missing or 'none'}, unknown {unknown or 'none'}", code="KILN-E302",
                             hint=f"each feed maps every model input ({', '.join(names)}) to an array")
    tensors = {}
    for name in names:
        value = feed[name]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        expected = graph.value(name)
        if expected.dtype is not None and expected.dtype.is_float and array.dtype.kind == "f":
            from ..ir.dtypes import to_numpy

            array = array.astype(to_numpy(expected.dtype), copy=False)
        if expected.shape is not None and len(expected.shape) != array.ndim:
            raise PrecisionError(f"{what} feed {index}: input {name!r} has shape {list(array.shape)}, the model "
                                 f"expects rank {len(expected.shape)}", code="KILN-E302",
                                 hint="save each feed with the shape the model takes, batch axis included")
        tensors[name] = numpy_to_torch(array)
    return tensors
