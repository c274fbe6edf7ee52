"""The optimization pipeline: the passes, in order. Each is `run(graph, ctx) -> bool` (changed?)."""
from __future__ import annotations

import os
import time

from .. import log
from ..ir import Graph, verify
from . import (constant_folding, cse, dead_code, fold_batchnorm, fuse_activation, fuse_conv, fuse_elementwise, fuse_gemm,
               fuse_parallel_gemm, fuse_stem_pool, noop_removal, recognize_attention, recognize_gelu,
               recognize_layernorm)
from ..quant import lower as int8_lowering
from .context import PassContext

# Folding and dead code always run: without them the light models (weights built by ConstantOfShape)
# would compute their weights on every run. BuilderConfig(optimize=False) stops there, which is how
# tests compare an optimized engine with an unoptimized one.
ESSENTIAL = [
    ("constant_folding", constant_folding.run),  # weights built by ConstantOfShape, shape arithmetic
    ("dead_code", dead_code.run),  # what folding left unread
]

# The order of optimizations, visible in one place.
PIPELINE = ESSENTIAL + [
    ("noop_removal", noop_removal.run),  # Identity, Dropout, same-type Cast, same-shape Reshape, Transpose pairs
    ("cse", cse.run),  # exporters repeat shape arithmetic and constants per layer
    ("constant_folding", constant_folding.run),  # what CSE and no-op removal made constant
    ("fold_batchnorm", fold_batchnorm.run),  # Conv + BatchNormalization -> Conv
    ("recognize_gelu", recognize_gelu.run),  # erf-form GELU -> kiln::Gelu
    ("recognize_layernorm", recognize_layernorm.run),  # decomposed LayerNorm -> LayerNormalization
    ("recognize_attention", recognize_attention.run),  # MatMul/scale/mask/Softmax/MatMul -> kiln::Attention
    ("noop_removal", noop_removal.run),  # attention's K transpose meets the head transposes
    ("fuse_conv", fuse_conv.run),  # Conv -> kiln::Conv
    ("fuse_gemm", fuse_gemm.run),  # Gemm, MatMul (+ bias) -> kiln::Gemm
    ("fuse_activation", fuse_activation.run),  # residual Add and activations into kiln::Conv / kiln::Gemm
    ("fuse_stem_pool", fuse_stem_pool.run),  # CPU bf16: a 3-channel kiln::Conv + MaxPool -> one kiln::Conv
    # after fuse_activation, so each Gemm carries its own activation and residual (a Split between a Gemm and its
    # activation would stop that fusion); attention was recognised above, on Q, K and V wherever they came from
    ("fuse_parallel_gemm", fuse_parallel_gemm.run),  # kiln::Gemms sharing an input (Q, K, V) -> one kiln::Gemm + Split
    ("fuse_elementwise", fuse_elementwise.run),  # what is left of elementwise chains -> kiln::Elementwise
    ("int8", int8_lowering.run),  # --int8: calibrate, then kiln::Conv / kiln::Gemm -> kiln::QConv / kiln::QGemm where chosen
    ("dead_code", dead_code.run),  # weights the folds replaced
]


def optimize(graph: Graph, ctx: PassContext | None = None, passes=None, config=None) -> PassContext:
    """Run the pipeline over `graph` in place; return the context with its rewrite counters."""
    ctx = ctx or PassContext(config=config, validate=os.environ.get("KILN_VALIDATE") == "1")
    if passes is None:
        passes = PIPELINE if config is None or getattr(config, "optimize", True) else ESSENTIAL
    for name, run in passes:
        start = time.perf_counter()
        before = len(graph.nodes)
        changed = run(graph, ctx)
        log.verbose("pass %-22s %s: %d -> %d nodes in %.1f ms", name, "changed" if changed else "no change",
                    before, len(graph.nodes), (time.perf_counter() - start) * 1e3)
        if ctx.validate:
            verify(graph)
    return ctx
