"""Which device an engine is built for, and whether this machine can run it."""
from __future__ import annotations

import functools
import platform

from ..errors import EngineFileError


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags (from /proc/cpuinfo on Linux; empty where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_target(required_features: list[str] | None = None) -> dict:
    return {"device": "cpu", "machine": platform.machine(), "cpu_features": sorted(required_features or [])}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_target(target: dict, source: str = "engine") -> None:
    """Raise KILN-E505 when this machine cannot run an engine built for `target`."""
    device = target.get("device")
    if device == "cpu":
        if target.get("machine") and target["machine"] != platform.machine():
            raise EngineFileError(f"{source} was built for {target['machine']} CPUs; this machine is {platform.machine()}",
                                  code="KILN-E505", hint="rebuild the engine on this machine: kiln build model.onnx")
        missing = sorted(set(target.get("cpu_features", [])) - cpu_features())
        if missing:
            raise EngineFileError(f"{source} needs CPU features this CPU lacks: {', '.join(missing)}", code="KILN-E505",
                                  hint="rebuild the engine on this machine, without the precision that needs them (e.g. drop --bf16)")
        return
    if device == "cuda":
        if not cuda_available():
            raise EngineFileError(f"{source} was built for the GPU {target.get('name', '?')} (compute capability "
                                  f"{target.get('capability', '?')}), but no CUDA GPU is available here",
                                  code="KILN-E505", hint="run it on that GPU, or rebuild for the CPU: kiln build model.onnx --device cpu")
        import torch

        name = torch.cuda.get_device_name()
        capability = "%d.%d" % torch.cuda.get_device_capability()
        if name != target.get("name") or capability != target.get("capability"):
            raise EngineFileError(f"{source} was built for {target.get('name')} (compute capability {target.get('capability')}); "
                                  f"this GPU is {name} ({capability})", code="KILN-E505",
                                  hint="engines are tuned for one GPU model: rebuild it here with kiln build --device cuda")
        return
    raise EngineFileError(f"{source} targets an unknown device {device!r}", code="KILN-E505",
                          hint="rebuild the engine with this kiln")
