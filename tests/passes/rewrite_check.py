"""check_rewrite: the shape of every pass test. Parse a small model, run the passes, compare the graph
with the expected one, run them again to show they are idempotent, and check the numbers against
onnxruntime on the original model."""
from __future__ import annotations

import numpy as np
from helpers import assert_close, run_onnxruntime

from kiln.frontend.onnx import parse
from kiln.ir import verify
from kiln.passes import constant_folding, dead_code
from kiln.passes.context import PassContext


def run_graph(graph, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    from kiln.backends.cpu.program import CpuProgram

    with torch.inference_mode():
        outputs = CpuProgram(graph).execute({k: torch.from_numpy(v) for k, v in feed.items()})
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in outputs.items()}


def check_rewrite(model, passes, expected_ops: list[str], counters: dict[str, int], feed: dict[str, np.ndarray],
                  rtol: float = 1e-5, atol: float = 1e-5):
    """Returns the rewritten graph. `passes` run in order after folding; dead code is removed at the end."""
    graph = parse(model)
    constant_folding.run(graph, PassContext())
    outputs = [(v.name, graph.value(v.name).dtype) for v in graph.outputs]
    ctx = PassContext()
    for run in passes:
        run(graph, ctx)
    dead_code.run(graph, PassContext())
    verify(graph)
    assert [n.op_key for n in graph.nodes] == expected_ops
    assert {k: v for k, v in ctx.counters.items() if v} == counters
    assert [(v.name, graph.value(v.name).dtype) for v in graph.outputs] == outputs, "outputs keep names and dtypes"
    again = PassContext()
    for run in passes:
        assert not run(graph, again), f"{run.__module__} is idempotent"
    assert not any(again.counters.values())
    expected = run_onnxruntime(model, feed)
    actual = run_graph(graph, feed)
    for name in expected:
        assert_close(actual[name], expected[name], rtol=rtol, atol=atol, what=name)
    return graph
