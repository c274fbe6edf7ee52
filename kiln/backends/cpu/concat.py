"""Channel concatenations whose every input is a native convolution's output (SqueezeNet's fire modules,
Inception's branches): each convolution writes its channels straight into the concatenation's NHWC buffer, and the
Concat step hands that buffer on instead of copying every input into a new one."""
from __future__ import annotations

from ...ir import Graph, Node


def _channel_axis(node: Node, graph: Graph) -> bool:
    shape = graph.value(node.outputs[0]).shape
    if shape is None or len(shape) != 4:
        return False
    return int(node.attrs.get("axis", 1)) % 4 == 1


def concatenations_to_fill(graph: Graph, direct: dict[str, object]) -> list[tuple[int, list[int]]]:
    """(Concat node index, its producers' node indices) for each channel Concat whose inputs are distinct values,
    each made by a native convolution in `direct` (node name -> DirectConvolution or AmxConvolution, all writing
    one type) and read by this Concat alone, none of them a graph output."""
    producer = {name: index for index, node in enumerate(graph.nodes) for name in node.outputs if name}
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    outputs = set(graph.output_names())
    plans = []
    for index, node in enumerate(graph.nodes):
        if node.op_key != "Concat" or len(node.outputs) != 1 or len(node.inputs) < 2 or not _channel_axis(node, graph):
            continue
        names = list(node.inputs)
        if len(set(names)) != len(names) or any(not name or name in outputs or readers.get(name) != 1 for name in names):
            continue
        producers = [producer.get(name) for name in names]
        if all(p is not None and graph.nodes[p].name in direct for p in producers) \
                and len({direct[graph.nodes[p].name].dtype for p in producers}) == 1:
            plans.append((index, producers))
    return plans


def fill_in_place(program, direct: dict[str, object]) -> list[str]:
    """Rebind the steps of every concatenation `concatenations_to_fill` finds; returns the Concat layers' names.

    The buffer lives in the run's own environment under a key no value can have, so concurrent runs of one program
    never share it: the first producer to run allocates it, each writes its slice, the Concat takes it out."""
    import torch

    filled = []
    for index, producers in concatenations_to_fill(program.graph, direct):
        concat = program.steps[index]
        key = f"\0concat buffer of {concat.name}"
        offsets, start = [], 0
        for p in producers:
            offsets.append(start)
            start += direct[program.steps[p].name].out_channels
        total, first = start, min(producers)
        for p, offset in zip(producers, offsets):
            convolution = direct[program.steps[p].name]
            program.steps[p].run = _writer(convolution, key, offset, total, allocates=p == first)
            program.steps[p].wants_env = True
        concat.run = _taker(key, offsets, torch.cat)
        concat.wants_env = True
        filled.append(concat.name)
    return filled


def _writer(convolution, key: str, offset: int, total: int, allocates: bool):
    import torch

    channels_last = torch.channels_last
    width = convolution.out_channels

    def run(x, *unused, _env):
        if allocates:
            n, _, h, w = convolution.output_shape(x)
            _env[key] = torch.empty(n, total, h, w, dtype=convolution.dtype, memory_format=channels_last)
        return convolution(x, out=_env[key][:, offset:offset + width])

    return run


def _taker(key: str, offsets: list[int], cat):
    def run(*inputs, _env):
        buffer = _env.pop(key, None)
        base = buffer.data_ptr() if buffer is not None else None
        # the inputs are the buffer's slices unless a tool replaced them; then concatenate as usual
        if base is not None and all(t.data_ptr() == base + buffer.element_size() * offset for t, offset in zip(inputs, offsets)):
            return buffer
        return cat(inputs, 1)

    return run
