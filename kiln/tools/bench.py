"""Timing an engine the way trtexec does: warm-up, then timed iterations for at least a count and a duration,
latency percentiles, the host-to-device / compute / device-to-host split, and a per-layer profile."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BuildError, KilnError
from ..progress import Progress
from .memory import MemoryMonitor


def open_engine(path: str, config=None, monitor: MemoryMonitor | None = None):
    """An Engine from a .kiln file, or built from an .onnx model with `config` (timed in `monitor` when given)."""
    from ..builder import build
    from ..engine.fileformat import MAGIC
    from ..engine.runtime import load

    source = Path(path)
    if source.is_file():
        with open(source, "rb") as f:
            is_engine = f.read(len(MAGIC)) == MAGIC
    else:
        is_engine = source.suffix == ".kiln"
    if is_engine:
        return load(path)
    if monitor is not None:
        monitor.mark("build")
    return build(path, config)


def sample_feed(engine, seed: int = 0, shapes: dict[str, tuple] | None = None, given: dict | None = None) -> dict:
    """Fixed-seed random inputs for every binding not `given`: dynamic inputs take the `shapes` asked for, else,
    as in trtexec, the opt shapes of the engine's first optimization profile."""
    from ..errors import BindingError
    from .inputs import random_feed

    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {b.name for b in engine.inputs})
    if unknown:  # a misspelt --shapes name would otherwise leave its input at the default shape, silently
        raise BindingError(f"--shapes names {', '.join(map(repr, unknown))}, which the engine has no input called; its "
                           f"inputs are: {', '.join(str(b) for b in engine.inputs)}", code="KILN-E402",
                           where=", ".join(unknown), hint="use the input names that `kiln inspect` shows")
    profiles = getattr(engine.plan, "profiles", None) or []
    if profiles:
        from ..engine.profiles import as_profile

        first = as_profile(profiles[0])
        for name in first.shapes:
            shapes.setdefault(name, first.shape(name, "opt"))
    feed = random_feed(engine.inputs, seed=seed, shapes=shapes)
    feed.update(given or {})
    return feed


def interleaved_medians(runners: dict[str, Callable], runs: int, warmup: int = 3, settle_s: float = 0.05) -> dict:
    """Median ms of each runner, timed in turns (one timed call of each per round), so that a change in the
    machine's load during the measurement falls on every runner alike and their ratios stay fair. Each timed call
    follows a pause and an untimed call of the same runner: onnxruntime's and OpenMP's worker threads spin for a
    while after a call, and that tail must not land on the next runner's timing."""
    import statistics

    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            time.sleep(settle_s)
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


@dataclass
class LayerTime:
    name: str
    op: str
    origin: list[str]
    times_ms: list[float] = field(default_factory=list)

    def record(self) -> dict:
        times = np.asarray(self.times_ms)
        return {"name": self.name, "op": self.op, "origin": self.origin, "count": len(times),
                "timeMs": float(times.sum()), "averageMs": float(times.mean()), "medianMs": float(np.median(times))}


@dataclass
class BenchResult:
    device: str
    settings: dict[str, Any]
    latency_ms: list[float]  # per iteration: host-to-device + compute + device-to-host
    h2d_ms: list[float]
    compute_ms: list[float]
    d2h_ms: list[float]
    starts_ms: list[float]
    wall_seconds: float
    layers: list[dict] = field(default_factory=list)  # per-layer records, in execution order
    profile_iterations: int = 0
    profile_compute_ms: list[float] = field(default_factory=list)  # compute time of the profiled iterations
    memory: dict = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return len(self.latency_ms)

    @property
    def throughput(self) -> float:
        """Inferences per second over the timed phase."""
        return self.iterations / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    def stats(self, which: str = "latency") -> dict[str, float]:
        values = np.asarray({"latency": self.latency_ms, "h2d": self.h2d_ms, "compute": self.compute_ms,
                             "d2h": self.d2h_ms}[which], dtype=np.float64)
        return {"min": float(values.min()), "mean": float(values.mean()), "median": float(np.median(values)),
                "p90": float(np.percentile(values, 90)), "p95": float(np.percentile(values, 95)),
                "p99": float(np.percentile(values, 99)), "max": float(values.max())}

    def layer_sum_ms(self) -> float:
        """Sum of the per-layer mean times: one inference as the profile sees it."""
        return float(sum(layer["averageMs"] for layer in self.layers))

    def to_json(self) -> dict:
        return {"device": self.device, "settings": self.settings, "iterations": self.iterations,
                "wall_seconds": self.wall_seconds, "throughput_qps": self.throughput,
                "latency_ms": self.stats("latency"), "h2d_ms": self.stats("h2d"), "compute_ms": self.stats("compute"),
                "d2h_ms": self.stats("d2h"), "profile": self.layers, "profile_iterations": self.profile_iterations,
                "memory": self.memory}


