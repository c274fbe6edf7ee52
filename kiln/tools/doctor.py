"""`kiln doctor`: run the checks that catch what goes wrong between a model and a fast engine, and say for
each finding its symptom, its cause and the fix, the way TensorRT's troubleshooting guides list them."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CODES, BindingError, KilnError

FP16_MAX = 65504.0
# A layer that reads and writes no more than this moves its bytes in well under what dispatching it costs: 64 KiB
# take ~3 us at a CPU's tens of GB/s (a kiln CPU step costs ~5-50 us), 1 MiB ~0.3 us at a GPU's TB/s (a kernel
# launch ~5 us). Such a layer's time is overhead. Judged by bytes, not by measured time: a per-layer profile charges
# each layer its dispatch (and on a GPU a synchronisation), which keeps tiny layers at tens of microseconds, above
# any fixed time threshold (a chain of 80 1x4 Gemms measured ~50 us a layer on both the CPU and an H200).
TINY_LAYER_BYTES = {"cpu": 64 << 10, "cuda": 1 << 20}
LAUNCH_BOUND_MIN_LAYERS = 50
CLIPPING_WARN_RATE = 0.01  # share of a tensor's sample values outside its calibrated range
# Precision labels of layers that run in the float type their inputs arrive in: "follow" is the CPU backend's
# (kiln/backends/cpu/fast.py), "input" what engines built before that name was chosen carry.
FOLLOWS_INPUT = ["follow", "input"]


@dataclass
class Finding:
    check: str
    status: str  # "ok", "info", "warning", "error" (blocks the build) or "n/a"
    symptom: str
    cause: str = ""
    fix: str = ""
    code: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        return self.status == "error"


@dataclass
class DoctorReport:
    model: str
    findings: list[Finding] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    fixed_model: str | None = None

    @property
    def blocked(self) -> bool:
        return any(f.blocks for f in self.findings)

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "blocked": self.blocked, "memory": self.memory, "fixed_model": self.fixed_model,
                "findings": [dict(asdict(f), blocks=f.blocks) for f in self.findings]}


def from_error(check: str, error: KilnError) -> Finding:
    """A KilnError as a finding: its message is the symptom, the code's meaning the cause, its hint the fix."""
    return Finding(check, "error", error.message, CODES.get(error.code, "kiln stopped with this error"),
                   error.hint, error.code, {"where": error.where} if error.where else {})


# -- the checks -------------------------------------------------------------------------------------

def check_opset(model, fix_path: str | None) -> tuple[Finding, Any]:
    """Opset too new or too old for kiln: (finding, the model converted to kiln's canonical opset or None)."""
    import onnx
    from onnx import version_converter

    from ..frontend.onnx import CANONICAL_OPSET, model_opset

    opset, newest = model_opset(model), onnx.defs.onnx_opset_version()
    target = newest if opset > newest else CANONICAL_OPSET
    if CANONICAL_OPSET <= opset <= newest:
        return Finding("opset", "ok", f"opset {opset} runs as it is (kiln reads opsets {CANONICAL_OPSET} to {newest})"), model
    try:
        converted = version_converter.convert_version(model, target)
        problem = None
    except Exception as error:  # noqa: BLE001 (the converter raises RuntimeError/ConvertError with its reason)
        converted, problem = None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    written = None
    if converted is not None and fix_path:
        onnx.save(converted, fix_path)
        written = fix_path
    if opset > newest:
        finding = Finding("opset", "error", f"the model uses opset {opset}, newer than kiln reads (opset {newest}, onnx {onnx.__version__})",
                          "the exporter targeted a newer ONNX than the one installed", code="KILN-E103")
        finding.fix = (f"wrote {written}, converted down to opset {newest}: build that" if written else
                       f"run kiln doctor --fix to convert it down to opset {newest}" if converted is not None else
                       f"re-export with opset {newest} or lower (converting down failed: {problem}), or upgrade onnx and kiln")
        return finding, None
    if converted is None:
        return Finding("opset", "error", f"the model uses opset {opset} and cannot be converted to opset {CANONICAL_OPSET}",
                       f"onnx's version converter fails on it: {problem}",
                       f"re-export the model from its framework at opset {CANONICAL_OPSET} or newer", "KILN-E102"), None
    return Finding("opset", "info", f"the model uses opset {opset}, older than kiln's canonical opset {CANONICAL_OPSET}",
                   "old exporters write old opsets; kiln converts the model on every build",
                   f"wrote {written} (opset {CANONICAL_OPSET}): build that" if written else
                   f"run kiln doctor --fix to write the model converted to opset {CANONICAL_OPSET} once", "KILN-E102",
                   {"opset": opset, "converted_to": CANONICAL_OPSET, "written": written}), converted


