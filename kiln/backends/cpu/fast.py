"""Fast CPU tactics: oneDNN's prepacked, fused convolution and linear kernels (convolutions, fp32 and bf16, as kiln's
own primitives, onednn.py; the rest through torch.ops.mkldnn, as inductor's weight freezing uses them), kiln's native
kernels (native.py, raced against oneDNN per layer: select.py), channels-last activations, and bf16 matrix work on
CPUs with AVX512-BF16 / AMX.

Why: plain torch eager calls re-lay-out the weights on every call and run each bias/activation as a
separate pass over memory; oneDNN with weights reordered once at lowering, the activation as a
post-op and NHWC activations runs the same math in one pass (see docs/benchmarks.md for the effect).

Layers without a fast tactic run their reference kernel. In a bf16 engine the fast layers compute in
bf16 and hand bf16 on; a reference layer that meets bf16 and fp32 inputs together computes in fp32,
so the residual stream of a transformer stays fp32 while its matrix work runs on AMX.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

from ...errors import PrecisionError
from ...ir import DType, Graph, Node, last_uses
from . import gemm, replay
from .kernels import bind_kernel

# kiln activation -> (oneDNN post-op name, algorithm)
_POST_OPS = {"": ("none", ""), "relu": ("relu", ""), "sigmoid": ("sigmoid", ""), "tanh": ("tanh", ""),
             "hardswish": ("hardswish", ""), "silu": ("swish", ""), "gelu": ("gelu", "none"),
             "gelu_tanh": ("gelu", "tanh"), "leaky_relu": ("leaky_relu", ""), "clip": ("hardtanh", "")}
_FLOAT_MAX = 3.4e38


@dataclass
class Tactic:
    run: Callable
    name: str  # what `kiln inspect` shows: "onednn-packed", "torch-attention", "torch"
    precision: str  # "fp32", "bf16", or "follow" (runs in the float type its inputs arrive in; fp32 where they mix)
    direct: object | None = None  # a native convolution without a residual, which can write into a wider buffer
    product: object | None = None  # a native bf16 product (gemm.Gemm), which the lowering links to the next one


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matrix work natively (AVX512-BF16 or AMX-BF16) and torch's oneDNN uses it."""
    from ...engine.target import cpu_features

    import torch

    features = cpu_features()
    return bool(features & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available() \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_bf16() -> None:
    if not bf16_supported():
        raise PrecisionError("--bf16 on the CPU needs AVX512-BF16 or AMX-BF16, which this CPU (or torch's oneDNN build) lacks",
                             code="KILN-E301", hint="build without --bf16 (fp32), or build on a CPU with AVX512-BF16 / AMX "
                                                    "(Intel Cooper Lake, Sapphire Rapids or newer; AMD Zen 4 or newer)")


def choose(node: Node, graph: Graph, bf16: bool, sizes: dict[str, int] | None = None, native: bool = True) -> Tactic:
    """The fastest tactic kiln has for `node`, falling back to its reference kernel; `sizes` are the dynamic
    dimensions' opt sizes (kiln/engine/profiles.py), which weights are packed for. `native` False keeps a
    convolution or a matrix product on oneDNN where kiln's native kernel could run it (select.py times the two)."""
    opset = graph.opsets.get(node.domain, graph.opset)
    # oneDNN's packed paths here are fp32 (or bf16 by choice); fp16 or float64 models keep the reference kernels
    fp32 = bool(node.inputs) and graph.value(node.inputs[0]).dtype is DType.float32
    if node.domain == "kiln" and node.op == "Conv" and fp32:
        tactic = _conv(node, graph, bf16, sizes, native)
        if tactic is not None:
            return tactic
    if node.domain == "kiln" and node.op == "Gemm" and fp32:
        tactic = _gemm(node, graph, bf16, sizes, native)
        if tactic is not None:
            return tactic
    if node.domain == "kiln" and node.op == "Attention" and fp32:
        return _attention(node, bf16)
    if not node.domain and node.op == "MaxPool":
        tactic = _max_pool(node, graph)
        if tactic is not None:
            tactic.precision = "follow" if bf16 else "fp32"
            return tactic
    if not node.domain and node.op == "LRN" and fp32:
        tactic = _local_response_norm(node, graph, bf16)
        if tactic is not None:
            return tactic
    if not node.domain and node.op in ("GlobalAveragePool", "AveragePool") and fp32:
        tactic = _global_average_pool(node, graph, bf16)
        if tactic is None and node.op == "AveragePool":
            tactic = _average_pool(node, graph, bf16)
        if tactic is not None:
            return tactic
    if node.domain == "kiln" and node.op == "Elementwise" and fp32:
        tactic = _channel_affine(node, graph, bf16)
        if tactic is not None:
            return tactic
    if node.domain == "kiln" and node.op in ("QGemm", "QConv"):  # int8 layers: tactics in kiln/quant/cpu_tactics.py
        from ...quant.cpu_tactics import int8_tactic

        run, name = int8_tactic(node, graph, _meet_in_fp32(bind_kernel(node, opset)))
        return Tactic(run, name, "int8")
    kernel = bind_kernel(node, opset)
    if bf16 and node.op_key in WEIGHTS_FOLLOW_BF16:
        weights = frozenset(i for i, name in enumerate(node.inputs) if name in graph.initializers)
        return Tactic(_weights_follow_bf16(kernel, weights), "torch", "follow")
    if bf16:
        return Tactic(_meet_in_fp32(kernel), "torch", "follow")
    return Tactic(kernel, "torch", "fp32")


def _post_op(node: Node) -> tuple[str, list, str | None]:
    name, algorithm = _POST_OPS[node.attrs.get("activation", "")]
    params = [float(p) for p in node.attrs.get("activation_params", [])]
    if name == "hardtanh":
        params = [max(params[0], -_FLOAT_MAX), min(params[1], _FLOAT_MAX)]
    return name, params, algorithm


def _example_shape(graph: Graph, name: str, sizes: dict[str, int] | None = None) -> list[int] | None:
    shape = graph.value(name).shape
    if shape is None:
        return None
    # a symbolic batch: pack for the profile's opt size (1 without one); any batch still runs, but oneDNN's weight
    # layout for batch 1 costs ResNet-50 about a quarter more at batch 4 (benchmarks/dynamic.py)
    return [d if isinstance(d, int) else (sizes or {}).get(d, 1) for d in shape]


def _conv(node: Node, graph: Graph, bf16: bool, sizes: dict[str, int] | None = None, native: bool = True) -> Tactic | None:
    import torch

    if node.attrs.get("pool_kernel_shape"):
        return _conv_and_pool(node, graph, bf16, sizes, native)
    weight = graph.initializers.get(node.inputs[1])
    pads = list(node.attrs["pads"])
    if weight is None or weight.ndim != 4 or pads[:2] != pads[2:] or not torch.backends.mkldnn.is_available():
        return None
    example = _example_shape(graph, node.inputs[0], sizes)
    if example is None or len(example) != 4:
        return None
    dtype = torch.bfloat16 if bf16 else torch.float32
    padding, stride, dilation = pads[:2], list(node.attrs["strides"]), list(node.attrs["dilations"])
    groups = int(node.attrs["group"])
    bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
    bias_array = graph.initializers.get(bias_name) if bias_name else None
    if bias_name and bias_array is None:  # a bias computed at run time: the reference kernel takes it
        return None
    own = _native_conv(node, graph, weight, bias_array, bf16) if native else None
    if own is not None:
        return own
    primitive = _onednn_primitive(node, graph, weight, bias_array, example, dtype)
    if primitive is not None:
        return primitive
    bias = torch.from_numpy(bias_array.copy()).to(dtype) if bias_array is not None else None
    attr, scalars, algorithm = _post_op(node)
    if _small_pointwise(node, weight, example, bf16):
        return _conv_as_linear(weight, bias, (attr, scalars, algorithm), math.prod(example) // example[1])
    w = torch.from_numpy(weight.copy()).to(dtype)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, groups, example)
    convolve = torch.ops.mkldnn._convolution_pointwise
    channels_last = torch.channels_last

    if len(node.inputs) > 3 and node.inputs[3] and groups > 1:
        # oneDNN's fused residual add falls back to a torch kernel without bf16 for grouped convolutions
        from ...ops.fused import apply_activation

        activation, params = node.attrs.get("activation", ""), node.attrs.get("activation_params", [])

        def run(x, w_unused, b_unused, residual):
            if x.dtype != dtype:
                x = x.to(dtype)
            y = convolve(x.contiguous(memory_format=channels_last), packed, bias, padding, stride, dilation, groups,
                         "none", [], "")
            return apply_activation(y.add_(residual.to(dtype)), activation, params)
    elif len(node.inputs) > 3 and node.inputs[3]:
        in_place = _residual_dies_here(node, graph)
        accumulate = torch.ops.mkldnn._convolution_pointwise_.binary

        def run(x, w_unused, b_unused, residual):
            if x.dtype != dtype:
                x = x.to(dtype)
            if residual.dtype != dtype:
                residual = residual.to(dtype)
            # oneDNN adds the residual in its own layout: both NHWC
            x = x.contiguous(memory_format=channels_last)
            residual = residual.contiguous(memory_format=channels_last)
            post_op = ("add", None, attr if attr != "none" else None, scalars, algorithm or None)
            if in_place:  # the sum lands in the residual's own buffer, which nothing reads after this layer
                return accumulate(residual, x, packed, bias, padding, stride, dilation, groups, *post_op)
            return convolve.binary(x, residual, packed, bias, padding, stride, dilation, groups, *post_op)
    else:
        def run(x, *unused):
            if x.dtype != dtype:
                x = x.to(dtype)
            return convolve(x.contiguous(memory_format=channels_last), packed, bias, padding, stride, dilation, groups,
                            attr, scalars, algorithm)
    return Tactic(run, "onednn-packed", "bf16" if bf16 else "fp32")


def _onednn_primitive(node: Node, graph: Graph, weight, bias, example, dtype) -> Tactic | None:
    """kiln's own oneDNN primitive (onednn.py) for an fp32 or bf16 (`dtype`) convolution with no residual or one
    whose buffer it may sum into; None where the library is absent, the activation is not one of its post-ops, or
    oneDNN refuses the layer at its example shape or offers only a reference kernel for it (torch's call then runs
    it)."""
    import torch

    from ... import log
    from . import onednn

    activation = node.attrs.get("activation", "")
    has_residual = len(node.inputs) > 3 and bool(node.inputs[3])
    if not onednn.available()[0] or not onednn.takes(activation) or (has_residual and not _residual_dies_here(node, graph)):
        return None
    convolution = onednn.Convolution(weight, bias, node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"],
                                     int(node.attrs["group"]), activation, node.attrs.get("activation_params", []),
                                     has_residual, dtype)
    try:
        convolution.primitive(example)
    except ValueError as error:
        log.verbose("%s keeps torch's oneDNN call: %s", node.name, error)
        return None

    def run(x, w_unused=None, b_unused=None, residual=None):
        return convolution(x, residual)

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    return Tactic(run, "onednn-primitive", precision, direct=None if has_residual else convolution)


def _conv_and_pool(node: Node, graph: Graph, bf16: bool, sizes: dict[str, int] | None, native: bool) -> Tactic | None:
    """A stem fused with its max pool (fuse_stem_pool, CPU bf16 builds): the bf16 stem kernel pools the rows it
    computes (native-stem-pool, from _native_conv: SqueezeNet's at b8 0.71 against 0.91 ms for the two kernels one
    after the other, ResNet-50's 7x7 at b1 a tie); otherwise the convolution's own tactic, then the max pool."""
    if native:
        weight = graph.initializers[node.inputs[1]]
        bias = graph.initializers.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        fused = _native_conv(node, graph, weight, bias, bf16)
        if fused is not None:
            return fused
    inner = _conv(node.replace(attrs={k: v for k, v in node.attrs.items() if not k.startswith("pool_")}), graph, bf16,
                  sizes, native)
    if inner is None:
        return None  # the reference kernel convolves and pools
    kernel, stride, pad, ceil_mode = _stem_pool(node)
    pool = _max_pooling([kernel] * 2, [stride] * 2, [pad] * 2, [1, 1], bool(ceil_mode), True)[0]

    def run(x, *rest):
        return pool(inner.run(x, *rest))

    return Tactic(run, inner.name, inner.precision)


def _stem_pool(node: Node) -> tuple[int, int, int, int] | None:
    """(kernel, stride, pad, ceil mode) of the max pool fuse_stem_pool put in a kiln::Conv, None where it put none."""
    if not node.attrs.get("pool_kernel_shape"):
        return None
    kernel, stride, pad = (int(node.attrs[f"pool_{key}"][0]) for key in ("kernel_shape", "strides", "pads"))
    return kernel, stride, pad, int(node.attrs.get("pool_ceil_mode", 0))


# What a convolution or matrix product oneDNN runs is called in the plan's layers (a loaded engine keeps such a layer on
# oneDNN)
ONEDNN_TACTICS = {"onednn-packed", "onednn-linear", "onednn-primitive"}
# Activations native.cpp applies as a clamp after the residual
_CLAMPS = {"": (-math.inf, math.inf), "relu": (0.0, math.inf)}


def _native_conv(node: Node, graph: Graph, weight, bias, bf16: bool) -> Tactic | None:
    """kiln's native convolutions (kiln/backends/cpu/native.py) for an ungrouped convolution with at most a ReLU or
    Clip fused: in fp32 the AVX-512 direct kernel, which alone takes 0.5-0.75x oneDNN's time on SqueezeNet's small
    1x1 layers and 0.83-1.17x on ResNet-50's (docs/benchmarks.md, run H); in bf16 the AMX kernel, 0.43-0.82x
    oneDNN's on the light models' layers when the host is slow, 0.79-1.17x when it is fast (run J). A stem of at
    most native.STEM_MAX_IN_CHANNELS input channels takes the stem kernel: in fp32 (and a dilated bf16 stem) a flat
    reduction, alone 0.77x oneDNN's fp32 time on SqueezeNet's 3x3/2 and 0.85x on ResNet-50's 7x7/2; in bf16 dot
    products over pairs of each kernel row's elements, 0.75x oneDNN's bf16 time on ResNet-50's 7x7/2 (which also
    converts the image first). A 3x3 of stride 1 takes the Winograd kernel instead (winograd.py), in both precisions: alone 0.52-0.74x
    oneDNN's fp32 time on ResNet-50's 3x3s from 56x56 to 14x14, 1.3x at 7x7. Whether it keeps the layer the build
    decides by timing (select.py)."""
    import torch

    from . import native, winograd

    activation = node.attrs.get("activation", "")
    if int(node.attrs["group"]) != 1 or activation not in (*_CLAMPS, "clip") or not native.available()[0]:
        return None
    if activation == "clip":
        low, high = (float(p) for p in node.attrs["activation_params"])
        clamp = (low, high)
    else:
        clamp = _CLAMPS[activation]
    strides, pads, dilations = node.attrs["strides"], list(node.attrs["pads"])[:2], node.attrs["dilations"]
    has_residual = len(node.inputs) > 3 and bool(node.inputs[3])
    in_place = has_residual and _residual_dies_here(node, graph)
    pool = _stem_pool(node)
    if weight.shape[1] <= native.STEM_MAX_IN_CHANNELS:  # an image's channels: the stem kernel
        if has_residual or (bf16 and not native.bf16_available()):
            return None
        # it pools (fuse_stem_pool) only in bf16 math: bf16, undilated
        if pool is not None and not (bf16 and list(dilations) == [1, 1] and pool[0] <= native.POOL_MAX_KERNEL):
            return None
        convolve = native.StemConvolution(weight, bias, strides, pads, dilations, clamp,
                                          torch.bfloat16 if bf16 else torch.float32, pool)
        return Tactic(lambda x, *unused: convolve(x), "native-stem-pool" if pool else "native-stem",
                      "bf16" if convolve.bf16_math else "fp32")
    if pool is not None:  # only stems fuse their pool
        return None
    amx = bf16 and native.amx_available() and not native.AmxConvolution.takes(weight.shape[1], strides, dilations)
    if amx:  # the tile units ran bf16 products at 4.2x fp32, AVX512-BF16 at 2.1x: past Winograd's 2.25x fewer
        convolve, name, precision = native.AmxConvolution(weight, bias, strides, pads, dilations, clamp), "native-amx", "bf16"
    elif winograd.takes(weight.shape, strides, dilations, 1) and (not bf16 or native.bf16_available()):
        dtype = torch.bfloat16 if bf16 else torch.float32
        convolve = winograd.WinogradConvolution(weight, bias, node.attrs["pads"], clamp, dtype)
        name, precision = "native-winograd", "bf16" if bf16 else "fp32"
    elif bf16 and gemm.PointwiseConvolution.takes(weight.shape, strides, node.attrs["pads"], dilations, 1, activation):
        convolve = gemm.PointwiseConvolution(weight, bias, activation, node.attrs.get("activation_params", []))
        name, precision = "native-gemm", "bf16"
    elif bf16:
        return None
    else:
        convolve, name, precision = native.DirectConvolution(weight, bias, strides, pads, dilations, clamp), "native-direct", "fp32"

    def run(x, w_unused=None, b_unused=None, residual=None):
        return convolve(x, residual if has_residual else None, in_place)

    return Tactic(run, name, precision, direct=None if has_residual else convolve,
                  product=getattr(convolve, "product", None))


# What the layers kiln's native kernels run (convolutions, bf16 products) are called in the plan's layers
NATIVE_TACTICS = {"native-direct", "native-winograd", "native-amx", "native-stem", "native-stem-pool", "native-gemm"}


# Layers whose output is a tensor of their own, never a view of an input or a buffer another value shares
_OWN_OUTPUT = {"kiln::Conv", "MaxPool"}


def _residual_dies_here(node: Node, graph: Graph) -> bool:
    """Whether a convolution may add its result into its residual input's buffer in place: the residual is made by
    a layer with an output of its own, every layer that reads it is a convolution (none returns a view of it), this
    one reads it last and only as the residual, and it is no graph input or output. ResNet's blocks: the sum lands
    in memory the block has just touched instead of a fresh buffer (oneDNN's sum post-op)."""
    residual = node.inputs[3]
    if residual in node.inputs[:3]:  # conv(t) + t: the convolution would read what it overwrites
        return False
    if residual in graph.initializers or residual in {v.name for v in graph.inputs} | set(graph.output_names()):
        return False
    producers = [n for n in graph.nodes if residual in n.outputs]
    readers = [index for index, n in enumerate(graph.nodes) if residual in n.inputs]
    if len(producers) != 1 or producers[0].op_key not in _OWN_OUTPUT or not readers:
        return False
    if any(graph.nodes[index].op_key != "kiln::Conv" for index in readers):
        return False
    return graph.nodes[readers[-1]] is node and last_uses(graph.nodes)[residual] == readers[-1]


# Below this many multiply-adds (2^23: SqueezeNet's 1x1 convolutions at batch 1, DenseNet's and Inception's at 7x7
# and 14x14) a 1x1 convolution runs faster as oneDNN's matrix product over the NHWC pixels than as its convolution,
# whose fixed cost per call is larger (a 16-channel 1x1 at 4x4 takes 80 us): alone, SqueezeNet b1's 64->16 at 55x55
# 0.107 against 0.129 ms, 384->48 at 13x13 0.108 against 0.128 ms; above it the two are within noise or the
# convolution wins (512->1000 at 13x13). Same arithmetic: the light models' outputs are bit for bit the same.
SMALL_POINTWISE_MACS = 1 << 23


def _small_pointwise(node: Node, weight, example: list[int], bf16: bool) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped fp32 convolution with at most a ReLU fused and no residual, small enough
    that its matrix product beats the convolution's call."""
    residual = len(node.inputs) > 3 and bool(node.inputs[3])
    pointwise = weight.shape[2:] == (1, 1) and list(node.attrs["strides"]) == [1, 1] and not any(node.attrs["pads"]) \
        and int(node.attrs["group"]) == 1
    activation = node.attrs.get("activation", "") in ("", "relu")
    macs = math.prod(example) * weight.shape[0]  # pixels x input channels x output channels
    return pointwise and activation and not residual and not bf16 and macs < SMALL_POINTWISE_MACS


def _conv_as_linear(weight, bias, post_op: tuple, rows: int) -> Tactic:
    """A 1x1 convolution as oneDNN's matrix product over the pixels of its NHWC input (a view, no copy), bias and
    the convolution's post-op (_post_op's) fused; the result is the NHWC (channels-last) tensor oneDNN's
    convolution would have returned."""
    import torch

    out_channels = weight.shape[0]
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.from_numpy(weight.reshape(out_channels, -1).copy()), rows)
    linear, channels_last = torch.ops.mkldnn._linear_pointwise, torch.channels_last

    def run(x, *unused):
        n, c, h, w = x.shape
        pixels = x.contiguous(memory_format=channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)
        y = linear(pixels, packed, bias, *post_op)
        return y.view(n, h, w, out_channels).permute(0, 3, 1, 2)

    return Tactic(run, "onednn-linear", "fp32")


