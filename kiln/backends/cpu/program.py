"""The CPU program: a graph lowered to a flat list of steps that run torch kernels over named tensors,
releasing every intermediate after its last use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import BindingError, BuildError
from ...ir import Graph, last_uses
from .kernels import bind_kernel, wants_env


@dataclass
class Step:
    name: str
    op: str
    run: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()
    wants_env: bool = False
    returns_sequence: bool = False  # its one output is a sequence: a list result is that output, not several
    chain: str = ""  # the concatenation chain whose buffer it shares through the run's environment (concat.py)


def _returns_sequence(node, graph: Graph) -> bool:
    return len(node.outputs) == 1 and graph.value(node.outputs[0]).kind in ("sequence", "optional_sequence")


class CpuProgram:
    def __init__(self, graph: Graph, kernel_for: Callable | None = None, constants: dict | None = None):
        from ...tensors import numpy_to_torch

        self.graph = graph
        if constants is None:  # another program of the same graph may lend its own (they are never written)
            constants = {name: numpy_to_torch(array) for name, array in graph.initializers.items()}
        self.constants = constants
        kernel_for = kernel_for or (lambda node: bind_kernel(node, graph.opsets.get(node.domain, graph.opset)))
        self.steps = [Step(node.name, node.op_key, kernel_for(node), node.inputs, node.outputs,
                           wants_env=wants_env(node, graph.opsets.get(node.domain, graph.opset)),
                           returns_sequence=_returns_sequence(node, graph))
                      for node in graph.nodes]
        self._plan_releases()

    def _plan_releases(self) -> None:
        keep = set(self.graph.output_names()) | set(self.constants)
        last_use = last_uses(self.graph.nodes)
        by_step: dict[int, list[str]] = {}
        for name, index in last_use.items():
            if name not in keep:
                by_step.setdefault(index, []).append(name)
        for index, step in enumerate(self.steps):
            step.release = tuple(by_step.get(index, ()))

    def execute(self, feed: dict, on_step: Callable | None = None) -> dict:
        """Run every step; `feed` maps input names to torch tensors. Returns the graph outputs.

        `on_step(step, env)`, when given, is called after each step with the values in scope (read them,
        never change them): `kiln bench` times layers with it and `kiln compare --layerwise` reads intermediates."""
        env = self.environment(feed)
        for step in self.steps:
            self.run_step(step, env)
            if on_step is not None:
                on_step(step, env)
            for name in step.release:
                env.pop(name, None)
        return self.outputs(env)

    def environment(self, feed: dict) -> dict:
        """The values in scope before the first step: the constants and `feed`."""
        env = dict(self.constants)
        env.update(feed)
        return env

    def run_step(self, step: Step, env: dict) -> None:
        """Run `step` on its inputs in `env` and bind its outputs there."""
        args = [env[name] if name else None for name in step.inputs]
        try:
            result = step.run(*args, _env=env) if step.wants_env else step.run(*args)
        except BuildError:
            raise  # the kernel found the model unsupported, whatever the data (Gradient through a numpy kernel)
        except Exception as error:  # noqa: BLE001 (a layer failing on the user's data is reported as that layer)
            shapes = ", ".join(f"{n}: {tuple(a.shape)}" if hasattr(a, "shape") else f"{n}: -" for n, a in zip(step.inputs, args))
            raise BindingError(f"layer {step.name!r} ({step.op}) failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                               code="KILN-E407", where=f"{step.name} with inputs {shapes}",
                               hint="the inputs' values or shapes are inconsistent with the model; "
                                    "run `kiln compare` to check the model itself") from None
        several = isinstance(result, tuple) or (isinstance(result, list) and not step.returns_sequence)
        outputs = result if several else (result,)
        for name, value in zip(step.outputs, outputs):
            if name:
                env[name] = value

    def outputs(self, env: dict) -> dict:
        return {name: env[name] for name in self.graph.output_names()}
