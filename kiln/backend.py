"""kiln as an ONNX backend (onnx.backend.base.Backend), so ONNX's own backend tests can run against kiln's engine.

    import kiln.backend
    outputs = kiln.backend.run_model(model, [x])            # build, run once
    rep = kiln.backend.prepare(model, "CPU"); rep.run([x])   # build once, run many times

Inputs are given positionally in the order of the graph's inputs that are not initializers, as ONNX's
runner does; outputs come back in the graph's output order.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict


class KilnRep(BackendRep):
    """A built kiln engine that takes inputs positionally (or by name) and returns outputs in graph order."""

    def __init__(self, engine, input_names: list[str], output_names: list[str]):
        self.engine = engine
        self.input_names = input_names
        self.output_names = output_names

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            feed = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            # ONNX's runner may pass fewer inputs than the graph declares (trailing optional inputs left out).
            feed = dict(zip(self.input_names, inputs))
        results = self.engine.run(feed)
        return namedtupledict("Outputs", self.output_names)(*[results[name] for name in self.output_names])


class KilnBackend(Backend):
    """Builds ONNX models with kiln's CPU engine (CUDA where kiln is built with a CUDA target)."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        parsed = Device(device)
        if parsed.type == DeviceType.CPU:
            return True
        if parsed.type == DeviceType.CUDA:
            try:
                import torch

                return torch.cuda.is_available()
            except ImportError:
                return False
        return False

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        from .builder import BuilderConfig, build

        target = "cuda" if Device(device).type == DeviceType.CUDA else "cpu"
        # ONNX's backend API gives the inputs only after prepare: dynamic inputs are built to take any size
        engine = build(model, BuilderConfig(device=target, **{"unbounded_shapes": True, **kwargs}))
        weights = {t.name for t in model.graph.initializer}
        input_names = [i.name for i in model.graph.input if i.name not in weights]
        return KilnRep(engine, input_names, [o.name for o in model.graph.output])

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU", outputs_info: Sequence | None = None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node: wrap it in a model whose inputs take the given arrays' types and shapes."""
        from onnx import helper

        arrays = [np.asarray(x) for x in inputs]
        names = [name for name in node.input if name][: len(arrays)]
        graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for n, a in zip(names, arrays)]
        graph_outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        graph = helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain or "", opset)])
        return cls.run_model(model, dict(zip(names, arrays)), device, **kwargs)


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
run_node = KilnBackend.run_node
supports_device = KilnBackend.supports_device
is_compatible = KilnBackend.is_compatible
