"""The CUDA backend: the optimized graph lowered to steps over CUDA tensors, each layer bound to the
fastest of its candidate tactics (cuDNN, cuBLAS/cuBLASLt, torch's fused attention, kiln's Triton
kernels) timed on the GPU, run as one CUDA graph per input shape.

torch and triton are imported inside functions, so this package imports on machines without a GPU."""
from __future__ import annotations


def lower(plan):
    """The CUDA program for `plan`; per-layer choices in `program.layer_info`."""
    from .lowering import lower as lower_plan

    return lower_plan(plan)
