"""Sequences (Python lists of tensors) and optionals (a value or None): the Sequence* and Optional* operators.

A kernel whose one output is a sequence returns it wrapped in a tuple, so the program never mistakes the
list for several outputs.
"""
from __future__ import annotations

from ..ir import Graph
from .registry import register


def _index(position, length: int, *, inserting: bool = False) -> int:
    index = int(position.reshape(-1)[0])
    top = length if inserting else length - 1
    if not -length <= index <= top:
        raise IndexError(f"position {index} is outside a sequence of length {length}")
    return index + length if index < 0 else index


@register("SequenceEmpty", since=11)
def sequence_empty(*, dtype: int = 1):
    return ([],)


@register("SequenceConstruct", since=11)
def sequence_construct(*tensors):
    return (list(tensors),)


@register("SequenceInsert", since=11)
def sequence_insert(sequence, tensor, position=None):
    items = list(sequence)
    index = len(items) if position is None else _index(position, len(items), inserting=True)
    items.insert(index, tensor)
    return (items,)


@register("SequenceAt", since=11)
def sequence_at(sequence, position):
    return sequence[_index(position, len(sequence))]


@register("SequenceErase", since=11)
def sequence_erase(sequence, position=None):
    items = list(sequence)
    del items[len(items) - 1 if position is None else _index(position, len(items))]
    return (items,)


@register("SequenceLength", since=11)
def sequence_length(sequence):
    import torch

    return torch.tensor(len(sequence), dtype=torch.int64)


@register("SplitToSequence", since=11)
def split_to_sequence(tensor, split=None, *, axis: int = 0, keepdims: int = 1):
    import torch

    axis = axis + tensor.dim() if axis < 0 else axis
    if split is None:  # pieces of length 1, the split axis dropped unless keepdims
        pieces = list(torch.split(tensor, 1, dim=axis))
        return ([p.squeeze(axis) for p in pieces] if not keepdims else pieces,)
    if split.dim() == 0:
        return (list(torch.split(tensor, int(split), dim=axis)),)
    return (list(torch.split(tensor, [int(s) for s in split.tolist()], dim=axis)),)


@register("ConcatFromSequence", since=11)
def concat_from_sequence(sequence, *, axis: int, new_axis: int = 0):
    import torch

    if new_axis:
        return torch.stack(list(sequence), dim=axis if axis >= 0 else axis + sequence[0].dim() + 1)
    return torch.cat(list(sequence), dim=axis)


@register("SequenceMap", since=17)
def sequence_map(sequence, *additional, body: Graph, _env):
    """Run `body` once per element; extra sequence inputs advance with it, extra tensors are the same each time."""
    from .control import run_subgraph

    collected: list[list] = [[] for _ in body.outputs]
    for index in range(len(sequence)):
        inputs = [sequence[index]] + [extra[index] if isinstance(extra, list) else extra for extra in additional]
        for outputs, value in zip(collected, run_subgraph(body, inputs, _env)):
            outputs.append(value)
    return tuple(collected)


@register("Optional", since=15)
def optional(value=None, *, type=None):  # noqa: A002 (the ONNX attribute is called "type")
    return (value,)


@register("OptionalHasElement", since=15)
def optional_has_element(value=None):
    import torch

    return torch.tensor(value is not None)


@register("OptionalGetElement", since=15)
def optional_get_element(value):
    if value is None:
        raise ValueError("OptionalGetElement on an empty optional")
    return (value,)