class _Runner:
    """One inference at a time, split into host-to-device, compute and device-to-host, each timed."""

    def __init__(self, engine, feed: dict, no_data_transfers: bool, use_cuda_graph: bool):
        from ..engine.bindings import check_feed

        self.engine, self.feed = engine, feed
        self.device = engine.device
        self.cuda = self.device == "cuda"
        self.no_data_transfers = no_data_transfers
        self.host_tensors, _ = check_feed(feed, engine.inputs)
        self.program = engine.select(self.host_tensors)  # the program of the profile these shapes run with
        self.device_feed = self._to_device()
        self.graph = None
        if use_cuda_graph and not self.cuda:
            raise BuildError("--useCudaGraph needs an engine built for the GPU; this engine runs on the CPU",
                             code="KILN-E203", hint="drop --useCudaGraph, or build with --device cuda")
        # kiln's CUDA programs replay their own whole-engine graph unless built with --noCudaGraph;
        # --useCudaGraph turns that on, and programs without one are captured here.
        owns_graphs = hasattr(self.program, "use_cuda_graph")
        self._engine_graph_setting = getattr(self.program, "use_cuda_graph", None)
        if use_cuda_graph and owns_graphs:
            self.program.use_cuda_graph = True
        elif use_cuda_graph:
            self._capture()
        self.cuda_graph = ("the engine's own" if owns_graphs and self.program.use_cuda_graph else
                           "captured by bench" if self.graph is not None else "off") if self.cuda else "n/a"

    def close(self) -> None:
        """Leave the engine as it was built (its own CUDA graph setting)."""
        if self._engine_graph_setting is not None:
            self.program.use_cuda_graph = self._engine_graph_setting

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _to_device(self) -> dict:
        if not self.cuda:
            return self.host_tensors
        return {name: t.to("cuda", non_blocking=True) for name, t in self.host_tensors.items()}

    def _capture(self) -> None:
        import torch

        # Warm up on a side stream first, as torch.cuda.graph requires, so lazy initialisation is not captured.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.program.execute(self.device_feed)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.graph_outputs = self.program.execute(self.device_feed)

    def _compute(self, on_step: Callable | None = None) -> dict:
        if self.graph is not None and on_step is None:
            self.graph.replay()
            return self.graph_outputs
        return self.program.execute(self.device_feed, on_step=on_step)

    def once(self, on_step: Callable | None = None, on_start: Callable | None = None) -> tuple[float, float, float, dict]:
        """(h2d ms, compute ms, d2h ms, outputs) for one inference; `on_start` is called just before compute."""
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            if not self.no_data_transfers:
                if self.cuda:
                    if self.graph is not None:  # a captured graph reads fixed buffers: refill them
                        for name, tensor in self.host_tensors.items():
                            self.device_feed[name].copy_(tensor, non_blocking=True)
                    else:
                        self.device_feed = self._to_device()
                    self._sync()
                else:
                    from ..engine.bindings import check_feed

                    self.host_tensors, _ = check_feed(self.feed, self.engine.inputs)
                    self.device_feed = self.host_tensors
            if on_start is not None:
                on_start()
            copied_in = time.perf_counter()
            outputs = self._compute(on_step)
            self._sync()
            computed = time.perf_counter()
            if not self.no_data_transfers:
                outputs = {name: _to_numpy(value) for name, value in outputs.items()
                           if value is not None and not isinstance(value, list)}  # sequences stay on the host as they are
            copied_out = time.perf_counter()
        return ((copied_in - start) * 1e3, (computed - copied_in) * 1e3, (copied_out - computed) * 1e3, outputs)


