"""The int8 build pass: calibrate (or read the cache), choose each layer's precision, and rewrite the
int8 ones as kiln::QGemm / kiln::QConv with per-channel int8 weights and a per-tensor input scale.

A layer runs int8 when it was asked to (--layerPrecisions with --precisionConstraints prefer/obey),
or, by default, when this CPU runs its int8 kernel faster than its fp32 one; layers kept in fp32 are
named in the build log with both timings. An accuracy budget then returns the most sensitive layers
to fp32 until the engine's outputs stay within it (kiln/quant/budget.py).

--fp8 (CUDA) calibrates too: each matrix layer's input gets `x_amax`, the largest |x| the calibration data
showed, from which the GPU's fp8 tactics take their per-tensor scale (kiln/backends/cuda/int8.py).
"""
from __future__ import annotations

import fnmatch
import time

import numpy as np

from .. import log
from ..errors import PrecisionError
from ..ir import Graph, Node
from . import budget as accuracy
from . import cache, calibrators
from .calibrate import collect
from .data import feeds
from .weights import activation_scale, quantize_per_channel

QUANTIZABLE = {("kiln", "Conv"): "QConv", ("kiln", "Gemm"): "QGemm"}
COVERAGE_WARN = 0.06  # total variation distance between calibration and validation |x| distributions, any tensor
VALIDATION_FEEDS = 256  # the accuracy budget keeps this many validation feeds in memory at most


def run(graph: Graph, ctx) -> bool:
    config = ctx.config
    if config is not None and getattr(config, "fp8", False) and not getattr(config, "int8", False):
        return _fp8_ranges(graph, ctx)
    if config is None or not getattr(config, "int8", False):
        return False
    if any(node.op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for node in graph.nodes):
        from .qdq import fold

        folded = fold(graph)
        log.info("int8: the model carries its own quantization (QDQ / QLinear nodes); kiln keeps its scales and does not "
                 "calibrate; %d layer(s) with symmetric int8 inputs run as kiln int8 layers", len(folded))
        config.extra["quantization"] = {"mode": "explicit (QDQ)", "folded": folded}
        ctx.counters["int8_layers"] += len(folded)
        return bool(folded)
    layers = [n for n in graph.nodes if (n.domain, n.op) in QUANTIZABLE and n.inputs[1] in graph.initializers]
    if not layers:
        log.info("int8: no convolution or matrix layer with constant weights to quantize; the engine stays fp32")
        return False
    asked = _asked(graph, layers, config)
    layers = [n for n in layers if asked.get(n.name) != "fp32"]
    wanted = sorted({n.inputs[0] for n in layers})
    calibrator, ranges = _ranges(graph, config, wanted)
    int8 = {n.name: _int8_node(graph, n, ranges[n.inputs[0]]["amax"]) for n in layers}
    if config.fp8:  # int8 layers may still run fp8 on the GPU, where that is faster
        int8 = {name: _with_fp8_range(node, ranges) if node.op == "QGemm" else node for name, node in int8.items()}
    report = {"calibrator": calibrator, "layers": {}, "warnings": []}
    chosen = _by_speed_or_request(graph, layers, int8, asked, config, report)
    if config.validation is not None:
        validation = list(_limited(feeds(config.validation, graph.input_names(), "validation"), VALIDATION_FEEDS))
        _check_coverage(graph, validation, wanted, ranges, report)
        if config.accuracy_budget is not None and chosen:
            pinned = {name for name in chosen if asked.get(name) == "int8" and config.precision_constraints == "obey"}
            tensors = [_torch_feed(feed) for feed in validation]
            chosen, rows, reached = accuracy.search(graph, {k: int8[k] for k in chosen}, pinned, tensors,
                                                    config.accuracy_metric, config.accuracy_budget)
            report["sensitivity"] = rows
            report["accuracy"] = {"metric": config.accuracy_metric, "budget": config.accuracy_budget, "error": reached}
            report["table"] = accuracy.format_table(rows, config.accuracy_metric)
            log.info("int8 sensitivity per layer (%s budget %g, engine error %.4g):\n%s", config.accuracy_metric,
                     config.accuracy_budget, reached, report["table"])
            for row in rows:
                if row["precision"] == "fp32":
                    report["layers"][row["layer"]].update(precision="fp32", why="accuracy budget: too sensitive")
    elif config.accuracy_budget is not None:
        raise PrecisionError("an accuracy budget needs validation data to measure against", code="KILN-E302",
                             hint="give --validation DIR (feeds like the calibration data) with --accuracyBudget")
    graph.nodes = [int8[n.name] if n.name in chosen else n for n in graph.nodes]
    ctx.counters["int8_layers"] += len(chosen)
    config.extra["quantization"] = report
    return bool(chosen)


