"""Channel concatenations built in one buffer instead of copied: SqueezeNet's fire modules, Inception's branches
and DenseNet's dense blocks.

A chain is a channel Concat followed by the Concats that extend it: DenseNet's block makes each layer's features
Concat(previous concatenation, new features), so a block of 16 layers copies its early features 16 times. Here the
whole chain shares one NHWC buffer as wide as its last Concat: each Concat's output is a view of the buffer's first
channels, and its new inputs land in their slices. An input made by a native convolution (which writes into a
slice of a wider buffer) and read by nothing else is written there directly; any other input is copied into its
slice once. The views are read, never written, by the layers after them: no kiln layer updates a Concat's output
in place (fast.py's in-place residual sums take only convolution and pool outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...ir import Graph, Node
from .native import note_view_step


@dataclass
class Chain:
    concats: list[int]  # node indices, each extending the one before it
    offsets: list[list[int]]  # per Concat, the first channel of each of its inputs in the buffer
    widths: list[int]  # per Concat, its output's channels
    writers: dict[int, int] = field(default_factory=dict)  # producer node index -> first channel it writes


def _channels(graph: Graph, name: str) -> int | None:
    shape = graph.value(name).shape
    return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


def _channel_concat(node: Node, graph: Graph) -> bool:
    return node.op_key == "Concat" and len(node.outputs) == 1 and _channels(graph, node.outputs[0]) is not None \
        and int(node.attrs.get("axis", 1)) % 4 == 1 and all(_channels(graph, name) is not None for name in node.inputs)


def concatenation_chains(graph: Graph, direct: dict[str, object]) -> list[Chain]:
    """The chains of channel Concats in `graph`, with the inputs that native convolutions in `direct` (node name ->
    DirectConvolution or AmxConvolution) write in place: each such input is read by its Concat alone, made once,
    no graph output, and of the type the chain's first writer writes. A Concat extends the one before it where its
    first input is that one's output, no graph output, and no other Concat extends it."""
    producer = {name: index for index, node in enumerate(graph.nodes) for name in node.outputs if name}
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            readers.setdefault(name, []).append(index)
    outputs = set(graph.output_names())
    concats = [index for index, node in enumerate(graph.nodes) if _channel_concat(node, graph)]
    is_concat = set(concats)
    successor: dict[int, int] = {}  # concat index -> the concat that extends it
    for index in concats:
        first = graph.nodes[index].inputs[0]
        before = producer.get(first)
        if before in is_concat and first not in outputs and first not in graph.nodes[index].inputs[1:] \
                and sum(graph.nodes[r].op_key == "Concat" for r in readers[first]) == 1:
            successor[before] = index
    extending = set(successor.values())
    chains = []
    for index in concats:
        if index in extending:
            continue
        members = [index]
        while members[-1] in successor:
            members.append(successor[members[-1]])
        chains.append(_chain(graph, members, producer, readers, outputs, direct))
    return [chain for chain in chains if chain.writers or len(chain.concats) > 1]


def _chain(graph: Graph, members: list[int], producer: dict, readers: dict, outputs: set, direct: dict) -> Chain:
    chain = Chain(members, [], [])
    dtype = None
    for position, index in enumerate(members):
        node = graph.nodes[index]
        offsets, start = [], 0
        for slot, name in enumerate(node.inputs):
            offsets.append(start)
            made_by = producer.get(name)
            convolution = direct.get(graph.nodes[made_by].name) if made_by is not None else None
            extended = position > 0 and slot == 0  # the chain's previous Concat: already in the buffer
            if convolution is not None and not extended and readers[name] == [index] and name not in outputs \
                    and node.inputs.count(name) == 1 and (dtype is None or convolution.dtype == dtype):
                dtype = convolution.dtype
                chain.writers[made_by] = start
            start += _channels(graph, name)
        chain.offsets.append(offsets)
        chain.widths.append(start)
    return chain


def fill_in_place(program, direct: dict[str, object]) -> list[str]:
    """Rebind the steps of every chain `concatenation_chains` finds; returns its Concat layers' names.

    The buffer lives in the run's own environment under a key no value can have, so concurrent runs of one program
    never share it: the first step of the chain to run allocates it, the last Concat takes it out."""
    filled = []
    for chain in concatenation_chains(program.graph, direct):
        key = f"\0concat buffer of {program.steps[chain.concats[0]].name}"
        width = chain.widths[-1]
        for producer, offset in chain.writers.items():
            program.steps[producer].run = _writer(direct[program.steps[producer].name], key, offset, width)
            program.steps[producer].wants_env = True
            program.steps[producer].chain = key
        writer_dtype = next((direct[program.steps[p].name].dtype for p in chain.writers), None)
        for position, index in enumerate(chain.concats):
            last = position == len(chain.concats) - 1
            step = program.steps[index]
            step.run = _concatenation(key, chain.offsets[position], chain.widths[position], width, writer_dtype, last)
            step.wants_env = True
            step.chain = key
            filled.append(step.name)
    return filled


def _buffer(env: dict, key: str, like, channels: int, dtype):
    import torch

    buffer = env.get(key)
    if buffer is None:
        n, _, h, w = like
        buffer = env[key] = torch.empty(n, channels, h, w, dtype=dtype, memory_format=torch.channels_last)
    return buffer


def _writer(convolution, key: str, offset: int, width: int):
    channels = convolution.out_channels

    def run(x, *unused, _env):
        buffer = _buffer(_env, key, convolution.output_shape(x), width, convolution.dtype)
        return convolution(x, out=buffer[:, offset:offset + channels])

    return run


def _concatenation(key: str, offsets: list[int], channels: int, width: int, dtype, last: bool):
    """The Concat step: every input not already at its slice of the buffer is copied there (a tool may have
    replaced a written one); the output is the buffer's first `channels`, or the buffer itself at the chain's end."""
    def run(*inputs, _env):
        buffer = _buffer(_env, key, inputs[0].shape, width, dtype or inputs[0].dtype)
        # an input already at its slice starts there with the buffer's strides (a channel slice keeps them): told
        # from its pointer, without building the slice
        start, strides, element = buffer.data_ptr(), buffer.stride(), buffer.element_size()
        copied = False
        for tensor, offset in zip(inputs, offsets):
            in_place = tensor.data_ptr() == start + offset * element and tensor.stride() == strides \
                and tensor.dtype == buffer.dtype
            if not in_place:
                buffer.narrow(1, offset, tensor.shape[1]).copy_(tensor)
                copied = True
        if not copied:  # the kernels before it did all its work: a replay may skip it (replay.py)
            note_view_step()
        if last:
            _env.pop(key, None)
            return buffer
        return buffer.narrow(1, 0, channels)

    return run