def _layer_timer(runner: _Runner, layers: dict[str, LayerTime]) -> tuple[Callable, Callable]:
    """An on_step callback that charges the time since the previous step to each step, and its reset."""
    clock = {"last": 0.0}

    def start() -> None:
        runner._sync()
        clock["last"] = time.perf_counter()

    def on_step(step, env=None) -> None:
        runner._sync()  # on a GPU, kernels are asynchronous: wait so each layer is charged its own time
        now = time.perf_counter()
        layers[step.name].times_ms.append((now - clock["last"]) * 1e3)
        clock["last"] = now

    return start, on_step


def benchmark(engine, feed: dict, *, warmup_ms: float = 200.0, iterations: int = 10, duration_s: float = 3.0,
              use_cuda_graph: bool = False, no_data_transfers: bool = False, profile: bool = False,
              separate_profile_run: bool = False, progress: bool | None = None,
              monitor: MemoryMonitor | None = None) -> BenchResult:
    """Time `engine` on `feed`: trtexec's semantics for warm-up (ms), iterations and duration (s)."""
    if iterations < 1 or duration_s < 0 or warmup_ms < 0:
        raise KilnError(f"--iterations must be at least 1 and --warmUp/--duration not negative (got {iterations}, "
                        f"{warmup_ms} ms, {duration_s} s)", code="KILN-E203", hint="e.g. --warmUp 200 --iterations 10 --duration 3")
    monitor = monitor or MemoryMonitor(device=engine.device)
    own_monitor = monitor._thread is None
    if own_monitor:
        monitor.__enter__()
    runner = None
    try:
        runner = _Runner(engine, feed, no_data_transfers, use_cuda_graph)
        steps = list(getattr(runner.program, "steps", []))
        layers = {s.name: LayerTime(s.name, s.op, list(_origin(engine, s.name))) for s in steps}
        start_layer, on_step = _layer_timer(runner, layers)
        profile_inline = profile and not separate_profile_run and steps
        if profile and not steps:
            raise KilnError(f"this {engine.device} program has no per-layer steps to profile", code="KILN-E203",
                            hint="drop --dumpProfile/--exportProfile")

        monitor.mark("warm-up")
        warm_start = time.perf_counter()
        while True:
            runner.once()
            if (time.perf_counter() - warm_start) * 1e3 >= warmup_ms:
                break

        monitor.mark("timed runs")
        h2d, compute, d2h, starts = [], [], [], []
        outputs: dict = {}
        begin = time.perf_counter()
        with Progress("kiln bench", total=100, enabled=progress) as bar:
            while True:
                began = time.perf_counter()
                a, b, c, outputs = runner.once(*((on_step, start_layer) if profile_inline else ()))
                h2d.append(a), compute.append(b), d2h.append(c), starts.append((began - begin) * 1e3)
                elapsed = time.perf_counter() - begin
                done = min(len(compute) / iterations, elapsed / duration_s if duration_s > 0 else 1.0)
                bar.advance(f"{len(compute)} runs", steps=int(done * 100) - bar.done)
                if len(compute) >= iterations and elapsed >= duration_s:
                    break
        wall = time.perf_counter() - begin

        profile_compute: list[float] = list(compute) if profile_inline else []
        if profile and separate_profile_run:
            # A separate run keeps the per-layer synchronisation out of the latency figures above.
            monitor.mark("profile run")
            for _ in range(iterations):
                profile_compute.append(runner.once(on_step, start_layer)[1])
    finally:
        if runner is not None:
            runner.close()
        if own_monitor:
            monitor.__exit__(None, None, None)

    latency = [a + b + c for a, b, c in zip(h2d, compute, d2h)]
    result = BenchResult(engine.device, {"warmUp_ms": warmup_ms, "iterations": iterations, "duration_s": duration_s,
                                         "useCudaGraph": use_cuda_graph, "noDataTransfers": no_data_transfers,
                                         "separateProfileRun": separate_profile_run,
                                         # profiling inside the timed runs runs them step by step, never as a graph
                                         "cudaGraph": "off while profiling (use --separateProfileRun)"
                                         if profile_inline and runner.cuda else runner.cuda_graph},
                         latency, h2d, compute, d2h, starts, wall, memory=monitor.summary(),
                         outputs={name: value if isinstance(value, np.ndarray) else _to_numpy(value)
                                  for name, value in outputs.items() if value is not None and not isinstance(value, list)})
    if profile:
        records = [layer.record() for layer in layers.values() if layer.times_ms]
        total = sum(r["averageMs"] for r in records) or 1.0
        for r in records:
            r["percentage"] = 100.0 * r["averageMs"] / total
        result.layers = records
        result.profile_iterations = len(profile_compute)
        result.profile_compute_ms = profile_compute
    return result


