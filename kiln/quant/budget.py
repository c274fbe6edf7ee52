"""The accuracy budget: measure how much each int8 layer alone moves the outputs (its sensitivity), then
return the most sensitive layers to fp32, one at a time, until the whole engine meets the budget."""
from __future__ import annotations

import numpy as np

from ..errors import PrecisionError
from ..ir import Graph, Node


def outputs(graph: Graph, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    import torch

    from ..backends.cpu.program import CpuProgram

    program = CpuProgram(graph)
    with torch.inference_mode():
        return [{k: v.float().numpy() for k, v in program.execute(feed).items()} for feed in feeds]


def error(reference: list[dict], got: list[dict], metric: str) -> float:
    """top1: points (percent of samples) whose arg-max class differs; relerr: worst relative L2 error of an output."""
    if metric == "top1":
        name = next(iter(reference[0]))
        want = np.concatenate([r[name].reshape(-1, r[name].shape[-1]).argmax(-1) for r in reference])
        have = np.concatenate([g[name].reshape(-1, g[name].shape[-1]).argmax(-1) for g in got])
        return float(100.0 * np.mean(want != have))
    worst = 0.0
    for name in reference[0]:
        want = np.concatenate([r[name].ravel() for r in reference]).astype(np.float64)
        have = np.concatenate([g[name].ravel() for g in got]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-30)))
    return worst


def with_layers(graph: Graph, int8: dict[str, Node], chosen: set[str]) -> Graph:
    variant = graph.copy()
    variant.nodes = [int8[n.name] if n.name in chosen else n for n in graph.nodes]
    return variant


def search(graph: Graph, int8: dict[str, Node], pinned: set[str], feeds: list[dict], metric: str,
           budget: float) -> tuple[set[str], list[dict], float]:
    """(layers kept int8, sensitivity table rows, the engine's error). `pinned` layers stay int8 (obey)."""
    reference = outputs(graph, feeds)
    rows = []
    for name, node in int8.items():
        alone = error(reference, outputs(with_layers(graph, int8, {name}), feeds), metric)
        rows.append({"layer": name, "op": node.op, "sensitivity": alone, "precision": "int8"})
    rows.sort(key=lambda row: -row["sensitivity"])
    # Error falls (nearly) monotonically as the most sensitive layers return to fp32: binary search for the
    # fewest that meet the budget, one evaluation per step instead of one per layer.
    movable = [row for row in rows if row["layer"] not in pinned]

    def engine_error(count: int) -> float:
        back = {row["layer"] for row in movable[:count]}
        return error(reference, outputs(with_layers(graph, int8, set(int8) - back), feeds), metric)

    low, high = 0, len(movable)
    current = engine_error(0)
    if current > budget:
        measured = {0: current}
        while high - low > 1:
            middle = (low + high) // 2
            measured[middle] = engine_error(middle)
            low, high = (middle, high) if measured[middle] > budget else (low, middle)
        current = measured.get(high) if high in measured else engine_error(high)
        for row in movable[:high]:
            row["precision"] = "fp32"
    chosen = {row["layer"] for row in rows if row["precision"] == "int8"}
    if current > budget or not chosen:
        why = ("even with every movable layer back in fp32" if current > budget else
               "only with every layer back in fp32, which leaves no int8 layer")
        raise PrecisionError(f"accuracy budget {metric} <= {budget:g} cannot be met: it holds {why} "
                             f"(error {current:.4g})\n{format_table(rows, metric)}", code="KILN-E303",
                             hint="raise the budget (--accuracyBudget), calibrate on more representative data or "
                                  "try another --calibrator, or free layers pinned by --precisionConstraints obey")
    return chosen, rows, current


def format_table(rows: list[dict], metric: str) -> str:
    unit = "points top-1" if metric == "top1" else "relative error"
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"  {'layer':<{width}}  {'op':<6}  {'sensitivity (' + unit + ')':>28}  precision"]
    lines += [f"  {r['layer']:<{width}}  {r['op']:<6}  {r['sensitivity']:>28.4g}  {r['precision']}" for r in rows]
    return "\n".join(lines)