def _fp8_ranges(graph: Graph, ctx) -> bool:
    """--fp8 without --int8: calibrate the matrix layers' inputs and give each its x_amax; nothing is rewritten."""
    config = ctx.config
    layers = [n for n in graph.nodes if (n.domain, n.op) == ("kiln", "Gemm") and n.inputs[1] in graph.initializers]
    if not layers:
        log.info("fp8: no matrix layer with constant weights; the engine has no fp8 layers")
        return False
    calibrator, ranges = _ranges(graph, config, sorted({n.inputs[0] for n in layers}))
    marked = {n.name: _with_fp8_range(n, ranges) for n in layers}
    graph.nodes = [marked.get(n.name, n) for n in graph.nodes]
    ctx.counters["fp8_calibrated_layers"] += len(marked)
    config.extra["quantization"] = {"mode": f"none; fp8 ranges ({calibrator} calibration data, largest |x|) for "
                                            f"{len(marked)} matrix layer(s)"}
    return True


def _with_fp8_range(node: Node, ranges: dict) -> Node:
    """The layer with x_amax: fp8 has exponent bits to spare, so it takes the largest |x| seen, not a clipped one."""
    entry = ranges[node.inputs[0]]
    return node.replace(attrs=dict(node.attrs, x_amax=float(entry.get("observed", entry["amax"]))))


def _asked(graph: Graph, layers: list[Node], config) -> dict[str, str]:
    """Each layer's precision from --layerPrecisions; patterns match fused or original (model) node names."""
    asked: dict[str, str] = {}
    for pattern, precision in (config.layer_precisions or {}).items():
        matched = [n for n in graph.nodes if fnmatch.fnmatchcase(n.name, pattern)
                   or any(fnmatch.fnmatchcase(o, pattern) for o in n.origin)]
        if not matched and not any(ch in pattern for ch in "*?["):
            raise PrecisionError(f"--layerPrecisions names layer {pattern!r}, which the model does not have", code="KILN-E203",
                                 hint="use names from `kiln inspect MODEL` (model node names or kiln's fused layer names); "
                                      "wildcards like 'conv*' are allowed")
        for node in matched:
            if precision == "int8" and (node.domain, node.op) not in QUANTIZABLE:
                if config.precision_constraints == "obey" and not any(ch in pattern for ch in "*?["):
                    raise PrecisionError(f"layer {node.name!r} ({node.op_key}) has no int8 kernel, but obey asks for int8",
                                         code="KILN-E301", where=node.describe(),
                                         hint="int8 runs convolutions and matrix layers; use --precisionConstraints prefer "
                                              "to let other layers fall back to fp32")
                continue
            asked[node.name] = precision
    return {name: p for name, p in asked.items() if any(name == n.name for n in layers)}