def _gemm(node: Node, graph: Graph, bf16: bool, sizes: dict[str, int] | None = None, native: bool = True) -> Tactic | None:
    import torch

    weight = graph.initializers.get(node.inputs[1])
    if weight is None or weight.ndim != 2 or not torch.backends.mkldnn.is_available():
        return None
    bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
    if bias_name and bias_name not in graph.initializers:  # a bias computed at run time: the reference kernel takes it
        return None
    if native and bf16:
        own = _native_gemm(node, weight, graph.initializers.get(bias_name) if bias_name else None)
        if own is not None:
            return own
    dtype = torch.bfloat16 if bf16 else torch.float32
    example = _example_shape(graph, node.inputs[0], sizes)
    rows = math.prod(example[:-1]) if example else None
    w = torch.from_numpy(weight.copy()).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    bias = torch.from_numpy(graph.initializers[bias_name].copy()).to(dtype) if bias_name else None
    attr, scalars, algorithm = _post_op(node)
    linear = torch.ops.mkldnn._linear_pointwise
    if len(node.inputs) > 3 and node.inputs[3]:
        from ...ops.fused import apply_activation

        activation, params = node.attrs.get("activation", ""), node.attrs.get("activation_params", [])

        def run(x, w_unused, b_unused, residual):
            if x.dtype != dtype:
                x = x.to(dtype)
            if residual.dtype == dtype:  # oneDNN adds the residual as a post-op
                y = linear.binary(x, residual.contiguous(), packed, bias, "add")
            else:  # a bf16 product meets an fp32 residual stream: the sum stays fp32
                y = linear(x, packed, bias, "none", [], "") + residual
            return apply_activation(y, activation, params)
    else:
        def run(x, *unused):
            if x.dtype != dtype:
                x = x.to(dtype)
            return linear(x, packed, bias, attr, scalars, algorithm)

    return Tactic(run, "onednn-packed", "bf16" if bf16 else "fp32")