def prepared_graph(model):
    """The model as kiln's frontend sees it before the unsupported-operator check: functions inlined or expanded."""
    from ..frontend import onnx as frontend
    from ..frontend.functions import expand_schema_functions, inline_local_functions
    from ..ops import registry

    model = frontend.infer_shapes(inline_local_functions(model))
    opset = frontend.model_opset(model)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}

    def lacks_kernel(node) -> bool:
        return registry.lookup(node.op_type, node.domain, opsets.get(node.domain, opset)) is None

    model, expanded = expand_schema_functions(model, lacks_kernel, frontend._value_types(model.graph))
    if expanded:
        model = frontend.infer_shapes(model)
    return frontend.to_ir(model)


def check_operators(graph) -> Finding:
    from ..frontend.unsupported import way_out
    from ..ops import registry

    problems = []
    for owner, node in graph.walk():
        opset = owner.opsets.get(node.domain, graph.opsets.get(node.domain, 1))
        reason = registry.why_unsupported(node, owner, opset)
        if reason is not None:
            problems.append({"node": node.name, "op": node.op_key, "opset": opset, "reason": reason,
                             "fix": way_out(node, opset, reason)})
    if not problems:
        return Finding("operators", "ok", f"all {sum(1 for _ in graph.walk())} nodes have kiln kernels")
    kinds = sorted({p["op"] for p in problems})
    fixes = sorted({p["fix"] for p in problems})
    return Finding("operators", "error", f"{len(problems)} node(s) use {len(kinds)} operator(s) kiln cannot run: {', '.join(kinds)}",
                   "; ".join(sorted({f"{p['op']}: {p['reason']}" for p in problems})[:6]),
                   " | ".join(fixes[:4]), "KILN-E101", {"nodes": problems})


def check_dynamic(graph, config) -> Finding:
    """Dynamic inputs need an optimization profile (or --useModelShapes with declared sizes): the build's own check."""
    from ..engine.profiles import resolve_profiles

    inputs = [graph.value(v.name) for v in graph.inputs]
    dynamic = {v.name: list(v.shape or []) for v in inputs if v.shape is None or not v.is_static}
    if not dynamic:
        return Finding("dynamic shapes", "ok", "every input has a fixed shape")
    listing = ", ".join(f"{n}[{'x'.join('?' if d is None else str(d) for d in dims)}]" for n, dims in dynamic.items())
    try:
        profiles = resolve_profiles(inputs, list(config.profiles), getattr(config, "use_model_shapes", False))
    except KilnError as error:
        finding = from_error("dynamic shapes", error)
        finding.symptom = f"dynamic input(s) {listing}: {finding.symptom}"
        finding.cause = ("an engine is built for the shape ranges its optimization profiles name; "
                         "a dynamic dimension without one cannot be planned or tuned")
        return finding
    return Finding("dynamic shapes", "ok", f"dynamic input(s) {listing} are covered by {len(profiles)} optimization profile(s)",
                   details={"inputs": dynamic})


def check_inputs(bindings, given: dict) -> Finding:
    from ..engine.bindings import check_feed

    if not given:
        return Finding("input shapes", "n/a", "no input given to check against the model (--input NAME=FILE.npy or --load-inputs)")
    try:
        check_feed(given, bindings)
    except BindingError as error:
        finding = from_error("input shapes", error)
        where = error.where.rsplit("[", 1)
        if error.code == "KILN-E405" and len(where) == 2 and where[1] == "0]":
            finding.symptom = "batch size mismatch: " + finding.symptom
            finding.fix = ("feed the batch the engine was built for, or build it with a dynamic batch dimension and a "
                           "profile that covers this batch (--minShapes/--optShapes/--maxShapes)")
        return finding
    return Finding("input shapes", "ok", f"the given input(s) {', '.join(given)} match the model's bindings")


def sample_activations(model, feed: dict) -> dict[str, np.ndarray]:
    """Every tensor of the model on `feed`, computed by onnxruntime (the model's own outputs included)."""
    from .compare import reference_model, run_reference

    names = [name for node in model.graph.node for name in node.output if name]
    seen = set()
    names = [n for n in names if not (n in seen or seen.add(n))]
    return run_reference(reference_model(model, names), feed, [o.name for o in model.graph.output if o.name not in seen] + names)


