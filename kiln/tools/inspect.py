"""What is in a model or an engine: opsets, operators, bindings, unsupported nodes, layers, build info."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def inspect_model(path: str) -> dict[str, Any]:
    from .. import errors
    from ..frontend import onnx as frontend
    from ..ops import registry

    model = frontend.load_model(path)
    report: dict[str, Any] = {
        "kind": "onnx", "path": str(path), "ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": frontend.model_opset(model),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "op_histogram": dict(Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                                     for n in model.graph.node).most_common()),
        "nodes": len(model.graph.node),
        "weights": len(model.graph.initializer),
    }
    try:
        prepared = frontend.infer_shapes(frontend.inline_local_functions(frontend.normalize_opset(model)))
        report["conversion"] = None if report["opset"] >= frontend.CANONICAL_OPSET else f"converts to opset {frontend.CANONICAL_OPSET}"
    except errors.KilnError as error:
        prepared, report["conversion"] = model, str(error)
    graph = frontend.to_ir(prepared)
    report["inputs"] = [_binding(graph.value(v.name)) for v in graph.inputs]
    report["outputs"] = [_binding(graph.value(v.name)) for v in graph.outputs]
    unsupported = []
    for owner, node in graph.walk():
        opset = owner.opsets.get(node.domain, graph.opsets.get(node.domain, 1))
        reason = registry.why_unsupported(node, owner, opset)
        if reason is not None:
            unsupported.append({"node": node.name, "op": node.op, "domain": node.domain or "ai.onnx", "opset": opset, "reason": reason})
    report["unsupported"] = unsupported
    return report


def _binding(value) -> dict[str, Any]:
    return {"name": value.name, "dtype": value.dtype.name if value.dtype else None,
            "shape": list(value.shape) if value.shape is not None else None,
            "dynamic": value.shape is None or not all(isinstance(d, int) for d in value.shape)}


def inspect_engine(path: str) -> dict[str, Any]:
    from ..engine import fileformat

    blob = fileformat.load_bytes(path)
    header, start, end = fileformat.read_header(blob, str(path))
    graph = header["graph"]
    values = {v["name"]: v for v in graph["values"] + graph["inputs"] + graph["outputs"]}
    return {
        "kind": "engine", "path": str(path), "size_bytes": len(blob), "weights_bytes": end - start,
        "target": header["target"], "build_info": header.get("build_info", {}), "config": header.get("config", {}),
        "inputs": [dict(v, dynamic=v["shape"] is None or not all(isinstance(d, int) for d in v["shape"])) for v in graph["inputs"]],
        "outputs": [dict(v, dynamic=v["shape"] is None or not all(isinstance(d, int) for d in v["shape"])) for v in graph["outputs"]],
        "layers": [{"name": n["name"], "op": (f"{n['domain']}::" if n["domain"] else "") + n["op"],
                    "origin": n["origin"], **{k: v for k, v in header.get("layers", {}).get(n["name"], {}).items() if k not in ("op", "origin")},
                    "inputs": n["inputs"], "outputs": n["outputs"],
                    "input_shapes": [_described(values, name) for name in n["inputs"] if name and name not in graph["initializers"]],
                    "output_shapes": [_described(values, name) for name in n["outputs"] if name]} for n in graph["nodes"]],
        "profiles": header.get("profiles", []), "plugins": header.get("plugins", []), "memory": header.get("memory", {}),
    }


def _described(values: dict, name: str) -> str:
    """"float32[1x64x56x56]" for a value of a stored graph, "?" where the engine does not know it."""
    value = values.get(name)
    if value is None:
        return "?"
    return f"{value['dtype'] or '?'}[{_shape(value)}]"


def export_onnx(engine_path: str, onnx_path: str) -> int:
    """Write an engine's optimized graph as an ONNX file (Netron opens it): fused layers are nodes of
    domain "kiln" carrying the model nodes they came from in a `kiln_origin` attribute; every node's
    precision and tactic are in its doc string. Returns the number of nodes written."""
    import onnx
    from onnx import helper

    from ..engine import fileformat

    plan = fileformat.deserialize(fileformat.load_bytes(engine_path), str(engine_path))
    graph = plan.graph
    nodes = []
    for node in graph.nodes:
        attrs = {k: _onnx_attribute(v) for k, v in node.attrs.items()}
        if node.domain == "kiln":
            attrs["kiln_origin"] = list(node.origin) or [node.name]
        layer = plan.layers.get(node.name, {})
        doc = f"from {', '.join(node.origin) or node.name}; precision {layer.get('precision', '?')}, tactic {layer.get('tactic', '?')}"
        nodes.append(helper.make_node(node.op, list(node.inputs), list(node.outputs), name=node.name, domain=node.domain or None,
                                      doc_string=doc, **{k: v for k, v in attrs.items() if v is not None}))
    initializers = [onnx.numpy_helper.from_array(array, name) for name, array in graph.initializers.items()]
    produced = {o for n in graph.nodes for o in n.outputs} - set(graph.output_names())
    info = [_value_info(graph.value(name)) for name in sorted(produced) if graph.value(name).dtype is not None]
    onnx_graph = helper.make_graph(nodes, graph.name, [_value_info(graph.value(v.name)) for v in graph.inputs],
                                   [_value_info(graph.value(v.name)) for v in graph.outputs], initializers, value_info=info)
    opsets = [helper.make_opsetid("" if domain == "" else domain, version) for domain, version in graph.opsets.items()]
    if any(n.domain == "kiln" for n in graph.nodes) and "kiln" not in graph.opsets:
        opsets.append(helper.make_opsetid("kiln", 1))
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="kiln inspect --export-onnx")
    onnx.save(model, onnx_path)
    return len(nodes)


def _onnx_attribute(value):
    import numpy as np
    import onnx

    from ..ir import Graph

    if isinstance(value, Graph):
        return None  # control-flow bodies are not exported; the node still shows
    if isinstance(value, np.ndarray):
        return onnx.numpy_helper.from_array(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Graph) for v in value):
        return None
    if isinstance(value, (list, tuple)):
        # an empty list has no ONNX type; every kiln attribute treats "absent" as empty
        return [float(v) if isinstance(v, float) else v for v in value] or None
    return value


def _value_info(value):
    from onnx import helper

    shape = None if value.shape is None else [d if isinstance(d, (int, str)) else None for d in value.shape]
    if value.dtype is None or value.kind != "tensor":
        return helper.make_empty_tensor_value_info(value.name)
    return helper.make_tensor_value_info(value.name, value.dtype.value, shape)


def inspect_path(path: str) -> dict[str, Any]:
    from ..engine.fileformat import MAGIC

    with open(path, "rb") if Path(path).is_file() else _nothing() as f:
        head = f.read(len(MAGIC)) if f else b""
    return inspect_engine(path) if head == MAGIC or str(path).endswith(".kiln") else inspect_model(path)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _shape(entry: dict) -> str:
    if entry["shape"] is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in entry["shape"]) or "scalar"


def _whole_engine(tuning: dict) -> list[str]:
    """A CUDA engine's whole-engine choice: each variant the build timed whole, and the one it kept (the fastest)."""
    times = tuning.get("whole_engine_ms") or {}
    if not times:
        return []
    kept = min(times, key=times.get)
    timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
    lines = [f"  whole engine: kept {kept!r} of the variants timed whole ({timed})"]
    layers = tuning.get("variant_layers") or {}
    for name, choices in layers.items():
        if name == kept or kept not in layers:
            continue
        differ = [layer for layer, (tactic, _) in choices.items() if (layers[kept].get(layer) or [None])[0] != tactic]
        lines.append(f"    {name!r} ran other tactics in {len(differ)} layer(s), timed one by one there "
                     f"{_timed_sum(choices, differ):.3f} ms against {_timed_sum(layers[kept], differ):.3f} ms in {kept!r}")
    return lines