def _native_gemm(node: Node, weight, bias) -> Tactic | None:
    """kiln's native bf16 product (gemm.py) for a bf16 engine's kiln::Gemm: alone 0.95-1.0x oneDNN's time with the
    weights in cache and 0.85-0.91x with them in memory at BERT-base's shapes (docs/benchmarks.md); None where it does
    not take the layer (an odd reduction, an activation it lacks)."""
    activation = node.attrs.get("activation", "")
    if not gemm.takes(weight.shape, activation):
        return None
    product = gemm.Gemm(weight, bias, activation, node.attrs.get("activation_params", []))

    def run(x, w_unused=None, b_unused=None, residual=None):
        return product(x, residual)

    return Tactic(run, "native-gemm", "bf16", product=product)


def _max_pool(node: Node, graph: Graph) -> Tactic | None:
    """MaxPool with symmetric padding as torch's own padded pooling: the reference kernel pads with a copy
    first, because ONNX allows asymmetric pads; where they are symmetric the copy is wasted."""
    from ...ops.nn import resolve_pads
    from . import native

    x, y = graph.value(node.inputs[0]), graph.value(node.outputs[0])
    if not x.is_static or not y.is_static or len(x.shape) != 4 or len([o for o in node.outputs if o]) != 1:
        return None
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides") or [1, 1])
    dilations = list(node.attrs.get("dilations") or [1, 1])
    pads = resolve_pads(node.attrs.get("auto_pad", "NOTSET"), list(x.shape[2:]), kernel, strides, dilations, node.attrs.get("pads"))
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    if pads[:2] != pads[2:] or any(2 * p > k for p, k in zip(pads[:2], kernel)):
        return None
    # torch's output size rule must give the size ONNX shape inference gave, or the fallback runs
    if native.window_output_sizes(x.shape[2:], kernel, strides, dilations, pads[:2], ceil_mode) != tuple(y.shape[2:]):
        return None
    run, name = _max_pooling(kernel, strides, pads[:2], dilations, ceil_mode, x.dtype is DType.float32)
    return Tactic(run, name, "follow")