def _ranges(graph: Graph, config, wanted: list[str]) -> tuple[str, dict[str, dict]]:
    """Per-tensor thresholds: from the calibration cache when it exists, else from calibration data."""
    from pathlib import Path

    if config.calib_cache and Path(config.calib_cache).exists():
        calibrator, tensors = cache.read(config.calib_cache)
        cache.check_covers(config.calib_cache, tensors, wanted)
        log.info("int8: thresholds read from calibration cache %s (%s calibrator)", config.calib_cache, calibrator)
        return calibrator, tensors
    if config.calib is None:
        raise PrecisionError(f"--{'int8' if config.int8 else 'fp8'} needs calibration data (or a calibration cache), "
                             "and the model has no QDQ nodes",
                             code="KILN-E302", hint="give --calib DIR (a directory of .npz feeds, 100-500 real inputs), "
                                                    "or --calibCache FILE written by an earlier build")
    inputs = [v.name for v in graph.inputs if graph.value(v.name).dtype is not None and graph.value(v.name).dtype.is_float]
    histograms, count = collect(graph, config.calib, sorted(set(wanted) | set(inputs)), limit=config.calib_batches)
    constant = [name for name in inputs if histograms[name].total and histograms[name].low == histograms[name].high]
    if constant:
        raise PrecisionError(f"the calibration data is unusable: input {constant[0]!r} holds the single value "
                             f"{histograms[constant[0]].low:g} in all {count} feed(s), so no layer sees a real range",
                             code="KILN-E302", hint="calibrate on real inputs, preprocessed exactly as at inference")
    histograms = {name: histograms[name] for name in wanted}
    tensors = {}
    for name, histogram in histograms.items():
        tensors[name] = {"amax": calibrators.amax(histogram, config.calibrator), "observed": histogram.amax,
                         "low": float(histogram.low) if histogram.total else 0.0,
                         "high": float(histogram.high) if histogram.total else 0.0,
                         "profile": [round(float(v), 6) for v in histogram.profile(histogram.amax)]}
    if all(t["amax"] == 0 for t in tensors.values()):
        raise PrecisionError(f"the calibration data is unusable: every tensor kiln would quantize is zero (or not finite) "
                             f"over its {count} feed(s)", code="KILN-E302",
                             hint="calibrate on real inputs, preprocessed exactly as at inference")
    log.info("int8: calibrated %d tensors over %d feed(s) with the %s calibrator", len(tensors), count, config.calibrator)
    if config.calib_cache:
        cache.write(config.calib_cache, config.calibrator, tensors)
        log.info("int8: wrote calibration cache %s", config.calib_cache)
    return config.calibrator, tensors


def _int8_node(graph: Graph, node: Node, amax: float) -> Node:
    quantized, scale = quantize_per_channel(graph.initializers[node.inputs[1]])
    wq = graph.add_initializer(f"{node.name}.weight_int8", quantized)
    ws = graph.add_initializer(f"{node.name}.weight_scale", scale)
    inputs = list(node.inputs)
    extra = inputs[2:]
    attrs = dict(node.attrs, x_scale=activation_scale(amax))
    return node.replace(op=QUANTIZABLE[(node.domain, node.op)], inputs=(inputs[0], wq, ws, *extra), attrs=attrs)


def _by_speed_or_request(graph: Graph, layers: list[Node], int8: dict[str, Node], asked: dict, config, report) -> set[str]:
    chosen = set()
    # TensorRT ignores --layerPrecisions without constraints; kiln reads them as "prefer" rather than drop them
    forced = config.precision_constraints in ("prefer", "obey") or bool(config.layer_precisions)
    sizes = _opt_sizes(graph, config)
    for node in layers:
        entry = report["layers"].setdefault(node.name, {"op": node.op})
        if forced and asked.get(node.name) == "int8":
            chosen.add(node.name)
            entry.update(precision="int8", why="asked")
            continue
        if config.device != "cpu":  # CPU timings say nothing about a GPU; its tactics are timed by its backend
            chosen.add(node.name)
            entry.update(precision="int8", why=f"{config.device} int8")
            continue
        fp32_ms, int8_ms = _timings(graph, node, int8[node.name], bf16=bool(config.bf16), sizes=sizes)
        entry.update(fp32_ms=round(fp32_ms, 4), int8_ms=round(int8_ms, 4))
        if int8_ms < fp32_ms:
            chosen.add(node.name)
            entry.update(precision="int8", why="faster")
        else:
            entry.update(precision="fp32", why="int8 slower on this CPU")
            log.info("int8: layer %s keeps fp32: int8 %.3f ms vs fp32 %.3f ms on this CPU", node.name, int8_ms, fp32_ms)
    kept = len(layers) - len(chosen)
    if kept:
        log.warning("int8: %d of %d layers keep fp32 because their int8 kernel is slower on this CPU "
                    "(see `kiln inspect` for per-layer timings; --layerPrecisions '*:int8' --precisionConstraints prefer forces int8)",
                    kept, len(layers))
    return chosen


