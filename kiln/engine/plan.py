"""The plan: the optimized graph plus everything the runtime needs to run it, as plain data.

`plan_to_data` turns a Plan into a JSON-able dict and a dict of named weight arrays;
`plan_from_data` reverses it. Nothing in a plan is code: kernels are found by operator name
in the registry when the engine is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EngineFileError
from ..ir import DType, Graph, Node, Value


@dataclass
class Plan:
    graph: Graph
    target: dict[str, Any]  # {"device": "cpu", "cpu_features": [...]} or {"device": "cuda", "name", "capability"}
    build_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # node name -> precision, tactic, ...
    profiles: list[dict[str, Any]] = field(default_factory=list)
    plugins: list[dict[str, str]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)


def _value_to_data(value: Value) -> dict:
    data = {"name": value.name, "dtype": value.dtype.name if value.dtype else None,
            "shape": list(value.shape) if value.shape is not None else None}
    if value.kind != "tensor":
        data["kind"] = value.kind
    return data


def _value_from_data(data: dict) -> Value:
    shape = tuple(data["shape"]) if data["shape"] is not None else None
    return Value(data["name"], DType[data["dtype"]] if data["dtype"] else None, shape, data.get("kind", "tensor"))


class _WeightTable:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, array: np.ndarray) -> str:
        key = f"w{len(self.arrays)}"
        self.arrays[key] = array
        return key


def _attr_to_data(value: Any, weights: _WeightTable) -> Any:
    if isinstance(value, Graph):
        return {"graph": _graph_to_data(value, weights)}
    if isinstance(value, np.ndarray):
        return {"tensor": weights.add(value)}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Graph, np.ndarray)) for v in value):
        return {"list": [_attr_to_data(v, weights) for v in value]}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_attr_to_data(v, weights) for v in value]
    raise AssertionError(f"attribute value of type {type(value).__name__} cannot be stored")


def _attr_from_data(data: Any, weights: dict[str, np.ndarray]) -> Any:
    if isinstance(data, dict):
        if "graph" in data:
            return _graph_from_data(data["graph"], weights)
        if "tensor" in data:
            return weights[data["tensor"]]
        if "list" in data:
            return [_attr_from_data(v, weights) for v in data["list"]]
        raise EngineFileError(f"unknown attribute encoding {sorted(data)}", code="KILN-E503")
    return data


def _graph_to_data(graph: Graph, weights: _WeightTable) -> dict:
    return {
        "name": graph.name,
        "opsets": graph.opsets,
        "inputs": [_value_to_data(graph.value(v.name)) for v in graph.inputs],
        "outputs": [_value_to_data(graph.value(v.name)) for v in graph.outputs],
        "values": [_value_to_data(v) for v in graph.values.values()],
        "initializers": {name: weights.add(array) for name, array in graph.initializers.items()},
        "nodes": [{"op": n.op, "domain": n.domain, "name": n.name, "inputs": list(n.inputs), "outputs": list(n.outputs),
                   "origin": list(n.origin), "attrs": {k: _attr_to_data(v, weights) for k, v in n.attrs.items()}}
                  for n in graph.nodes],
    }


def _graph_from_data(data: dict, weights: dict[str, np.ndarray]) -> Graph:
    nodes = [Node(n["op"], tuple(n["inputs"]), tuple(n["outputs"]),
                  {k: _attr_from_data(v, weights) for k, v in n["attrs"].items()}, n["name"], n["domain"],
                  tuple(n["origin"])) for n in data["nodes"]]
    values = {v["name"]: _value_from_data(v) for v in data["values"]}
    return Graph(nodes, [_value_from_data(v) for v in data["inputs"]], [_value_from_data(v) for v in data["outputs"]],
                 values=values, initializers={name: weights[key] for name, key in data["initializers"].items()},
                 opsets=data["opsets"], name=data["name"])


def plan_to_data(plan: Plan) -> tuple[dict, dict[str, np.ndarray]]:
    weights = _WeightTable()
    data = {
        "graph": _graph_to_data(plan.graph, weights),
        "target": plan.target,
        "build_info": plan.build_info,
        "config": plan.config,
        "layers": plan.layers,
        "profiles": plan.profiles,
        "plugins": plan.plugins,
        "memory": plan.memory,
    }
    return data, weights.arrays


def plan_from_data(data: dict, weights: dict[str, np.ndarray]) -> Plan:
    return Plan(graph=_graph_from_data(data["graph"], weights), target=data["target"],
                build_info=data.get("build_info", {}), config=data.get("config", {}), layers=data.get("layers", {}),
                profiles=data.get("profiles", []), plugins=data.get("plugins", []), memory=data.get("memory", {}))