def _max_pooling(kernel, strides, padding, dilations, ceil_mode: bool, float_input: bool) -> tuple[Callable, str]:
    """(a max pool of symmetric `padding`, its tactic's name): the native kernel where the library runs and the input
    is a float tensor, for the types it has a kernel for (a bf16 engine hands it bf16), torch's pool otherwise."""
    import torch
    import torch.nn.functional as F

    from . import native

    def by_torch(x):
        return F.max_pool2d(x, kernel, strides, padding, dilations, ceil_mode=ceil_mode)

    if not (native.available()[0] and float_input):
        return by_torch, "torch-pool"
    pool = native.MaxPool(kernel, strides, padding, dilations, ceil_mode)
    native_dtypes = {torch.float32, torch.bfloat16} if native.bf16_available() else {torch.float32}

    def run(x):
        return pool(x) if x.dtype in native_dtypes else by_torch(x)

    return run, "native-pool"


def _native_follows(bf16: bool) -> bool:
    """Whether the native library runs a "follow" layer in every float type this engine hands it: fp32, and bf16 in
    a bf16 engine."""
    from . import native

    return native.available()[0] and (not bf16 or native.bf16_available())


def _covers_the_image(node: Node, spatial: list[int]) -> bool:
    """Whether an AveragePool's one window is the whole unpadded image (GoogLeNet's 7x7 average before its
    classifier): a global average pool."""
    attrs = node.attrs
    return list(attrs["kernel_shape"]) == spatial and not any(attrs.get("pads") or []) \
        and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") \
        and all(d == 1 for d in attrs.get("dilations") or [1])


