"""The CUDA program: the chosen tactic of every layer as a flat list of steps over CUDA tensors, run
eagerly or replayed as one CUDA graph per distinct set of input shapes.

With graphs on, the first run at a new shape captures the whole engine; later runs copy the inputs
into the captured input buffers and replay. The graph's memory pool holds every activation, so a
replay allocates nothing: the buffers are preallocated at capture. At most GRAPH_CACHE_SIZE graphs
are kept (least recently used goes first), since each holds its own activation memory.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ... import log
from ...errors import BindingError, BuildError

GRAPH_CACHE_SIZE = 8


@dataclass
class Step:
    name: str
    op: str
    run: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()
    host_constants: dict = field(default_factory=dict)  # small integer constants read as shapes, kept on the host
    shape_positions: frozenset = frozenset()  # input positions read on the host (shapes, axes)
    wants_env: bool = False  # control flow (If, Loop, Scan, SequenceMap): its bodies read the values in scope


@dataclass
class _Captured:
    graph: object
    inputs: dict
    outputs: dict


class CudaProgram:
    def __init__(self, steps: list[Step], constants: dict, input_casts: dict, output_casts: dict,
                 output_names: list[str], use_cuda_graph: bool):
        self.steps = steps
        self.constants = constants  # name -> CUDA tensor (weights in the engine's precision)
        self.input_casts = input_casts  # input name -> torch dtype the engine computes it in
        self.output_casts = output_casts  # output name -> torch dtype the model declares
        self.output_names = output_names
        self.use_cuda_graph = use_cuda_graph
        self.graphs: OrderedDict = OrderedDict()
        self.graph_error: str | None = None  # why capture failed (the program then runs eagerly)
        self.layer_info: dict = {}

    # -- eager ---------------------------------------------------------------------------------
    def _device_feed(self, feed: dict) -> dict:
        import torch

        device_feed = {}
        for name, value in feed.items():
            if isinstance(value, torch.Tensor):
                if not value.is_cuda:
                    value = value.to("cuda", non_blocking=value.is_pinned())
                dtype = self.input_casts.get(name)
                if dtype is not None and value.dtype != dtype:
                    value = value.to(dtype)
            device_feed[name] = value
        return device_feed

    def run_steps(self, env: dict, on_step: Callable | None = None) -> dict:
        for step in self.steps:
            args = [None if not name else step.host_constants.get(name, env[name]) for name in step.inputs]
            try:
                args = _same_device(args, step.shape_positions)
                result = step.run(*args, _env=env) if step.wants_env else step.run(*args)
            except Exception as error:  # noqa: BLE001 (a layer failing on the user's data is reported as that layer)
                import torch

                if isinstance(error, (torch.cuda.OutOfMemoryError, BuildError)):
                    raise  # out of memory; or the model is unsupported whatever the data (Gradient through a numpy kernel)
                raise BindingError(f"layer {step.name!r} ({step.op}) failed on the GPU: {type(error).__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''}", code="KILN-E407", where=step.name,
                                   hint="the inputs' values or shapes are inconsistent with the model; "
                                        "run `kiln compare` to check the model itself") from None
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(step.outputs, outputs):
                if name:
                    env[name] = value
            if on_step is not None:
                on_step(step, env)
            for name in step.release:
                env.pop(name, None)
        results = {}
        for name in self.output_names:
            value = env[name]
            dtype = self.output_casts.get(name)
            results[name] = value.to(dtype) if dtype is not None and hasattr(value, "dtype") and value.dtype != dtype else value
        return results

    # -- running -------------------------------------------------------------------------------
    def execute(self, feed: dict, on_step: Callable | None = None) -> dict:
        """Run the engine on `feed` (torch tensors on the host or the GPU). Outputs are CUDA tensors when
        every input was one, else host tensors. `on_step`, when given, sees every step (eager run)."""
        import torch

        on_host = any(isinstance(v, torch.Tensor) and not v.is_cuda for v in feed.values())
        capturing = torch.cuda.is_current_stream_capturing()
        if on_step is not None or capturing or not self.use_cuda_graph or self.graph_error is not None:
            env = dict(self.constants)
            env.update(self._device_feed(feed))
            results = self.run_steps(env, on_step)
            if capturing:
                return results
        else:
            results = self._replay(feed)
        if on_host:
            return {name: v.cpu() if isinstance(v, torch.Tensor) else v for name, v in results.items()}
        return results

    def _replay(self, feed: dict) -> dict:
        """One replay of the graph captured for the feed's shapes. Each input is copied into the graph's own input
        buffer by one copy_, which also moves it to the GPU and casts it to the engine's dtype where needed."""
        key = tuple((name, tuple(t.shape), str(self.input_casts.get(name, t.dtype))) for name, t in sorted(feed.items())
                    if hasattr(t, "shape"))
        captured = self.graphs.get(key)
        if captured is None:
            device_feed = self._device_feed(feed)
            captured = self._capture(device_feed)
            if captured is None:  # capture failed: run eagerly from now on
                env = dict(self.constants)
                env.update(device_feed)
                return self.run_steps(env)
            self.graphs[key] = captured
            while len(self.graphs) > GRAPH_CACHE_SIZE:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for name, tensor in feed.items():
            if hasattr(tensor, "copy_"):  # from pageable host memory the copy blocks, as a host tensor may change after
                captured.inputs[name].copy_(tensor, non_blocking=tensor.is_cuda or tensor.is_pinned())
        captured.graph.replay()
        return {name: value.clone() if hasattr(value, "clone") else value for name, value in captured.outputs.items()}

    def _capture(self, device_feed: dict) -> _Captured | None:
        import torch

        static_inputs = {name: t.clone() if hasattr(t, "clone") else t for name, t in device_feed.items()}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation (cuDNN/cuBLAS handles, Triton compiles) stays out of the graph
                    env = dict(self.constants)
                    env.update(static_inputs)
                    self.run_steps(env)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                env = dict(self.constants)
                env.update(static_inputs)
                outputs = self.run_steps(env)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 (a step that syncs with the host cannot be captured; run eagerly)
            self.graph_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.verbose("CUDA graph capture failed, running eagerly: %s", self.graph_error)
            torch.cuda.synchronize()
            return None
        return _Captured(graph, static_inputs, outputs)


def _same_device(args: list, host_positions: frozenset) -> list:
    """Host tensors meeting GPU tensors in one step go to the GPU, except at positions read as shapes."""
    import torch

    if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        return args
    return [a.cuda() if isinstance(a, torch.Tensor) and not a.is_cuda and i not in host_positions and a.dim() > 0 else a
            for i, a in enumerate(args)]