def _opt_sizes(graph: Graph, config) -> dict[str, int]:
    """Named dimensions at the first profile's opt shapes, where the engine is tuned to run."""
    if not config.profiles:
        return {}
    from ..engine.profiles import symbol_sizes

    return symbol_sizes([graph.value(v.name) for v in graph.inputs], config.profiles[0], "opt")


def _timings(graph: Graph, fp32: Node, int8: Node, bf16: bool, sizes: dict | None = None) -> tuple[float, float]:
    """Best of a few runs of each kernel on this layer's shape at the opt sizes (other symbolic dims as 1)."""
    import torch

    from ..backends.cpu.fast import choose
    from ..tensors import numpy_to_torch

    sizes = sizes or {}
    shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in (graph.value(fp32.inputs[0]).shape or ())]
    out_shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in (graph.value(fp32.outputs[0]).shape or ())]
    if not shape:
        return 0.0, float("inf")  # unknown shape: no evidence that int8 pays off
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)

    def arguments(node: Node):
        args = []
        for index, name in enumerate(node.inputs):
            if index == 0:
                args.append(x)
            elif not name:
                args.append(None)
            elif name in graph.initializers:
                args.append(numpy_to_torch(graph.initializers[name]))
            else:  # the residual of a fused convolution
                args.append(torch.randn(out_shape, generator=generator))
        return args

    fp32_run, fp32_args = choose(fp32, graph, bf16).run, arguments(fp32)
    int8_run, int8_args = choose(int8, graph, bf16).run, arguments(int8)
    timings: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        fp32_run(*fp32_args), int8_run(*int8_args)  # warm up: packing, first-call allocations
        for _ in range(7):  # alternate, so a burst of load from other processes hits both alike
            for key, run, args in (("fp32", fp32_run, fp32_args), ("int8", int8_run, int8_args)):
                start = time.perf_counter()
                run(*args)
                timings[key].append(time.perf_counter() - start)
    return min(timings["fp32"]) * 1e3, min(timings["int8"]) * 1e3


def _limited(iterator, count: int):
    for index, item in enumerate(iterator):
        if index >= count:
            break
        yield item


def _torch_feed(feed: dict) -> dict:
    from ..tensors import numpy_to_torch

    return {k: numpy_to_torch(np.asarray(v)) for k, v in feed.items()}


def _check_coverage(graph: Graph, validation: list[dict], wanted: list[str], ranges: dict, report: dict) -> None:
    """Warn when the validation data's values fall where the calibration data had none: beyond its largest
    value (int8 will clip them) or spread unlike it (its thresholds were fitted to another distribution).
    The measure is the total variation distance between the two |x| distributions over the calibration
    range, with everything beyond it counted as one more bin."""
    histograms, _ = collect(graph, validation, wanted, what="validation")
    rows = []
    for name, histogram in histograms.items():
        seen = ranges[name].get("observed", ranges[name]["amax"])
        calibration = ranges[name].get("profile")
        if not histogram.total or not calibration or seen <= 0:
            continue
        shares = histogram.profile(seen, bins=len(calibration) - 1)
        distance = 0.5 * float(np.abs(shares - np.asarray(calibration)).sum())
        rows.append({"tensor": name, "distance": distance, "beyond_share": float(shares[-1]),
                     "calibration_max": seen, "validation_max": histogram.amax})
    rows.sort(key=lambda row: -row["distance"])
    report["coverage"] = rows
    bad = [row for row in rows if row["distance"] > COVERAGE_WARN]
    if bad:
        worst = bad[0]
        message = (f"calibration data does not cover the validation range: on {len(bad)} of {len(rows)} tensor(s) the "
                   f"validation values are distributed unlike the calibration values (worst {worst['tensor']!r}: "
                   f"distance {worst['distance']:.2f}, {worst['beyond_share']:.2%} of values beyond the calibration "
                   f"maximum {worst['calibration_max']:.4g}, validation reaches {worst['validation_max']:.4g}). "
                   f"int8 thresholds fitted to this data will clip or waste range; calibrate on inputs drawn like "
                   f"those the engine will see")
        report["warnings"].append(message)
        log.warning("%s", message)