def _origin(engine, layer: str) -> list[str]:
    return engine.plan.layers.get(layer, {}).get("origin", [])


def _to_numpy(value) -> np.ndarray:
    from ..tensors import tensor_to_numpy

    return np.array(tensor_to_numpy(value), copy=True)


# -- reporting ---------------------------------------------------------------------------------------

def format_result(result: BenchResult) -> str:
    lat = result.stats("latency")
    lines = [f"{result.iterations} iterations in {result.wall_seconds:.2f} s on {result.device}"
             f" (warm-up {result.settings['warmUp_ms']:g} ms)",
             f"throughput: {result.throughput:.2f} qps",
             "latency (ms): " + "  ".join(f"{k} {v:.3f}" for k, v in lat.items())]
    if result.device == "cuda":
        lines.append("  split (mean ms): " + "  ".join(f"{label} {result.stats(key)['mean']:.3f}" for label, key in
                                                       (("host-to-device", "h2d"), ("compute", "compute"), ("device-to-host", "d2h"))))
        lines.append(f"  CUDA graph: {result.settings.get('cudaGraph', '?')}")
        if result.settings["noDataTransfers"]:
            lines.append("  (--noDataTransfers: inputs stay on the device and outputs are not copied back)")
    memory = result.memory
    if memory:
        from .memory import format_bytes

        line = f"memory: peak host {format_bytes(memory.get('peak_host_bytes'))}"
        if memory.get("peak_device_bytes") is not None:
            line += f", peak device {format_bytes(memory['peak_device_bytes'])}"
        lines.append(line)
    return "\n".join(lines)


def format_profile(result: BenchResult) -> str:
    rows = result.layers
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"per-layer profile ({result.profile_iterations} iterations"
             f"{', separate run' if result.settings['separateProfileRun'] else ''}):",
             f"  {'layer':<{width}}  {'op':<20} {'mean ms':>9} {'median ms':>9} {'%':>6}"]
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {r['op']:<20} {r['averageMs']:9.4f} {r['medianMs']:9.4f} {r['percentage']:6.1f}")
    total = result.layer_sum_ms()
    measured = float(np.mean(result.profile_compute_ms)) if result.profile_compute_ms else float("nan")
    lines.append(f"  sum of layers {total:.3f} ms; measured compute of the profiled runs {measured:.3f} ms "
                 f"({100.0 * total / measured:.1f}%)")
    if result.settings["separateProfileRun"]:
        # The profile runs step by step (a synchronisation per layer on a GPU, never a CUDA graph), so it can be
        # far from the timed runs: an 80-layer chain of 1x4 Gemms profiled at 4.1 ms on an H200, graph-replayed in 0.32.
        # On the CPU the timed runs replay the native and oneDNN layers in C (kiln/backends/cpu/replay.py), while the
        # profile calls each layer from Python
        timed = float(np.mean(result.compute_ms))
        how = f"CUDA graph {result.settings.get('cudaGraph', 'n/a')}" if result.device == "cuda" else \
            "kernel layers replayed in C"
        lines.append(f"  timed runs (not profiled, {how}): mean compute {timed:.3f} ms; the profile is {total / timed:.2f}x that")
    return "\n".join(lines)


def export_times(result: BenchResult, path: str) -> None:
    records = [{"startMs": s, "latencyMs": lat, "h2dMs": a, "computeMs": b, "d2hMs": c}
               for s, lat, a, b, c in zip(result.starts_ms, result.latency_ms, result.h2d_ms, result.compute_ms, result.d2h_ms)]
    _write_json(path, records)


def export_profile(result: BenchResult, path: str) -> None:
    _write_json(path, [{"count": result.profile_iterations}] + result.layers)


def export_output(result: BenchResult, path: str) -> None:
    records = [{"name": name, "dtype": str(value.dtype), "dimensions": "x".join(str(d) for d in value.shape),
                "values": np.asarray(value, dtype=np.float64 if value.dtype.kind == "f" or value.dtype.name == "bfloat16"
                                     else value.dtype).ravel().tolist()}
               for name, value in result.outputs.items()]
    _write_json(path, records)


def _write_json(path: str, data) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError as error:
        raise KilnError(f"cannot write {path!r}: {error.strerror}", code="KILN-E203",
                        hint="give a path in a writable directory") from None