def _global_average_pool(node: Node, graph: Graph, bf16: bool) -> Tactic | None:
    """GlobalAveragePool, or an AveragePool over the whole image, of a 4-D fp32 tensor (bf16 in a bf16 engine) as
    one native pass: GoogLeNet's 1024x7x7 average took torch's pool 0.75 ms in bf16."""
    import torch

    from . import native

    x = graph.value(node.inputs[0])
    if not _native_follows(bf16) or not x.is_static or len(x.shape) != 4 or not x.shape[2] * x.shape[3]:
        return None
    if node.op == "AveragePool" and (len([o for o in node.outputs if o]) != 1
                                     or not _covers_the_image(node, list(x.shape[2:]))):
        return None
    channels_last = torch.channels_last

    def run(x):
        if x.is_contiguous() and not x.is_contiguous(memory_format=channels_last):  # NCHW planes: torch's mean reads them in place
            return x.mean(dim=(2, 3), keepdim=True)
        return native.global_average_pool(x)

    return Tactic(run, "native-mean", "follow" if bf16 else "fp32")


def _average_pool(node: Node, graph: Graph, bf16: bool) -> Tactic | None:
    """A 2-D AveragePool of a 4-D fp32 tensor (bf16 in a bf16 engine) without dilation as one native pass, its
    pads (auto_pad resolved) and output size ONNX's."""
    from ...ops.nn import resolve_pads
    from . import native

    x, y = graph.value(node.inputs[0]), graph.value(node.outputs[0])
    if not _native_follows(bf16) or not x.is_static or not y.is_static or len(x.shape) != 4 \
            or len([o for o in node.outputs if o]) != 1:
        return None
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides") or [1, 1])
    if any(d != 1 for d in node.attrs.get("dilations") or [1, 1]) or len(kernel) != 2:
        return None
    pads = resolve_pads(node.attrs.get("auto_pad", "NOTSET"), list(x.shape[2:]), kernel, strides, [1, 1],
                        node.attrs.get("pads"), node.attrs.get("ceil_mode", 0))
    pool = native.AveragePool(kernel, strides, pads, bool(node.attrs.get("count_include_pad", 0)))
    output_size = tuple(y.shape[2:])
    return Tactic(lambda x: pool(x, output_size), "native-pool", "follow" if bf16 else "fp32")


