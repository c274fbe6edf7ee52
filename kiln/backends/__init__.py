"""Backends lower the optimized graph into steps over tensors on one kind of device."""
from __future__ import annotations


def lower(plan):
    """The runnable program for `plan` on the device it was built for."""
    device = plan.target["device"]
    if device == "cpu":
        from .cpu.fast import lower as lower_cpu

        return lower_cpu(plan)
    if device == "cuda":
        from .cuda import lower as lower_cuda

        return lower_cuda(plan)
    raise AssertionError(f"unknown device {device}")
