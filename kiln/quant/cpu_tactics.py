"""CPU tactics for kiln's int8 layers: kiln::QConv on oneDNN's int8 convolution (weights prepacked once, AMX-INT8 /
VNNI), kiln::QGemm on torch._int_mm. Where oneDNN's int8 convolution is unavailable, or inexact on this CPU
(exact_int8_dot_products), the reference kernel runs.

oneDNN takes uint8 activations: kiln's symmetric int8 value q is handed over as q + 128 with zero point 128, the
same numbers, and dequantizes the int32 sums with x_scale * w_scale[channel] before adding the fp32 bias.
"""
from __future__ import annotations

import functools
from typing import Callable

from .. import log
from ..engine import target
from ..ir import Graph, Node

_POST_OPS = {"": "none", "relu": "relu"}  # activations oneDNN fuses here; others run after the convolution


def int8_tactic(node: Node, graph: Graph, reference: Callable) -> tuple[Callable, str]:
    """(callable, tactic name) for a kiln::QConv / kiln::QGemm node."""
    if node.op == "QConv" and exact_int8_dot_products():
        fast = _onednn_conv(node, graph)
        if fast is not None:
            return fast, "onednn-int8"
    return reference, "torch-int8"


def exact_int8_dot_products() -> bool:
    """Whether oneDNN's int8 convolution sums this CPU's u8 x s8 products exactly: with VNNI (AVX512-VNNI, AVX-VNNI)
    or AMX-INT8. Without them its AVX2 kernels add products in pairs into saturating 16-bit lanes (vpmaddubsw),
    so sums clip: on an AVX2-only CPU here the digits CNN's int8 logits moved 7% from the exact int8 result's.
    kiln then runs its reference int8 kernel (exact, slower) and the build log says so, once per process."""
    exact = bool(target.cpu_features() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if not exact:
        _say_inexact()
    return exact


@functools.cache
def _say_inexact() -> None:
    log.info("this CPU has no VNNI or AMX-INT8, where oneDNN's int8 convolution saturates 16-bit partial sums: int8 "
             "convolutions run kiln's exact reference kernel, which is slower than fp32 (build without --int8 for speed)")


def _onednn_conv(node: Node, graph: Graph) -> Callable | None:
    import torch

    from ..ops.fused import apply_activation

    weight, scales = (graph.initializers.get(name) for name in node.inputs[1:3])
    pads = list(node.attrs.get("pads") or [0, 0, 0, 0])
    shape = graph.value(node.inputs[0]).shape
    if (weight is None or scales is None or weight.ndim != 4 or pads[:2] != pads[2:] or shape is None or len(shape) != 4
            or not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qconv_prepack")):
        return None
    example = [d if isinstance(d, int) else 1 for d in shape]
    stride, dilation = list(node.attrs["strides"]), list(node.attrs["dilations"])
    padding, groups = pads[:2], int(node.attrs["group"])
    x_scale = float(node.attrs["x_scale"])
    w_scale = torch.from_numpy(scales.copy()).float()
    try:
        packed = torch.ops.onednn.qconv_prepack(torch.from_numpy(weight.copy()), w_scale, x_scale, 128, stride, padding,
                                                dilation, groups, example)
    except RuntimeError:
        return None
    zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
    bias_name = node.inputs[3] if len(node.inputs) > 3 else ""
    bias = torch.from_numpy(graph.initializers[bias_name].copy()).float() if bias_name in graph.initializers else None
    has_residual = len(node.inputs) > 4 and bool(node.inputs[4])
    activation, params = node.attrs.get("activation", ""), node.attrs.get("activation_params", ())
    fused = _POST_OPS.get(activation) if not has_residual else None
    convolve = torch.ops.onednn.qconv_pointwise
    inverse = 1.0 / x_scale

    def run(x, wq_unused, ws_unused, b=None, residual=None):
        x = x.float() if x.dtype != torch.float32 else x
        xq = torch.clamp(torch.round(x * inverse), -128, 127).add_(128).to(torch.uint8)
        xq = xq.contiguous(memory_format=torch.channels_last)
        y = convolve(xq, x_scale, 128, packed, w_scale, zero_points, bias if b is not None else None, stride, padding,
                     dilation, groups, 1.0, 0, torch.float32, fused or "none", [], "")
        if residual is not None:
            y = y.add_(residual)
        return y if fused else apply_activation(y, activation, params)

    return run