def _local_response_norm(node: Node, graph: Graph, bf16: bool) -> Tactic | None:
    """LRN over a 4-D fp32 tensor (bf16 in a bf16 engine) as one native pass, where the kernel takes its beta."""
    from . import native

    x = graph.value(node.inputs[0])
    size, alpha = node.attrs["size"], node.attrs.get("alpha", 0.0001)
    beta, bias = node.attrs.get("beta", 0.75), node.attrs.get("bias", 1.0)
    if not _native_follows(bf16) or x.shape is None or len(x.shape) != 4 \
            or native.LocalResponseNorm.takes(size, alpha, beta, bias):
        return None
    return Tactic(native.LocalResponseNorm(size, alpha, beta, bias), "native-lrn", "follow" if bf16 else "fp32")


def _channel_affine(node: Node, graph: Graph, bf16: bool) -> Tactic | None:
    """A kiln::Elementwise chain that is an affine map per channel (Mul, Add, Sub, Div by constants holding one value
    per channel of axis 1, or one value) ending in at most a Relu, as one native pass: an inference
    BatchNormalization and its ReLU, DenseNet's pre-activations. torch takes two passes, and in bf16 converts in
    each: 0.45 against 0.10-0.14 ms on a bf16 256x56x56, 0.26 against 0.18-0.22 in fp32 (docs/benchmarks.md)."""
    from . import native

    x, y = graph.value(node.inputs[0]), graph.value(node.outputs[0])
    if not _native_follows(bf16) or not x.is_static or len(x.shape) < 2 or list(x.shape) != list(y.shape):
        return None
    constants = {}
    for index, name in enumerate(node.inputs[1:], start=1):
        vector = _per_channel(graph.initializers.get(name), len(x.shape), x.shape[1])
        if vector is not None:
            constants[index] = vector
    folded = fold_channel_affine(node.attrs["ops"], node.attrs["operands"], constants, x.shape[1])
    if folded is None:
        return None
    affine = native.ChannelAffine(*folded)

    def run(x, *constants_unused):  # fp32 or, in a bf16 engine, bf16: the library has both
        return affine(x)

    return Tactic(run, "native-affine", "follow" if bf16 else "fp32")


def _per_channel(array, rank: int, channels: int):
    """A float32 constant as one float64 value per channel of axis 1 (broadcast from one value), or None where it
    varies along another axis or is no float32 constant."""
    import numpy as np

    if array is None or array.dtype != np.float32 or array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,))


def fold_channel_affine(ops, operands, constants: dict, channels: int):
    """(scale, shift, clamp) of `value -> clamp(value * scale + shift)` equal to the chain, its constants composed
    in float64; None where a step is not affine in the running value with a per-channel constant (`constants`, by
    input index) or a Relu comes before the last step."""
    import numpy as np

    scale, shift, clamp = np.ones(channels), np.zeros(channels), (-math.inf, math.inf)
    for step, (op, operand) in enumerate(zip(ops, operands)):
        if op == "Relu" and step == len(ops) - 1:
            clamp = (0.0, math.inf)
            continue
        constant = constants.get(abs(operand))
        if constant is None:
            return None
        if op == "Mul":
            scale, shift = scale * constant, shift * constant
        elif op == "Add":
            shift = shift + constant
        elif op == "Sub" and operand > 0:
            shift = shift - constant
        elif op == "Sub":  # constant - value
            scale, shift = -scale, constant - shift
        elif op == "Div" and operand > 0 and constant.all():
            scale, shift = scale / constant, shift / constant
        else:
            return None
    return scale, shift, clamp


