"""Running one node's reference kernel on constant inputs, for passes that fold or check."""
from __future__ import annotations

import numpy as np

from ..errors import BuildError
from ..ir import Graph, Node


def evaluate_node(node: Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run `node` on numpy inputs with its registered CPU kernel; outputs come back as numpy."""
    import torch

    from ..backends.cpu.kernels import bind_kernel
    from ..tensors import numpy_to_torch, tensor_to_numpy

    kernel = bind_kernel(node, opset)
    args = [numpy_to_torch(np.asarray(x)) if x is not None else None for x in inputs]
    try:
        with torch.inference_mode():
            result = kernel(*args)
    except Exception as error:  # noqa: BLE001 (any kernel failure is reported as the node's)
        raise BuildError(f"evaluating {node.describe()} on constant inputs failed: {type(error).__name__}: {error}",
                         code="KILN-E201", where=node.describe(),
                         hint="the node's constant inputs or attributes are inconsistent; check the model with onnxruntime") from None
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    return [tensor_to_numpy(t) for t in outputs]


def is_foldable(node: Node, graph: Graph) -> bool:
    from ..ir import subgraphs
    from ..ops import registry

    if subgraphs(node):
        return False
    if any(graph.value(name).kind != "tensor" for name in node.inputs + node.outputs if name):
        return False  # sequences and optionals are not weights
    definition = registry.lookup(node.op, node.domain, graph.opsets.get(node.domain, graph.opset))
    return definition is not None and not definition.nondeterministic and definition.plugin is None
