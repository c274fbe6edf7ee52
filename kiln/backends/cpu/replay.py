"""Replaying a CPU program's native kernels: after one recorded run, each stretch of consecutive layers that only
launch native.cpp's kernels runs again as one C call (kiln_replay) over activation buffers placed once in an arena,
instead of a Python call per layer.

Why: a native layer's Python (its wrapper, its argument structure, the program's loop) costs 5-12 us, while the other
OpenMP thread spins waiting. SqueezeNet at batch 1 runs its 38 layers in about 2 ms; perf put 12% of its samples in
Python and 11% in libgomp (docs/benchmarks.md, run S).

What replays is decided from the recorded run, layer by layer:
- a layer replays when all its work was kernel launches (or it declared itself a view, as a concatenation whose
  inputs are already in its buffer does), every buffer it created was first written by one of its launches, and its
  outputs live in buffers that it or an earlier replayed layer created;
- those buffers are placed in one arena by lifetime (kiln/engine/memory.py's placement). The engine's inputs, its
  constants and the buffers of layers that run in Python keep their own memory; a replayed launch that reads one is
  patched with its address at each run, from an input of its layer;
- a buffer behind a graph output is never in the arena (the caller keeps it), so the layer that creates it runs in
  Python; the layers of one concatenation chain (concat.py) replay all or none, since they find their buffer in the
  run's environment.
A run with `on_step` (kiln bench's layer times, kiln compare's intermediates), a run on inputs of another shape, layout
or type than the recorded ones (up to MAX_RECORDINGS are kept), and a run that starts while another is replaying (the
arena is one) take the plain path; so does every run of an engine whose activations sum past RECORDING_LIMIT.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

from ...engine.memory import ALIGNMENT, Tensor, place
from . import native

MAX_RECORDINGS = 4
# The recorded run keeps every activation alive (each buffer must be told apart by its address), so an engine whose
# activations sum past this does not replay: ResNet-50 at batch 8 sums to 362 MB (its planned peak: 58 MB); at a batch
# that large, the Python per layer that a replay saves is a small share of the run anyway
RECORDING_LIMIT = 1 << 30
_CONSTANT, _FEED = -2, -1  # where a buffer comes from when no layer made it
_UNSEEN = object()


def install(program, activation_bytes: int = 0) -> None:
    """Make `program.execute` replay its native layers, where the native library runs here and the recorded run,
    which keeps every activation (`activation_bytes`, the memory plan's naive sum), stays under RECORDING_LIMIT."""
    if native.available()[0] and activation_bytes <= RECORDING_LIMIT:
        program.execute = Replayer(program, program.execute)


class Replayer:
    """`program.execute` with its native layers replayed (the module's docstring says when)."""

    def __init__(self, program, plain):
        self.program, self.plain = program, plain
        self._recordings: dict[tuple, _Replay | None] = {}
        self._lock = threading.Lock()

    def __call__(self, feed: dict, on_step=None) -> dict:
        if on_step is not None or not self._lock.acquire(blocking=False):
            return self.plain(feed, on_step=on_step)
        try:
            key = _signature(feed)
            replay = self._recordings.get(key, _UNSEEN) if key is not None else None
            if replay is _UNSEEN:
                if len(self._recordings) >= MAX_RECORDINGS:
                    return self.plain(feed)
                outputs, self._recordings[key] = record(self.program, feed)
                return outputs
            if replay is None:
                return self.plain(feed)
            return replay.run(feed)
        finally:
            self._lock.release()

    @property
    def recordings(self) -> list:
        """The replays recorded so far (None for a feed whose run has nothing to replay)."""
        return list(self._recordings.values())


def _signature(feed: dict) -> tuple | None:
    """What a recording depends on in a feed: the thread count and each input's shape, strides and type."""
    import torch

    items = []
    for name, tensor in feed.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return None
        items.append((name, tuple(tensor.shape), tensor.stride(), tensor.dtype))
    return torch.get_num_threads(), tuple(sorted(items, key=lambda item: item[0]))


def record(program, feed: dict) -> tuple[dict, "_Replay | None"]:
    """Run `program` on `feed` once, recording its kernel launches and keeping every value; returns its outputs and
    the replay planned from them (None where no layer can replay)."""
    recorder = native.Recorder()
    env = program.environment(feed)
    with native.recording(recorder):
        for index, step in enumerate(program.steps):
            recorder.step = index
            program.run_step(step, env)
    return program.outputs(env), _plan(program, feed, env, recorder)


@dataclass
class _Buffer:
    """A storage the recorded run touched: where it came from (a step index, _CONSTANT or _FEED), its size, the steps
    that read or wrote it, and whether a graph output lives in it."""
    base: int
    nbytes: int
    origin: int
    steps: set = field(default_factory=set)
    output: bool = False
    offset: int = -1  # in the arena


@dataclass
class _Layer:
    """What one step did in the recorded run."""
    replayable: bool
    launches: list
    inputs: dict  # input name -> base of its buffer
    pointers: dict  # input name -> its address in the recorded run
    outputs: list  # (name, tensor)


class _Buffers(dict):
    """base -> _Buffer for every storage the recorded run touched."""

    def see(self, tensor, step: int) -> _Buffer:
        storage = tensor.untyped_storage()
        buffer = self.get(storage.data_ptr())
        if buffer is None:
            buffer = self[storage.data_ptr()] = _Buffer(storage.data_ptr(), storage.nbytes(), step)
        if step >= 0:
            buffer.steps.add(step)
        return buffer


def _plan(program, feed: dict, env: dict, recorder: native.Recorder) -> "_Replay | None":
    import torch

    steps = program.steps
    if any(step.wants_env and not getattr(step, "chain", "") for step in steps):
        return None  # a layer that reads the environment beyond its inputs would escape the buffers' lifetimes
    buffers = _Buffers()
    for value in program.constants.values():
        if isinstance(value, torch.Tensor):
            buffers.see(value, _CONSTANT)
    for value in feed.values():
        buffers.see(value, _FEED)
    layers = [_layer(index, step, env, recorder, buffers) for index, step in enumerate(steps)]
    for name in program.graph.output_names():
        if isinstance(env.get(name), torch.Tensor):
            buffers.see(env[name], len(steps)).output = True
    chains: dict[str, list[int]] = {}
    for index, step in enumerate(steps):
        if getattr(step, "chain", ""):
            chains.setdefault(step.chain, []).append(index)
    replayable = _settle(layers, buffers, list(chains.values()))
    if not replayable:
        return None
    return _Replay(program, layers, buffers, replayable)


def _layer(index: int, step, env: dict, recorder: native.Recorder, buffers: _Buffers) -> _Layer:
    """Step `index` as recorded; replayable here means by what it did alone (_settle weighs the others)."""
    import torch

    launches = recorder.launches.get(index, [])
    inputs, pointers, outputs = {}, {}, []
    replayable = bool(launches) or index in recorder.views
    for name in step.inputs:
        value = env.get(name) if name else None
        if isinstance(value, torch.Tensor):
            inputs[name] = buffers.see(value, index).base
            pointers[name] = value.data_ptr()
        elif value is not None:
            replayable = False
    written = set()
    for launch in launches:
        for field_name, tensor in launch.tensors.items():
            if tensor is None:
                continue
            assert getattr(launch.args, field_name) == tensor.data_ptr(), f"{step.name}: {field_name} is not its tensor"
            buffer = buffers.see(tensor, index)
            if field_name == "y":
                written.add(buffer.base)
            elif buffer.origin == index and buffer.base not in written:
                replayable = False  # read before any launch wrote it: made by torch inside the layer
        if len(launch.params) not in (1, 2, 3, 5):  # the parameter counts kiln_replay calls with
            replayable = False
    for name in step.outputs:
        value = env.get(name) if name else None
        if not isinstance(value, torch.Tensor) or value.untyped_storage().nbytes() == 0:
            replayable = False
            continue
        buffer = buffers.see(value, index)
        outputs.append((name, value))
        if buffer.origin == index and buffer.base not in written:
            replayable = False  # a new buffer that no launch wrote: torch made it
    return _Layer(replayable, launches, inputs, pointers, outputs)


def _kind(buffer: _Buffer, replayable: set[int]) -> str:
    """"fixed" (a constant), "arena" (made by a replayed layer) or "dynamic" (anything else: new at every run)."""
    if buffer.origin == _CONSTANT:
        return "fixed"
    if buffer.origin == _FEED or buffer.output or buffer.origin not in replayable:
        return "dynamic"
    return "arena"


def _settle(layers: list[_Layer], buffers: _Buffers, chains: list[list[int]]) -> set[int]:
    """The steps that replay: those replayable alone, less any whose outputs would not be in the arena or that reads
    a dynamic buffer none of its inputs holds, less whole chains with a member that runs in Python; to a fixed
    point, since each step dropped makes its buffers dynamic."""
    replayable = {index for index, layer in enumerate(layers) if layer.replayable}
    changed = True
    while changed:
        changed = False
        for members in chains:
            if not set(members) <= replayable and set(members) & replayable:
                replayable -= set(members)
                changed = True
        for index in sorted(replayable):
            layer = layers[index]
            held = set(layer.inputs.values())
            outputs_in_arena = all(_kind(buffers[_base(value)], replayable) == "arena" for _, value in layer.outputs)
            reachable = all(_kind(buffers[_base(tensor)], replayable) != "dynamic" or _base(tensor) in held
                            for launch in layer.launches for tensor in launch.tensors.values() if tensor is not None)
            if not (outputs_in_arena and reachable):
                replayable.discard(index)
                changed = True
    return replayable


def _base(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _Segment:
    """Consecutive replayed steps: their launches as one kiln_replay call, the patches that point them at this run's
    dynamic buffers, the values later Python steps read (views into the arena), and what the steps release."""

    def __init__(self, library, calls: list, patches: list, sources: list[str], exports: list, releases: list[str], keep):
        self.library = library
        self.calls = (native.ReplayCall * len(calls))(*calls)
        self.patches = (native.ReplayPatch * max(1, len(patches)))(*patches)
        self.patch_count = len(patches)
        self.sources = (ctypes.c_int64 * max(1, len(sources)))()
        self.source_names = sources
        self.exports, self.releases = exports, releases
        self.keep = keep  # the argument structures the calls point into

    def run(self, env: dict) -> None:
        for slot, name in enumerate(self.source_names):
            self.sources[slot] = env[name].data_ptr()
        self.library.kiln_replay(self.calls, len(self.calls), self.patches, self.patch_count, self.sources)
        for name in self.releases:
            env.pop(name, None)
        env.update(self.exports)


class _Replay:
    """A recorded run made replayable: the program's steps with each stretch of replayed ones as one _Segment."""

    def __init__(self, program, layers: list[_Layer], buffers: _Buffers, replayable: set[int]):
        import torch

        self.program = program
        arena = [b for b in buffers.values() if _kind(b, replayable) == "arena"]
        planned = [Tensor(str(b.base), b.nbytes, min(b.steps), max(b.steps)) for b in arena]
        size = place(planned)
        for buffer, tensor in zip(arena, planned):
            buffer.offset = tensor.offset
        self.arena = torch.empty(size + ALIGNMENT, dtype=torch.uint8)
        start = -self.arena.data_ptr() % ALIGNMENT  # the arena's first aligned byte
        self.arena_bytes = size
        read_in_python = {name for index, step in enumerate(program.steps) if index not in replayable
                          for name in step.inputs if name}

        def address(tensor) -> int:
            buffer = buffers[_base(tensor)]
            return self.arena.data_ptr() + start + buffer.offset + (tensor.data_ptr() - buffer.base)

        def view(tensor):
            offset = (address(tensor) - self.arena.data_ptr()) // tensor.element_size()
            return torch.empty(0, dtype=tensor.dtype).set_(self.arena.untyped_storage(), offset, tensor.size(), tensor.stride())

        self.items: list = []
        library = native._load()[0]
        pending: list[int] = []
        for index in range(len(program.steps) + 1):
            if index < len(program.steps) and index in replayable:
                pending.append(index)
                continue
            if pending:
                self.items.append(self._segment(library, pending, layers, buffers, replayable, address, view, read_in_python))
                pending = []
            if index < len(program.steps):
                self.items.append(program.steps[index])
        self.replayed_steps = len(replayable)

    def _segment(self, library, indices, layers, buffers, replayable, address, view, read_in_python) -> _Segment:
        calls, patches, sources, keep = [], [], [], []
        for index in indices:
            layer = layers[index]
            for launch in layer.launches:
                args = launch.args
                for field_name, tensor in launch.tensors.items():
                    if tensor is None:
                        continue
                    buffer = buffers[_base(tensor)]
                    kind = _kind(buffer, replayable)
                    if kind == "arena":
                        setattr(args, field_name, address(tensor))
                    elif kind == "dynamic":  # patched at each run from the input of this layer that holds it
                        name = next(n for n, base in layer.inputs.items() if base == buffer.base)
                        if name not in sources:
                            sources.append(name)
                        delta = tensor.data_ptr() - layer.pointers[name]
                        patches.append(native.ReplayPatch(len(calls), getattr(type(args), field_name).offset,
                                                          sources.index(name), delta))
                params = (ctypes.c_int64 * 5)(*launch.params)
                calls.append(native.ReplayCall(ctypes.cast(launch.function, ctypes.c_void_p).value, ctypes.addressof(args),
                                               params, len(launch.params)))
                keep.append(args)
        exports = [(name, view(value)) for index in indices for name, value in layers[index].outputs
                   if name in read_in_python]
        releases = [name for index in indices for name in self.program.steps[index].release]
        return _Segment(library, calls, patches, sources, exports, releases, keep)

    def run(self, feed: dict) -> dict:
        program = self.program
        env = program.environment(feed)
        for item in self.items:
            if isinstance(item, _Segment):
                item.run(env)
                continue
            program.run_step(item, env)
            for name in item.release:
                env.pop(name, None)
        return program.outputs(env)

