"""Checks of the int8 options in BuilderConfig, so a misspelt calibrator fails before any work."""
from __future__ import annotations

from ..errors import BuildError, PrecisionError
from . import CALIBRATORS, CONSTRAINTS, METRICS

PRECISIONS = ("int8", "fp32")


def check_config(config) -> None:
    if config.int8 and not config.optimize:
        raise BuildError("--int8 quantizes the fused convolution and matrix layers, which --noOptimize does not form",
                         code="KILN-E203", hint="drop --noOptimize, or build without --int8")
    if config.calibrator not in CALIBRATORS:
        raise BuildError(f"unknown calibrator {config.calibrator!r}", code="KILN-E203", hint=f"choose one of: {', '.join(CALIBRATORS)}")
    if config.precision_constraints not in CONSTRAINTS:
        raise BuildError(f"unknown precision constraints {config.precision_constraints!r}", code="KILN-E203",
                         hint=f"choose one of: {', '.join(CONSTRAINTS)}")
    if config.accuracy_metric not in METRICS:
        raise BuildError(f"unknown accuracy metric {config.accuracy_metric!r}", code="KILN-E203",
                         hint=f"choose one of: {', '.join(METRICS)}")
    for name, precision in (config.layer_precisions or {}).items():
        if precision not in PRECISIONS:
            raise PrecisionError(f"--layerPrecisions {name}:{precision}: kiln's CPU layers run {' or '.join(PRECISIONS)}",
                                 code="KILN-E301", hint="write name:int8 or name:fp32 (GPU precisions need --device cuda)")
        if precision == "int8" and not config.int8:
            raise BuildError(f"--layerPrecisions asks layer {name!r} for int8, but --int8 is not on", code="KILN-E203",
                             hint="add --int8 (and --calib DATA)")
    if config.accuracy_budget is not None and (config.accuracy_budget < 0 or not config.int8):
        raise BuildError("an accuracy budget needs --int8 and a budget >= 0", code="KILN-E203",
                         hint="e.g. --int8 --calib DIR --validation DIR --accuracyBudget 0.5 --accuracyMetric top1")


def parse_layer_precisions(text: str | None) -> dict[str, str]:
    """`name:int8,other*:fp32` to {pattern: precision}; layer names may contain ':' (the last one splits)."""
    result = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, precision = item.strip().rpartition(":")
        if not sep or not name:
            raise BuildError(f"--layerPrecisions {item!r} is not of the form name:precision", code="KILN-E203",
                             hint="write --layerPrecisions conv1:fp32,'*':int8")
        result[name] = precision.strip().lower()
    return result
