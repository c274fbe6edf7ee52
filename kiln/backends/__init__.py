"""Backends lower the optimized graph into steps over tensors on one kind of device."""
from __future__ import annotations


def lower(plan):
    """The runnable program for `plan` on the device it was built for."""
    device = plan.target["device"]
    if device == "cpu":
        from .cpu.program import CpuProgram

        return CpuProgram(plan.graph)
    if device == "cuda":
        from .cuda import lower as lower_cuda

        return lower_cuda(plan)
    raise AssertionError(f"unknown device {device}")