def _attention(node: Node, bf16: bool) -> Tactic:
    """softmax(q k^T * scale + mask) v: in bf16, where the shapes suit it, one native pass a head (attention.py: a
    BERT-base layer at seq 128 in 0.09 ms); otherwise a matrix product, the scaling, masking and softmax in one native
    pass (softmax.py) or in place by torch, and a second product (0.17 ms in bf16, against torch's SDPA kernel's 0.36;
    0.30 against 0.36 in fp32). A boolean mask keeps the scores where it is true (SDPA's convention)."""
    import torch

    from . import attention, softmax

    scale = float(node.attrs.get("scale", 1.0))

    def run(q, k, v, mask=None):
        if bf16:
            q, k, v = (t.to(torch.bfloat16) if t.dtype != torch.bfloat16 else t for t in (q, k, v))
            if attention.takes(q, k, v, mask):  # one native pass a head, the scores in fp32
                return attention.attention(q, k, v, mask, scale)
        # heads split out of one projection arrive as strided views: the products run faster on dense copies (BERT-base
        # b8's q k^T: bf16 0.55 -> 0.31 ms, fp32 1.38 -> 0.98, the copies 0.06-0.1)
        q, k, v = (t.contiguous() for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2))
        if softmax.takes(scores, mask):  # the mask's fp32 values as given, even in a bf16 engine
            return torch.matmul(softmax.masked_softmax_(scores, mask, scale), v)
        if bf16 and mask is not None and mask.dtype.is_floating_point:
            mask = mask.to(torch.bfloat16)
        scores.mul_(scale)
        if mask is not None:
            if torch.broadcast_shapes(scores.shape, mask.shape) != scores.shape:  # a mask wider than the scores
                scores = scores.expand(torch.broadcast_shapes(scores.shape, mask.shape)).clone()
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, -torch.inf)
            else:
                scores.add_(mask)
        return torch.matmul(torch.softmax(scores, -1), v)

    # named for the path the usual shapes take: a bf16 engine's native pass where the library has it
    name = "native-attention" if bf16 and attention.available() else "torch-attention"
    return Tactic(run, name, "bf16" if bf16 else "fp32")


# Memory-bound layers whose fp32 weights (per-channel scales and shifts, mostly) are rounded to bf16 when their
# activations arrive in bf16, so that the activation stays bf16: upcasting it instead costs a pass to fp32 here, an
# fp32 pass over twice the bytes, and the next convolution's pass back (DenseNet's 62 BatchNorm+ReLU chains).
WEIGHTS_FOLLOW_BF16 = {"kiln::Elementwise", "Add", "Sub", "Mul", "Div", "BatchNormalization", "PRelu"}
_BF16_MAX = 3.3895313892515355e38


def _weights_follow_bf16(kernel: Callable, weights: frozenset) -> Callable:
    """Where every float activation of the layer is bf16, its fp32 weights run as bf16 (rounded once, at the first
    call, and clamped to bf16's range so that a -3.4e38 mask stays finite); otherwise as _meet_in_fp32."""
    import torch

    bfloat16, float32 = torch.bfloat16, torch.float32
    rounded: dict[int, object] = {}
    mixed = _meet_in_fp32(kernel)

    def run(*args, **context):
        activations = {a.dtype for i, a in enumerate(args)
                       if i not in weights and isinstance(a, torch.Tensor) and a.dtype in (bfloat16, float32)}
        if activations != {bfloat16}:
            return mixed(*args, **context)
        args = list(args)
        for i in weights:
            if i < len(args) and isinstance(args[i], torch.Tensor) and args[i].dtype == float32:
                if i not in rounded or rounded[i][0] is not args[i]:
                    rounded[i] = (args[i], args[i].clamp(-_BF16_MAX, _BF16_MAX).to(bfloat16))
                args[i] = rounded[i][1]
        return kernel(*args, **context)

    return run


def _meet_in_fp32(kernel: Callable) -> Callable:
    """Where bf16 and fp32 tensors meet in a reference layer, compute in fp32; otherwise as given."""
    import torch

    bfloat16, float32 = torch.bfloat16, torch.float32

    def run(*args, **context):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (bfloat16, float32)}
        if len(dtypes) == 2:
            args = tuple(a.to(float32) if isinstance(a, torch.Tensor) and a.dtype == bfloat16 else a for a in args)
        return kernel(*args, **context)

    return run


