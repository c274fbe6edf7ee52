"""Post-training INT8 quantization: calibration data, calibrators, the calibration cache, int8 layer
lowering, and the accuracy-budget search over per-layer precisions.

    kiln.build("m.onnx", kiln.BuilderConfig(int8=True, calib="calib_dir/", calibrator="entropy"))

The modules, in the order a build uses them: data (feeds from a directory or an iterable),
histogram (bounded-memory collection), calibrators (minmax, entropy, percentile, mse -> amax),
calibrate (run the fp32 graph over the data), cache (the --calibCache file), weights (per-channel
symmetric int8 weights), lower (the build pass that writes kiln::QGemm / kiln::QConv), budget
(per-layer sensitivity and the accuracy budget), qdq (explicitly quantized models: symmetric Q/DQ pairs into
int8 layers), cpu_tactics (oneDNN int8 convolution, torch._int_mm), config (option checks), report (what
`kiln build` prints). The GPU kernels are in kiln/backends/cuda/int8.py.
"""
from __future__ import annotations

CALIBRATORS = ("entropy", "percentile", "mse", "minmax")
CONSTRAINTS = ("none", "prefer", "obey")
METRICS = ("top1", "relerr")