def check_fp16_overflow(values: dict[str, np.ndarray], weights: dict[str, np.ndarray], config) -> Finding:
    asked = config.fp16 or config.best
    over = []
    for name, array in list(values.items()) + list(weights.items()):
        if array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.abs(array[np.isfinite(array)]) if array.dtype.kind == "f" else np.abs(array)
        peak = float(finite.max()) if finite.size else 0.0
        if peak > FP16_MAX:
            over.append({"tensor": name, "max_abs": peak, "weight": name in weights})
    if not over:
        return Finding("fp16 overflow", "ok", f"no activation or weight exceeds fp16's largest value {FP16_MAX:g} on the sample data")
    over.sort(key=lambda o: -o["max_abs"])
    names = ", ".join(f"{o['tensor']} ({o['max_abs']:.3g})" for o in over[:5])
    return Finding("fp16 overflow", "warning" if asked else "info",
                   f"{len(over)} tensor(s) exceed {FP16_MAX:g}, fp16's largest value, on the sample data: {names}",
                   "in fp16 these become inf and then NaN downstream" + ("" if asked else " (only if you build with --fp16)"),
                   "keep these layers in fp32 or bf16 (bf16 has fp32's range: --bf16), or rescale the model "
                   "(e.g. normalise inputs, fold a scale into the weights)", "KILN-E303", {"tensors": over})


def constant_tensors(model) -> set[str]:
    """Tensors computed from weights alone (e.g. weights stored as ConstantOfShape): the build folds them into weights."""
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(not name or name in constant for name in node.input) and node.op_type not in (
                "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"):
            constant.update(node.output)
    return constant


def peak_live_bytes(model, values: dict[str, np.ndarray], feed: dict) -> int:
    """The most activation bytes alive at once when the nodes run in the model's order, freeing after last use."""
    constant = constant_tensors(model)
    last_use: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = index
    keep = {o.name for o in model.graph.output}
    live = {name: array.nbytes for name, array in feed.items()}
    peak = sum(live.values())
    for index, node in enumerate(model.graph.node):
        for name in node.output:
            if name in values and name not in constant:
                live[name] = values[name].nbytes
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= index and n not in keep]:
            live.pop(name)
    return peak


def check_memory(model, graph, values: dict, feed: dict, device: str, measured: dict, engine=None) -> Finding:
    constant = constant_tensors(model)
    weights = sum(a.nbytes for a in graph.initializers.values()) + sum(
        values[name].nbytes for name in constant if name in values and name not in graph.initializers)
    activations = peak_live_bytes(model, values, feed) if values else 0
    planned = engine.plan.memory if engine is not None else {}
    if planned.get("peak_bytes") and not planned.get("assumed"):
        # The built engine's own figures: weights after folding and fusion, and its activation arena.
        weights = sum(a.nbytes for a in engine.plan.graph.initializers.values())
        activations = int(planned["peak_bytes"])
    return memory_finding(weights, activations, feed, device, measured)


def planned_activation_bytes(engine) -> int | None:
    """The activation memory a built engine plans for: the CPU memory plan's peak, or the bytes a CUDA engine's
    preallocated activation buffers take (recorded by its lowering); None where the engine records neither."""
    peak = engine.plan.memory.get("peak_bytes")
    if peak is None:
        peak = engine.plan.build_info.get("cuda_tuning", {}).get("activation_bytes")
    return peak


