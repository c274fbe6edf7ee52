"""A stem convolution and the max pool after it as one kiln::Conv (pool_* attributes) in CPU bf16 builds.

The ImageNet networks open with a convolution of the image's 3 channels, its ReLU, and a 3x3 max pool of stride 2
(ResNet, DenseNet, GoogLeNet, SqueezeNet). The convolution's output is the largest activation of the network (at
batch 8, 12.6 MB in bf16 for SqueezeNet's 64x111x111), written once and read back once by the pool. The CPU backend's
bf16 stem kernel can pool the rows it has just computed while they are in cache (native.cpp's kiln_stem_pool_bf16),
so the full output is never written: SqueezeNet b8's pool alone took 0.31-0.36 ms of its 6.5.

Only CPU bf16 builds fuse (BuilderConfig device "cpu", bf16, no int8): that is where the fused kernel exists; fp32
keeps the two layers, whose kernels met their targets, and other backends never see the attributes. Matched: a
kiln::Conv of at most 15 input channels (an image's), one group, no residual, whose output only a MaxPool reads,
that pool 2-D with one output, square and undilated, symmetric padding under half its window, storage order 0 and no
auto_pad. The fused node keeps the pool's output name and appends the pool to its origin.
"""
from __future__ import annotations

from .. import log
from ..ir import Graph
from .context import PassContext
from .matching import Neighbours, merged_origin, rewrite

STEM_MAX_IN_CHANNELS = 15  # as the CPU backend's stem kernel (kiln/backends/cpu/native.py)


def wanted(config) -> bool:
    """Whether a build with `config` fuses stems and pools: CPU, bf16, no int8."""
    return (config is not None and getattr(config, "device", "cpu") == "cpu" and bool(getattr(config, "bf16", False))
            and not getattr(config, "int8", False))


def run(graph: Graph, ctx: PassContext) -> bool:
    if not wanted(ctx.config):
        return False
    near = Neighbours(graph)
    replaced = {}
    for node in graph.nodes:
        if node.op != "MaxPool" or node.domain:
            continue
        pool = _pool_attributes(node)
        conv = near.made_by(node.inputs[0], "Conv", "kiln")
        if pool is None or conv is None or near.only_user(conv.outputs[0]) is not node or not _is_stem(conv, graph):
            continue
        if not _sizes_agree(graph.value(node.inputs[0]).shape, graph.value(node.outputs[0]).shape, pool):
            continue
        replaced[id(conv)] = None
        replaced[id(node)] = conv.replace(outputs=(node.outputs[0],), attrs={**conv.attrs, **pool},
                                          origin=merged_origin(conv, node))
        ctx.counters["fuse_stem_pool"] += 1
        log.verbose("fuse_stem_pool: %s pools inside %s", node.describe(), conv.describe())
    if not replaced:
        return False
    rewrite(graph, replaced)
    return True


def _is_stem(conv, graph: Graph) -> bool:
    weight = graph.initializers.get(conv.inputs[1])
    return (weight is not None and weight.ndim == 4 and weight.shape[1] <= STEM_MAX_IN_CHANNELS
            and int(conv.attrs.get("group", 1)) == 1 and not (len(conv.inputs) > 3 and conv.inputs[3])
            and "pool_kernel_shape" not in conv.attrs)


def _pool_attributes(node) -> dict | None:
    """The fused node's pool_* attributes for MaxPool `node`, or None where the fusion does not take it."""
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    if len(kernel) != 2 or len([o for o in node.outputs if o]) != 1 or attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    if kernel[0] != kernel[1] or strides[0] != strides[1] or len(set(pads)) != 1 or 2 * pads[0] >= kernel[0]:
        return None
    if any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("storage_order", 0):
        return None
    return {"pool_kernel_shape": kernel, "pool_strides": strides, "pool_pads": pads,
            "pool_ceil_mode": int(attrs.get("ceil_mode", 0))}


def _sizes_agree(conv_shape, pool_shape, pool: dict) -> bool:
    """Whether torch's rule for a pool's output size (the fused kernels' and the reference's) gives the size ONNX
    shape inference gave: in ceil mode, torch drops a last window that would start in the right padding."""
    if conv_shape is None or pool_shape is None or len(conv_shape) != 4 or len(pool_shape) != 4:
        return False
    if not all(isinstance(d, int) for d in (*conv_shape[2:], *pool_shape[2:])):
        return False
    kernel, stride, pad = pool["pool_kernel_shape"][0], pool["pool_strides"][0], pool["pool_pads"][0]
    for size, expected in zip(conv_shape[2:], pool_shape[2:]):
        span = size + 2 * pad - kernel
        out = (-(-span // stride) if pool["pool_ceil_mode"] else span // stride) + 1
        if pool["pool_ceil_mode"] and (out - 1) * stride >= size + pad:
            out -= 1
        if out != expected:
            return False
    return True