def _timed_sum(choices: dict[str, list], layers: list[str]) -> float:
    """The sum of the timed ms of `layers` in a variant's {layer: [tactic, ms or None]} (untimed ones count 0)."""
    return sum((choices.get(layer) or [None, None])[1] or 0.0 for layer in layers)


def format_report(report: dict[str, Any]) -> str:
    lines = []
    if report["kind"] == "onnx":
        lines.append(f"model {report['path']}")
        lines.append(f"  ONNX IR v{report['ir_version']}, opset {report['opset']}"
                     f"{' (' + report['conversion'] + ')' if report.get('conversion') else ''}, producer {report['producer'] or '?'}")
        lines.append(f"  {report['nodes']} nodes, {report['weights']} weights")
    else:
        info, target = report["build_info"], report["target"]
        lines.append(f"engine {report['path']} ({report['size_bytes'] / 1e6:.1f} MB, weights {report['weights_bytes'] / 1e6:.1f} MB)")
        where = target["device"] + (f" {target.get('name')} sm{target.get('capability')}" if target["device"] == "cuda" else
                                    f" {target.get('machine', '')} {' '.join(target.get('cpu_features', []))}".rstrip())
        lines.append(f"  target {where}; built by kiln {info.get('kiln')} / torch {info.get('torch')} / onnx {info.get('onnx')}"
                     f" in {info.get('build_seconds', '?')} s")
    lines.append("  inputs:")
    lines += [f"    {b['name']}: {b['dtype']}[{_shape(b)}]{'  (dynamic)' if b['dynamic'] else ''}" for b in report["inputs"]]
    lines.append("  outputs:")
    lines += [f"    {b['name']}: {b['dtype']}[{_shape(b)}]{'  (dynamic)' if b['dynamic'] else ''}" for b in report["outputs"]]
    for index, profile in enumerate(report.get("profiles") or []):  # {input: {min, opt, max}} as kiln/engine/profiles.py stores it
        lines.append(f"  profile {index}: " + ", ".join(f"{name} min {'x'.join(map(str, r['min']))} opt {'x'.join(map(str, r['opt']))} "
                                                       f"max {'x'.join(map(str, r['max']))}" for name, r in profile.items()))
    if report["kind"] == "onnx":
        lines.append("  operators:")
        lines += [f"    {count:5d}  {op}" for op, count in report["op_histogram"].items()]
        if report["unsupported"]:
            lines.append(f"  unsupported nodes ({len(report['unsupported'])}):")
            lines += [f"    {u['node']}: {u['op']} ({u['domain']}, opset {u['opset']}): {u['reason']}" for u in report["unsupported"]]
        else:
            lines.append("  every node is supported")
    else:
        lines.append(f"  layers ({len(report['layers'])}):")
        for layer in report["layers"]:
            origin = ", ".join(layer["origin"][:4]) + (" ..." if len(layer["origin"]) > 4 else "")
            shapes = ", ".join(layer.get("input_shapes", [])) + " -> " + ", ".join(layer.get("output_shapes", []))
            handed = f" (int8 {' and '.join(layer['int8_inputs'])} in)" if layer.get("int8_inputs") else ""
            lines.append(f"    {layer['name']:<40} {layer['op']:<24} {layer.get('precision', ''):<5} {layer.get('tactic', ''):<14} "
                         f"{shapes}{handed}  from {origin}")
        lines += _whole_engine(info.get("cuda_tuning") or {})
        memory = report["memory"]
        if memory.get("peak_bytes") is not None:
            lines.append(f"  activation memory: peak {memory['peak_bytes'] / 1e6:.2f} MB (shared by lifetime), "
                         f"naive sum {memory['naive_bytes'] / 1e6:.2f} MB, lower bound {memory['lower_bound_bytes'] / 1e6:.2f} MB "
                         f"(peak / bound {memory['peak_bytes'] / max(memory['lower_bound_bytes'], 1):.3f})"
                         + (f"; symbols planned at {memory['assumed']}" if memory.get("assumed") else ""))
        elif memory:
            lines.append("  memory: " + ", ".join(f"{k} {v}" for k, v in memory.items()))
    return "\n".join(lines)