def memory_finding(weights: int, activations: int, feed: dict, device: str, measured: dict) -> Finding:
    """Weights plus peak activations against the memory available, with a batch or precision that would fit."""
    from .memory import device_available_bytes, format_bytes, host_available_bytes

    estimate = weights + activations
    available = device_available_bytes(device) if device == "cuda" else host_available_bytes()
    where = "GPU" if device == "cuda" else "host"
    details = {"weights_bytes": weights, "peak_activation_bytes": activations, "estimate_bytes": estimate,
               "available_bytes": available, "measured": measured}
    summary = (f"estimated {format_bytes(estimate)} ({format_bytes(weights)} weights + {format_bytes(activations)} "
               f"activations at their peak) against {format_bytes(available)} {where} memory available")
    if available is None:
        return Finding("memory", "info", summary, details=details)
    batch = next((int(a.shape[0]) for a in feed.values() if a.ndim and a.shape[0] > 1), 1)
    per_item = activations / batch
    if estimate <= 0.8 * available:
        return Finding("memory", "ok", summary, details=details)
    fitting = int((0.8 * available - weights) // per_item) if per_item > 0 else 0
    suggestion = (f"use batch {fitting} or less (activations take {format_bytes(per_item)} per item)" if 0 < fitting < batch
                  else "the weights alone do not fit: use a lower precision (--bf16/--fp16/--int8) to halve them or more"
                  if weights > 0.8 * available else "free memory held by other processes")
    return Finding("memory", "error" if estimate > available else "warning", summary,
                   "the engine's weights and live activations need about that much at once",
                   suggestion + ("; on the GPU also cap the workspace with --memPoolSize workspace:SIZE" if device == "cuda" else ""),
                   "KILN-E601", details)


def calibrated_ranges(graph, config, calib, wanted: list[str]) -> tuple[dict[str, dict], int, str]:
    """The per-tensor int8 thresholds the build would use, computed by kiln.quant exactly as the build does:
    from the calibration cache when it exists, else from the calibration data. ({tensor: {amax, low, high}},
    number of feeds, where they came from)."""
    from ..quant import cache, calibrators
    from ..quant.calibrate import collect

    if config.calib_cache and Path(config.calib_cache).exists() and calib is None:
        _calibrator, tensors = cache.read(config.calib_cache)
        return {name: t for name, t in tensors.items() if name in wanted}, 0, f"calibration cache {config.calib_cache}"
    histograms, count = collect(graph, calib, wanted, limit=config.calib_batches)
    ranges = {name: {"amax": calibrators.amax(h, config.calibrator), "low": float(h.low), "high": float(h.high)}
              for name, h in histograms.items() if h.total}
    return ranges, count, f"{count} calibration feed(s), {config.calibrator} calibrator"


def check_calibration(model, graph, config, calib, sample_values: dict) -> Finding:
    """INT8 needs thresholds; with calibration data, how much of the sample data each threshold would clip."""
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    calib = calib if calib is not None else getattr(config, "calib", None)
    cache_path = getattr(config, "calib_cache", None)
    if not config.int8:
        return Finding("calibration", "n/a", "not an INT8 build (--int8 not given)")
    if has_qdq and calib is None:
        return Finding("calibration", "ok", "the model carries its own quantization (QuantizeLinear/DequantizeLinear nodes)")
    if calib is None and not (cache_path and Path(cache_path).exists()):
        return Finding("calibration", "error", "--int8 was asked for, but there is no calibration data and the model has no QDQ nodes",
                       "INT8 layers need the range of every activation, measured on representative inputs",
                       "give --calib DIR (a directory of .npz feeds, 100-500 real inputs), or quantize the model to QDQ first",
                       "KILN-E302")
    try:
        import kiln.quant.calibrate  # noqa: F401 (the INT8 support may be absent from a trimmed install)
    except ImportError:
        return Finding("calibration", "n/a", "kiln.quant is not available here, so calibration cannot be checked")
    produced = {name for node in graph.nodes for name in node.outputs}
    wanted = sorted(name for name, array in sample_values.items() if array.dtype.kind == "f" and name in produced)
    try:
        ranges, count, source = calibrated_ranges(graph, config, calib, wanted)
    except KilnError as error:
        finding = from_error("calibration", error)
        finding.symptom = "the calibration data cannot be used: " + finding.symptom
        return finding
    rows = []
    for name, limits in ranges.items():
        sample = sample_values[name].astype(np.float64)
        threshold = float(limits["amax"])
        clipped = float(np.mean(np.abs(sample) > threshold)) if sample.size else 0.0
        span = float(sample.max() - sample.min()) if sample.size else 0.0
        coverage = min(1.0, (limits["high"] - limits["low"]) / span) if span > 0 else 1.0
        rows.append({"tensor": name, "threshold": threshold, "calibrated": [limits["low"], limits["high"]],
                     "sample": [float(sample.min()), float(sample.max())] if sample.size else [0.0, 0.0],
                     "clipping_rate": clipped, "coverage": coverage})
    rows.sort(key=lambda r: -r["clipping_rate"])
    bad = [r for r in rows if r["clipping_rate"] > CLIPPING_WARN_RATE]
    details = {"batches": count, "source": source, "tensors": rows}
    if not bad:
        return Finding("calibration", "ok", f"the thresholds from {source} cover the sample data: the worst tensor clips "
                       f"{100 * (rows[0]['clipping_rate'] if rows else 0):.2f}% of its values", details=details)
    worst = ", ".join(f"{r['tensor']} clips {100 * r['clipping_rate']:.1f}% (covers {100 * r['coverage']:.0f}% of the range)" for r in bad[:4])
    return Finding("calibration", "warning", f"calibration data looks unrepresentative: {len(bad)} tensor(s) clip more than "
                   f"{100 * CLIPPING_WARN_RATE:g}% of the sample values at the int8 thresholds from {source}: {worst}",
                   "the calibration inputs do not span the values the model sees on the sample data, so INT8 saturates",
                   "calibrate on more, and more varied, real inputs (a few hundred drawn like production data), "
                   "preprocessed exactly as at inference; keep the worst layers in higher precision (--layerPrecisions NAME:fp32)",
                   "KILN-E302", details)


def check_precision_fallback(engine, asked: list[str]) -> Finding:
    """Layers not in a precision `asked` for (beyond fp32), or that record a fallback, or left on the reference tactic."""
    asked = [p for p in asked if p != "fp32"]
    layers = engine.plan.layers
    # An int8 build times each quantizable layer both ways and keeps fp32 where int8 is slower (kiln/quant/lower.py):
    # the faster precision, chosen by measurement, is no fallback.
    decisions = (getattr(engine.plan, "build_info", {}).get("quantization") or {}).get("layers", {})
    chosen = {name: d for name, d in decisions.items() if d.get("precision") == "fp32" and d.get("int8_ms") is not None
              and d.get("fp32_ms") is not None and d["int8_ms"] >= d["fp32_ms"]}
    # A bf16 CPU engine's dilated stem (a convolution of an image's few channels) may run kiln's stem kernel in fp32
    # math with bf16 out: more accurate than bf16, raced against oneDNN's bf16 kernel (kept by rule without a timing
    # feed).
    stems = [name for name, info in layers.items()
             if info.get("tactic") == "native-stem" and info.get("precision") == "fp32"] if "bf16" in asked else []
    fallbacks = [{"layer": name, **info} for name, info in layers.items() if info.get("fallback")]
    if asked:
        # the layer computes in whatever float type reaches it (pooling, reshapes), which is no fallback
        fallbacks += [{"layer": name, **info} for name, info in layers.items()
                      if info.get("precision", "fp32") not in asked + FOLLOWS_INPUT and not info.get("fallback")
                      and name not in chosen and name not in stems]
    # A layer on the reference tactic while other layers of its operator got a faster one fell back too
    # (e.g. a convolution with asymmetric padding that the packed kernel does not take).
    fast_ops = {info.get("op") for info in layers.values() if info.get("tactic", "torch") != "torch"}
    listed = {f["layer"] for f in fallbacks}
    fallbacks += [{"layer": name, **info, "fallback": f"reference tactic, while other {info.get('op')} layers run a faster one"}
                  for name, info in layers.items()
                  if name not in listed and info.get("op") in fast_ops and info.get("tactic", "torch") == "torch"]
    timings = ", ".join(f"{name} {d['int8_ms']:.3g} vs {d['fp32_ms']:.3g} ms" for name, d in list(chosen.items())[:4])
    kept = f"; {len(chosen)} layer(s) keep fp32 because their int8 kernel measured slower (int8 vs fp32: {timings})" if chosen else ""
    if stems:
        kept += f"; {len(stems)} stem layer(s) ({', '.join(stems[:4])}) compute in fp32 and write bf16 (native-stem)"
    if not fallbacks:
        what = f"in the precisions asked for ({', '.join(asked)})" if asked else "in fp32, as asked"
        others = len(layers) - len(chosen) - len(stems)
        return Finding("precision fallback", "ok", f"all {others} other layers run {what}{kept}"
                       if chosen or stems else f"all {len(layers)} layers run {what}",
                       details={"kept_fp32_by_timing": chosen, "fp32_stems": stems})
    ops = sorted({f["op"] for f in fallbacks if "op" in f})
    return Finding("precision fallback", "warning",
                   f"{len(fallbacks)} of {len(layers)} layers fall back to a slower precision or tactic "
                   f"({', '.join(sorted({f.get('precision', 'fp32') + '/' + f.get('tactic', '?') for f in fallbacks}))}): "
                   f"ops {', '.join(ops[:8])}{kept}",
                   "kiln has no faster kernel for these layers in that precision on this device, or the precision rules "
                   "rejected it (accuracy)", "if they matter for speed, check `kiln inspect ENGINE` for each layer's tactic; "
                   "a plugin can supply the kernel (docs/plugins.md)", "KILN-E301",
                   {"layers": fallbacks[:200], "kept_fp32_by_timing": chosen})


def check_native_kernels(engine) -> Finding:
    """Whether a CPU engine's fp32 and bf16 convolutions could take kiln's native kernels (kiln/backends/cpu/native.py),
    and why not: without them every such layer runs oneDNN's kernel, 10-15% slower on SqueezeNet-sized models in fp32
    and up to 2x in bf16."""
    from ..backends.cpu import native
    from ..backends.cpu.fast import NATIVE_TACTICS

    layers = engine.plan.layers
    convolutions = [name for name, layer in layers.items()
                    if layer.get("op") == "kiln::Conv" and layer.get("precision") in ("fp32", "bf16")]
    if engine.device != "cpu" or not convolutions:
        return Finding("native kernels", "n/a", "no fp32 or bf16 convolution on the CPU")
    running = sum(layers[name].get("tactic") in NATIVE_TACTICS for name in convolutions)
    ok, reason = native.available()
    bf16 = any(layers[name].get("precision") == "bf16" for name in convolutions)
    if ok and bf16 and not native.amx_available():
        ok, reason = False, "no AMX-BF16 tile kernels (the CPU, the compiler or Linux does not allow them)"
    if not ok:
        return Finding("native kernels", "warning",
                       f"{len(convolutions)} convolution(s) run oneDNN's kernel only: kiln's native kernels are unavailable ({reason})",
                       "kiln compiles its AVX-512 (fp32) and AMX (bf16) kernels once per machine with the system's C++ "
                       "compiler; without them the build cannot time them against oneDNN's",
                       "install g++ (or set CXX) on an AVX-512 CPU (AMX-BF16 for bf16 engines), leave KILN_NATIVE unset, "
                       "and rebuild the engine")
    return Finding("native kernels", "ok", f"kiln's native kernels run {running} of {len(convolutions)} convolution(s); "
                   "the build timed them against oneDNN's in the engine and kept the faster for each layer")


def check_onednn_primitives(engine) -> Finding:
    """Whether a CPU engine's fp32 or bf16 convolutions that stay on oneDNN run kiln's own primitives (created once per
    layer: kiln/backends/cpu/onednn.py) or torch's oneDNN call, which costs 20-22 us more per layer (about 5% of
    ResNet-50 at batch 1), and why."""
    from ..backends.cpu import onednn

    layers = engine.plan.layers
    on_onednn = [name for name, layer in layers.items() if layer.get("op") == "kiln::Conv"
                 and layer.get("precision") in ("fp32", "bf16") and layer.get("tactic") in ("onednn-primitive", "onednn-packed")]
    if engine.device != "cpu" or not on_onednn:
        return Finding("oneDNN primitives", "n/a", "no fp32 or bf16 convolution on oneDNN")
    own = sum(layers[name].get("tactic") == "onednn-primitive" for name in on_onednn)
    ok, reason = onednn.available()
    if not ok:
        return Finding("oneDNN primitives", "warning",
                       f"{len(on_onednn)} convolution(s) run torch's oneDNN call: kiln's own primitives are unavailable ({reason})",
                       "torch's call builds the primitive's descriptor on every run, 20-22 us a layer",
                       "pip install onednn-devel-cpu-gomp==2023.2.0 (Linux x86-64), leave KILN_ONEDNN unset, and rebuild the engine")
    return Finding("oneDNN primitives", "ok", f"{own} of {len(on_onednn)} oneDNN convolution(s) run kiln's own primitives "
                   "(the rest: a residual summed into a buffer still read, or a layer oneDNN offers only a reference kernel for)")


def layer_bytes(engine, feed: dict) -> dict[str, int]:
    """Bytes each layer reads and writes on `feed` (its input tensors, weights included, and its outputs), seen
    through `on_step` while the engine runs as built."""
    import torch

    from ..engine.bindings import check_feed

    tensors, _ = check_feed(feed, engine.inputs)
    sizes: dict[str, int] = {}

    def size(value) -> int:
        try:
            return int(value.numel()) * int(value.element_size()) if isinstance(value, torch.Tensor) else 0
        except RuntimeError:  # an opaque packed weight (oneDNN) exposes no size
            return 0

    def on_step(step, env=None) -> None:
        if env is None:
            raise KilnError(f"the {engine.device} program does not expose its layers' tensors", code="KILN-E408",
                            hint="the launch-overhead check needs a program that passes env to on_step")
        sizes[step.name] = sum(size(env.get(name)) for name in (*step.inputs, *step.outputs) if name)

    with torch.inference_mode():
        engine.select(tensors).execute(tensors, on_step=on_step)
    return sizes


def check_launch_bound(engine, profile: list[dict], sizes: dict[str, int]) -> Finding:
    """Many layers that each move under TINY_LAYER_BYTES, taking most of the profiled time: dispatch-bound."""
    from .memory import format_bytes

    if not profile or not sizes:
        return Finding("launch overhead", "n/a", "no per-layer profile")
    limit = TINY_LAYER_BYTES.get(engine.device, TINY_LAYER_BYTES["cpu"])
    tiny = [layer for layer in profile if sizes.get(layer["name"], limit + 1) <= limit]
    total = sum(layer["averageMs"] for layer in profile)
    tiny_ms = sum(layer["averageMs"] for layer in tiny)
    summary = (f"{len(tiny)} of {len(profile)} layers each read and write {format_bytes(limit)} or less, "
               f"and take {tiny_ms:.3f} of the {total:.3f} ms the per-layer profile measured")
    details = {"layers": len(profile), "tiny_layers": len(tiny), "tiny_ms": tiny_ms, "total_ms": total,
               "tiny_layer_bytes": limit, "tiny": [layer["name"] for layer in tiny][:200]}
    if len(profile) < LAUNCH_BOUND_MIN_LAYERS or len(tiny) <= len(profile) / 2 or tiny_ms <= total / 2:
        return Finding("launch overhead", "ok", summary, details=details)
    if engine.device == "cuda":
        if getattr(engine.program, "use_cuda_graph", False):
            return Finding("launch overhead", "info", "launch-bound engine: " + summary,
                           "each kernel launch costs microseconds of CPU time, more than these kernels run; the engine "
                           "already replays as one CUDA graph, which takes most of that off its latency (the per-layer "
                           "profile runs step by step)", "compare kiln bench with a build using --noCudaGraph to see what "
                           "the graph saves; to go further, batch more work per call", details=details)
        return Finding("launch overhead", "warning", "launch-bound engine: " + summary,
                       "each kernel launch costs several microseconds of CPU time, more than these kernels run",
                       "replay the engine as a CUDA graph: kiln bench --useCudaGraph (Engine option use_cuda_graph; "
                       "engines with static shapes do unless built with --noCudaGraph), or batch more work per call",
                       details=details)
    return Finding("launch overhead", "info", "many tiny layers: " + summary,
                   "per-layer dispatch overhead is most of the time; CUDA graphs do not apply on the CPU",
                   "use a larger batch per call so each layer does more work", details=details)


# -- the whole examination ----------------------------------------------------------------------------

def is_engine_file(path: str) -> bool:
    from ..engine.fileformat import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return str(path).endswith(".kiln")


def diagnose_engine(path: str, *, given: dict | None = None, shapes: dict | None = None, seed: int = 0,
                    profile_iterations: int = 3) -> DoctorReport:
    """The checks that apply to a built engine: whole and runnable here (target, plugins), inputs, fallbacks,
    memory, launch overhead."""
    from ..engine.runtime import load
    from .bench import benchmark, sample_feed
    from .memory import MemoryMonitor

    report = DoctorReport(str(path))
    try:
        engine = load(path)
    except KilnError as error:
        report.add(from_error("engine file", error))
        return report
    info = engine.plan.build_info
    report.add(Finding("engine file", "ok", f"whole, and runnable on this machine ({engine.device}); built by kiln "
                       f"{info.get('kiln', '?')} with torch {info.get('torch', '?')}"))
    report.add(check_inputs(engine.inputs, dict(given or {})))
    asked = [name for name in ("tf32", "fp16", "bf16", "int8", "fp8") if engine.plan.config.get(name)]
    report.add(check_precision_fallback(engine, asked))
    report.add(check_native_kernels(engine))
    report.add(check_onednn_primitives(engine))
    profile, feed, sizes = [], {}, {}
    with MemoryMonitor(device=engine.device) as monitor:
        try:
            feed = sample_feed(engine, seed, shapes, None if report.blocked else given)
            result = benchmark(engine, feed, warmup_ms=0, iterations=profile_iterations, duration_s=0, profile=True,
                               progress=False, monitor=monitor)
            profile = result.layers
            report.memory["latency_ms"] = result.stats("latency")
            sizes = layer_bytes(engine, feed)
        except KilnError as error:
            report.add(from_error("run", error))
    report.memory.update(monitor.summary())
    report.memory["timeline"] = monitor.timeline
    planned = planned_activation_bytes(engine)
    if planned is not None:
        weights = sum(a.nbytes for a in engine.plan.graph.initializers.values())
        report.add(memory_finding(weights, int(planned), feed, engine.device, monitor.summary()))
    else:
        report.add(Finding("memory", "n/a", "the engine records no memory plan"))
    report.add(check_launch_bound(engine, profile, sizes))
    return report


def diagnose(model_path: str, config, *, given: dict | None = None, shapes: dict | None = None, calib: str | None = None,
             fix_path: str | None = None, seed: int = 0, profile_iterations: int = 3) -> DoctorReport:
    """Run every check on `model_path` as `config` would build it (or, for a .kiln engine, the checks that
    apply to it); never raises for a problem of the model."""
    from ..frontend.onnx import load_model
    from .inputs import random_feed
    from .memory import MemoryMonitor

    if is_engine_file(model_path):
        return diagnose_engine(model_path, given=given, shapes=shapes, seed=seed, profile_iterations=profile_iterations)
    report = DoctorReport(str(model_path))
    given, shapes = dict(given or {}), dict(shapes or {})
    try:
        config.validate()
    except KilnError as error:
        report.add(from_error("configuration", error))
        return report
    try:
        model = load_model(model_path)
    except KilnError as error:
        report.add(from_error("model file", error))
        return report
    finding, converted = check_opset(model, fix_path)
    report.add(finding)
    report.fixed_model = finding.details.get("written") or (fix_path if finding.fix.startswith("wrote") else None)
    if converted is None:
        return report
    graph = prepared_graph(converted)
    report.add(check_operators(graph))
    if shapes and not config.profiles:  # as in trtexec, shapes alone make one profile of exactly those shapes
        config = dataclasses.replace(config, profiles=[{name: (shape, shape, shape) for name, shape in shapes.items()}])
    report.add(check_dynamic(graph, config))
    from ..engine.bindings import Binding

    bindings = [Binding.of(graph.value(v.name)) for v in graph.inputs]
    report.add(check_inputs(bindings, given))
    with MemoryMonitor(device=config.device) as monitor:
        feed = random_feed(bindings, seed=seed, shapes=shapes)
        if not any(f.blocks and f.check == "input shapes" for f in report.findings):
            feed.update(given)
        monitor.mark("sample run (onnxruntime)")
        try:
            values = sample_activations(converted, feed)
        except KilnError as error:
            values = {}
            report.add(Finding("sample run", "info", f"onnxruntime could not run the model on sample data: {error.message}",
                               "the fp16-range, memory and calibration checks need activations", "", error.code))
        if values:
            report.add(check_fp16_overflow(values, graph.initializers, config))
        report.add(check_calibration(converted, graph, config, calib, values) if values or not config.int8 else
                   Finding("calibration", "n/a", "no sample activations to check calibration against"))
        engine = None
        if not report.blocked:
            monitor.mark("build")
            try:
                from ..builder import build

                engine = build(model_path, config)
            except KilnError as error:
                report.add(from_error("build", error))
        profile, sizes = [], {}
        if engine is not None:
            report.add(check_precision_fallback(engine, config.precisions()))
            report.add(check_native_kernels(engine))
            report.add(check_onednn_primitives(engine))
            monitor.mark("profile run")
            try:
                from .bench import benchmark

                engine_feed = {k: v for k, v in feed.items() if k in {b.name for b in engine.inputs}}
                result = benchmark(engine, engine_feed, warmup_ms=0, iterations=profile_iterations, duration_s=0,
                                   profile=True, progress=False, monitor=monitor)
                profile = result.layers
                report.memory["latency_ms"] = result.stats("latency")
                sizes = layer_bytes(engine, engine_feed)
            except KilnError as error:
                report.add(from_error("run", error))
    report.memory.update(monitor.summary())
    report.memory["timeline"] = monitor.timeline
    report.add(check_memory(converted, graph, values, feed, config.device, monitor.summary(), engine))
    if engine is not None:
        report.add(check_launch_bound(engine, profile, sizes))
    return report


_MARK = {"ok": "ok", "info": "info", "warning": "WARNING", "error": "ERROR", "n/a": "n/a"}


def format_report(report: DoctorReport) -> str:
    from .memory import format_bytes

    lines = [f"kiln doctor {report.model}"]
    for f in report.findings:
        lines.append(f"[{_MARK[f.status]}] {f.check}: {f.symptom}" + (f"  ({f.code})" if f.code and f.status in ("warning", "error") else ""))
        if f.status not in ("ok", "n/a"):
            if f.cause:
                lines.append(f"    cause: {f.cause}")
            if f.fix:
                lines.append(f"    fix:   {f.fix}")
    memory = report.memory
    if memory.get("peak_host_bytes"):
        line = f"memory while checking: peak host {format_bytes(memory['peak_host_bytes'])}"
        if memory.get("peak_device_bytes") is not None:
            line += f", peak device {format_bytes(memory['peak_device_bytes'])}"
        lines.append(line)
    blocking = [f.check for f in report.findings if f.blocks]
    lines.append(f"blocked by: {', '.join(blocking)}" if blocking else "nothing blocks the build")
    return "\n".join(lines)