def lower(plan, profile: int = 0, shares=None):
    """The CPU program for `plan`, each layer bound to its fastest tactic for optimization profile `profile`'s opt
    shapes; per-layer choices in `program.layer_info` (precision and tactic, which the builder records in plan.layers).
    `shares`, the program of another profile, lends it the weights no tactic packs."""
    import torch

    from . import select
    from .concat import fill_in_place
    from .program import CpuProgram

    from .heap import keep_for_plan

    graph = plan.graph
    keep_for_plan(getattr(plan, "memory", None) or {})  # before the race below, which times runs as they will be
    bf16 = bool(plan.config.get("bf16")) and plan.config.get("device", "cpu") == "cpu"
    if bf16:
        check_bf16()
    from ...engine.profiles import symbol_sizes

    # tuned at the profile's opt shapes, as TensorRT tunes each profile at its opt
    profiles = getattr(plan, "profiles", None)  # a bare graph to lower (tests) has none
    opt = symbol_sizes([graph.value(v.name) for v in graph.inputs], profiles[profile], "opt") if profiles else {}

    # a loaded engine follows the tactic its build chose for each convolution; a build decides by timing (select.py)
    recorded = {name: info.get("tactic") for name, info in (getattr(plan, "layers", None) or {}).items()}
    keep_onednn = {name for name, tactic in recorded.items() if tactic in ONEDNN_TACTICS}
    constants = shares.constants if shares is not None else None

    def program_with(onednn: set[str], chosen: dict[int, Tactic], reuse: dict[int, Tactic] | None = None):
        """A program whose convolutions in `onednn` stay on oneDNN; layers in `reuse` keep that tactic (already
        packed) instead of being chosen again."""
        def kernel_for(node: Node):
            tactic = (reuse or {}).get(id(node)) or choose(node, graph, bf16, opt, native=node.name not in onednn)
            chosen[id(node)] = tactic
            return tactic.run

        with torch.inference_mode():
            return CpuProgram(graph, kernel_for=kernel_for, constants=constants)

    chosen: dict[int, Tactic] = {}
    program = program_with(keep_onednn, chosen)
    constants = program.constants  # the second program, if any, shares the first one's weights
    undecided = [node.name for node in graph.nodes
                 if chosen[id(node)].name in NATIVE_TACTICS and recorded.get(node.name) != chosen[id(node)].name]
    feed = select.timing_feed(graph, opt) if undecided else None
    if feed is not None:
        onednn_chosen: dict[int, Tactic] = {}
        # only the undecided convolutions are packed again, for oneDNN; every other layer lends its tactic
        settled = {id(node): chosen[id(node)] for node in graph.nodes if node.name not in set(undecided)}
        onednn = program_with(keep_onednn | set(undecided), onednn_chosen, reuse=settled)
        # each layer timed as it will run: writing into its concatenation's buffer where it can (a oneDNN 1x1 that
        # cannot write a slice itself copies its output there)
        per_layer = select.fastest({select.NATIVE: _with_chains_in_place(program, chosen),
                                    select.ONEDNN: _with_chains_in_place(onednn, onednn_chosen)},
                                   feed, undecided)  # per-layer times read on_step, which never replays: no replay
        use_onednn = set()
        if per_layer is not None:  # else the random feed cannot run the model: keep the rule's choice
            use_onednn = {name for name, key in per_layer.items() if key == select.ONEDNN}
            candidates = {select.NATIVE: (program, chosen), select.ONEDNN: (onednn, onednn_chosen)}
            if use_onednn and len(use_onednn) < len(undecided):
                mixed = copy.copy(program)
                mixed.steps = [onednn.steps[i] if node.name in use_onednn else step
                               for i, (node, step) in enumerate(zip(graph.nodes, program.steps))]
                candidates[select.MIXED] = (mixed, {id(node): (onednn_chosen if node.name in use_onednn else chosen)[id(node)]
                                                    for node in graph.nodes})
            # each engine timed as it would be built: with its concatenation chains in place (without them, the
            # native engine of SqueezeNet b8 ran 0.96-1.03x oneDNN's in the race against 0.87x as built)
            winner = select.fastest_engine({key: _as_built(candidate, tactics, _activation_bytes(plan))
                                            for key, (candidate, tactics) in candidates.items()}, feed)
            use_onednn = {select.NATIVE: set(), select.ONEDNN: set(undecided), select.MIXED: use_onednn}[winner]
        for index, node in enumerate(graph.nodes):
            if node.name in use_onednn:
                program.steps[index] = onednn.steps[index]
                chosen[id(node)] = onednn_chosen[id(node)]
    program.layer_info = {node.name: {"precision": chosen[id(node)].precision, "tactic": chosen[id(node)].name}
                          for node in graph.nodes if id(node) in chosen}
    gemm.prefetch_in_turn([chosen[id(node)].product for node in graph.nodes
                           if id(node) in chosen and chosen[id(node)].product is not None])
    for name in fill_in_place(program, _direct_writers(graph, chosen)):
        program.layer_info[name]["tactic"] = "native-in-place"
    replay.install(program, _activation_bytes(plan))
    if bf16:
        _deliver_fp32(program, [v.name for v in graph.outputs if graph.value(v.name).dtype is DType.float32])
    return program


def _direct_writers(graph: Graph, tactics: dict[int, Tactic]) -> dict[str, object]:
    """The native convolutions among `tactics` (node id -> Tactic) that can write into a concatenation's slice."""
    return {node.name: tactics[id(node)].direct for node in graph.nodes if tactics[id(node)].direct is not None}


def _with_chains_in_place(program, tactics: dict[int, Tactic]):
    """A copy of `program` (its steps copied, everything else shared) with its concatenation chains in one buffer
    each, as the lowering builds the chosen one."""
    from .concat import fill_in_place

    built = copy.copy(program)
    built.steps = [copy.copy(step) for step in program.steps]
    fill_in_place(built, _direct_writers(program.graph, tactics))
    return built


def _as_built(program, tactics: dict[int, Tactic], activation_bytes: int):
    """`program` as the lowering builds the chosen one: its chains in place and its native layers replayed."""
    built = _with_chains_in_place(program, tactics)
    replay.install(built, activation_bytes)
    return built


def _activation_bytes(plan) -> int:
    """The naive sum of the plan's activations (what a replay's recorded run keeps), 0 where it has no memory plan."""
    return int((getattr(plan, "memory", None) or {}).get("naive_bytes", 0))


def _deliver_fp32(program, names: list[str]) -> None:
    """Outputs the model declares fp32 leave a bf16 engine as fp32, as its bindings promise."""
    import torch

    inner = program.execute

    def execute(feed, *args, **kwargs):
        results = inner(feed, *args, **kwargs)
        for name in names:
            if results[name].dtype == torch.bfloat16:
                results[name] = results[name].float()
        return results

    program.execute = execute
