"""Binding a node to the callable that runs it: its registered kernel with its attributes applied."""
from __future__ import annotations

import functools
import inspect

from ...errors import BuildError
from ...ir import Node


def bind_kernel(node: Node, opset: int):
    """`kernel(*inputs)` for `node` at `opset`; context arguments other than _env are filled in here."""
    from ...ops import registry

    definition = registry.lookup(node.op, node.domain, opset)
    if definition is None:
        raise BuildError(f"no kernel for {node.describe()} at opset {opset}", code="KILN-E101", where=node.describe(),
                         hint="see `kiln ops` for what kiln supports")
    params = inspect.signature(definition.kernel).parameters
    extra = {}
    if "_num_outputs" in params:
        extra["_num_outputs"] = len(node.outputs)
    from ...plugins import device_dispatch

    return functools.partial(device_dispatch(definition), **node.attrs, **extra)


def wants_env(node: Node, opset: int) -> bool:
    from ...ops import registry

    definition = registry.lookup(node.op, node.domain, opset)
    return definition is not None and "_env" in inspect.signature(definition.kernel).parameters
