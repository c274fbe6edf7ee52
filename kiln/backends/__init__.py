"""Backends lower the optimized graph into steps over tensors on one kind of device."""
from __future__ import annotations

# Devices whose lowering tunes each optimization profile at its own opt shapes (one program per profile). The CUDA
# backend times its tactics once, at the first profile's opt shapes, and serves every profile with that program.
TUNED_PER_PROFILE = {"cpu"}


def lower(plan, profile: int = 0, shares=None):
    """The runnable program for `plan` on the device it was built for, tuned for optimization profile `profile`;
    `shares`, another profile's program of the same plan, lends it its weights."""
    device = plan.target["device"]
    if device == "cpu":
        from .cpu.fast import lower as lower_cpu

        return lower_cpu(plan, profile, shares)
    if device == "cuda":
        from .cuda import lower as lower_cuda

        assert profile == 0, "CUDA programs serve every profile"
        return lower_cuda(plan)
    raise AssertionError(f"unknown device {device}")
