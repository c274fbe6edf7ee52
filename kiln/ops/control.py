"""Control flow: If, Loop and Scan, whose bodies are subgraphs that may read values of the enclosing graph.

A body runs as its own CPU program (lowered once per subgraph and cached), fed with the values in scope
at the call (`_env`, which holds the outer graph's values) plus its own inputs.
"""
from __future__ import annotations

import weakref

from ..ir import Graph
from .registry import register

# subgraph -> {device: its program, "outer": the names it reads from enclosing scopes}; a body's weights
# live on the device its inputs come from.
_PROGRAMS: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def _device_of(values) -> str:
    for value in values:
        for item in (value if isinstance(value, list) else [value]):
            if getattr(item, "is_cuda", False):
                return str(item.device)
    return "cpu"


def run_subgraph(graph: Graph, inputs: list, env: dict) -> list:
    """Run `graph` on `inputs` (bound to its inputs in order) with `env` as the enclosing scope."""
    from ..backends.cpu.program import CpuProgram

    programs = _PROGRAMS.get(graph)
    if programs is None:
        programs = _PROGRAMS[graph] = {"outer": sorted(graph.outer_references())}
    device = _device_of(list(inputs) + [env[name] for name in programs["outer"] if name in env])
    program = programs.get(device)
    if program is None:
        program = programs[device] = CpuProgram(graph)
        if device != "cpu":
            program.constants = {name: tensor.to(device) for name, tensor in program.constants.items()}
    feed = dict(env)
    feed.update(zip(graph.input_names(), inputs))
    results = program.execute(feed)
    return [results[name] for name in graph.output_names()]


def _scalar(value, dtype_name: str):
    import torch

    return torch.tensor(value, dtype=getattr(torch, dtype_name))


def _stack(items: list, axis: int, graph: Graph, output_index: int):
    """Stack per-iteration values along `axis`; with no iteration, an empty tensor of the body's output type."""
    import torch

    if items:
        return torch.stack(items, dim=axis if axis >= 0 else axis + items[0].dim() + 1)
    from ..ir.dtypes import to_torch

    value = graph.value(graph.output_names()[output_index])
    dims = [d if isinstance(d, int) else 0 for d in (value.shape or ())]
    return torch.zeros([0, *dims], dtype=to_torch(value.dtype) if value.dtype else torch.float32)


@register("If", since=1)
def if_(cond, *, then_branch: Graph, else_branch: Graph, _env):
    branch = then_branch if bool(cond.reshape(-1)[0]) else else_branch
    return tuple(run_subgraph(branch, [], _env))


@register("Loop", since=1)
def loop(trip_count, cond, *initial, body: Graph, _env):
    """Run `body` while cond holds and fewer than trip_count iterations ran; carried values may change shape."""
    carried = list(initial)
    scanned: list[list] = [[] for _ in range(len(body.outputs) - 1 - len(carried))]
    limit = None if trip_count is None else int(trip_count.reshape(-1)[0])
    going = True if cond is None else bool(cond.reshape(-1)[0])
    iteration = 0
    while going and (limit is None or iteration < limit):
        results = run_subgraph(body, [_scalar(iteration, "int64"), _scalar(going, "bool"), *carried], _env)
        going = bool(results[0].reshape(-1)[0])
        carried = results[1:1 + len(carried)]
        for collected, value in zip(scanned, results[1 + len(carried):]):
            collected.append(value)
        iteration += 1
    stacked = [_stack(items, 0, body, 1 + len(carried) + k) for k, items in enumerate(scanned)]
    return tuple(carried + stacked)


def _scan_once(states: list, sequences: list, body: Graph, env: dict, input_axes: list[int],
               input_directions: list[int], output_axes: list[int], output_directions: list[int]) -> list:
    length = sequences[0].shape[input_axes[0]] if sequences else 0
    for sequence, axis in zip(sequences, input_axes):
        if sequence.shape[axis] != length:
            raise ValueError(f"Scan inputs disagree on the sequence length: {sequence.shape[axis]} and {length}")
    scanned: list[list] = [[] for _ in range(len(body.outputs) - len(states))]
    for step in range(length):
        slices = [x.select(axis, length - 1 - step if reverse else step)
                  for x, axis, reverse in zip(sequences, input_axes, input_directions)]
        results = run_subgraph(body, states + slices, env)
        states = results[:len(states)]
        for collected, value in zip(scanned, results[len(states):]):
            collected.append(value)
    outputs = []
    for k, items in enumerate(scanned):
        if output_directions[k]:
            items = items[::-1]
        outputs.append(_stack(items, output_axes[k], body, len(states) + k))
    return states + outputs


@register("Scan", since=9)
def scan(*inputs, body: Graph, num_scan_inputs: int, scan_input_axes=None, scan_input_directions=None,
         scan_output_axes=None, scan_output_directions=None, _env):
    states = list(inputs[:len(inputs) - num_scan_inputs])
    sequences = list(inputs[len(states):])
    num_outputs = len(body.outputs) - len(states)
    input_axes = [a if a >= 0 else a + x.dim() for a, x in zip(scan_input_axes or [0] * len(sequences), sequences)]
    output_axes = list(scan_output_axes or [0] * num_outputs)
    results = _scan_once(states, sequences, body, _env, input_axes, list(scan_input_directions or [0] * len(sequences)),
                         output_axes, list(scan_output_directions or [0] * num_outputs))
    return tuple(results)


@register("Scan", since=8)
def scan_batched(sequence_lens, *inputs, body: Graph, num_scan_inputs: int, directions=None, _env):
    """Scan-8: every input has a leading batch axis; each batch item is scanned on its own (up to its length)."""
    import torch

    states = list(inputs[:len(inputs) - num_scan_inputs])
    sequences = list(inputs[len(states):])
    num_outputs = len(body.outputs) - len(states)
    batch = (states + sequences)[0].shape[0]
    per_item = []
    for b in range(batch):
        length = sequences[0].shape[1] if sequence_lens is None else int(sequence_lens[b])
        per_item.append(_scan_once([s[b] for s in states], [x[b, :length] for x in sequences], body, _env,
                                   [0] * len(sequences), list(directions or [0] * len(sequences)),
                                   [0] * num_outputs, [0] * num_outputs))
    longest = max((item[len(states)].shape[0] for item in per_item), default=0) if num_outputs else 0
    outputs = []
    for k in range(len(states) + num_outputs):
        values = [item[k] for item in per_item]
        if k >= len(states):  # shorter batch items are padded with zeros after their end
            values = [torch.nn.functional.pad(v, [0, 0] * (v.dim() - 1) + [0, longest - v.shape[0]]) for v in values]
        outputs.append(torch.stack(values))
    return tuple(outputs)
