"""INT8 and FP8 tactics for the GPU: the candidates of kiln::QGemm / kiln::QConv steps (kiln/quant writes them) and
the fp8 candidates of matrix layers, which kiln/backends/cuda/lowering.py times against the float ones.

- int8 matrix layers: torch._int_mm (int8 x int8 -> int32 on the tensor cores, cuBLASLt) between a quantize
  pass and a dequantize epilogue (per-tensor input scale x per-channel weight scale, bias, residual,
  activation; torch ops or one Triton pass each), or kiln's Triton int8 GEMM doing all three in one kernel;
- int8 convolutions: 1x1 ones as that int8 GEMM over channels-last pixels (stride 2 by sampling first), any
  ungrouped one as kiln's Triton implicit-GEMM int8 kernel (kiln/backends/cuda/int8_kernels.py). A grouped
  convolution has no int8 tactic: it runs its float tactics, and the build log says so, as TensorRT's does;
- the int8 hand-off: in an engine lowered with it, a convolution whose output only such convolutions read
  (handoff_scales) writes it in int8 in their input scale, and they read it as it is (Triton kernels only, on
  both sides). The gain is the readers' (int8 loads go straight to shared memory) and half the bytes moved, so
  no one layer's timing can choose it: the lowering times the whole engine with it and without, and keeps the
  faster;
- fp8 e4m3 (compute capability 8.9+): torch._scaled_mm with per-tensor scales (the weight's |max|, the
  input's calibrated |max|) passed to the kernel, so dequantization and bias happen inside the GEMM.

Every int8 layer also keeps float candidates ("fallback-..." tactics, in the build's float precisions, on its
int8 weights dequantized): int8 is allowed, not forced, unless --precisionConstraints obey pins the layer.
Weights are prepared once at lowering. torch is imported inside functions, and CUDA is only touched when a
kernel runs, so importing this module needs no GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ... import log
from ...errors import PrecisionError
from ...ir import Node
from ..tactics import Candidate

FP8_MAX = 448.0  # largest finite float8 e4m3fn


def fp8_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@dataclass
class Int8Linear:
    """y = activation((quant(x) @ Wq^T) * (x_scale * w_scale) + b): Wq int8 [N, K] kept as [K, N]."""

    weight_t: Any  # int8 [K, N]
    scale: Any  # float32 [N]: x_scale * w_scale, folded once
    bias: Any  # float32 [N] or None
    x_scale: float
    activation: str = ""
    activation_params: tuple = ()

    out_dtype: Any = None  # the engine's activation dtype; None for float32
    triton: bool = False  # quantize and dequantize in one Triton pass each, instead of torch's elementwise ops

    @classmethod
    def prepare(cls, wq, w_scale, bias, x_scale: float, activation: str = "", activation_params=(), device="cuda",
                out_dtype=None, triton: bool = False):
        return cls(wq.t().contiguous().to(device), (w_scale.float() * x_scale).to(device),
                   None if bias is None else bias.float().to(device), float(x_scale), activation, tuple(activation_params),
                   out_dtype, triton)

    def __call__(self, x, residual=None):
        import torch

        from ...ops.fused import apply_activation
        from ...ops.quantize import int_matmul, quantize_activation

        rows, out_features = math.prod(x.shape[:-1]), self.weight_t.shape[1]
        out_dtype = self.out_dtype or torch.float32
        if self.triton:
            from .int8_kernels import dequantize, quantize

            xq = quantize(x, self.x_scale).reshape(rows, x.shape[-1])
            flat = None if residual is None else residual.reshape(rows, out_features).contiguous()
            y = dequantize(int_matmul(xq, self.weight_t), self.scale, self.bias, flat, self.activation, out_dtype)
            return y.reshape(*x.shape[:-1], out_features)
        xq = quantize_activation(x, self.x_scale).reshape(rows, x.shape[-1])
        y = int_matmul(xq, self.weight_t).float().mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        y = y.reshape(*x.shape[:-1], out_features)
        if residual is not None:
            y.add_(residual)
        return apply_activation(y, self.activation, self.activation_params).to(out_dtype)


@dataclass
class Fp8Linear:
    """y = (fp8(x / x_scale) @ fp8(W / w_scale)^T) * x_scale * w_scale + b, per-tensor scales, e4m3."""

    weight_t: Any  # float8_e4m3fn [K, N] (column-major view of [N, K], as _scaled_mm wants its second operand)
    w_scale: Any  # float32 scalar tensor
    x_scale: Any  # float32 scalar tensor
    bias: Any
    out_features: int
    activation: str = ""
    activation_params: tuple = ()
    out_dtype: Any = None  # the engine's activation dtype; None for float32

    @classmethod
    def prepare(cls, weight, bias, x_amax: float, device="cuda", activation: str = "", activation_params=(), out_dtype=None):
        """From the fp32 weight [N, K] and the input's calibrated |x| maximum."""
        import torch
        import torch.nn.functional as F

        weight = weight.float()
        n, k = weight.shape
        w_scale = weight.abs().max().clamp(min=1e-12) / FP8_MAX
        padded = F.pad(weight / w_scale, (0, (-k) % 16, 0, (-n) % 16))
        weight_fp8 = padded.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        x_scale = torch.tensor(max(x_amax, 1e-12) / FP8_MAX)
        padded_bias = None if bias is None else F.pad(bias.float(), (0, (-n) % 16))
        return cls(weight_fp8.to(device).t(), w_scale.to(device), x_scale.to(device),
                   None if padded_bias is None else padded_bias.to(device), n, activation, tuple(activation_params), out_dtype)

    def __call__(self, x, residual=None):
        import torch
        import torch.nn.functional as F

        from ...ops.fused import apply_activation

        rows, k = math.prod(x.shape[:-1]), x.shape[-1]
        flat = (x.reshape(rows, k).float() / self.x_scale).clamp(-FP8_MAX, FP8_MAX)
        flat = F.pad(flat, (0, (-k) % 16, 0, (-rows) % 16)).to(torch.float8_e4m3fn)
        # the bias joins inside the kernel, which allows it with a half output (not with fp32)
        half = self.out_dtype if self.out_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(half)
        y = torch._scaled_mm(flat, self.weight_t, bias=bias, scale_a=self.x_scale, scale_b=self.w_scale, out_dtype=half)
        y = y[:rows, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        if residual is not None:
            y = y + residual.to(half)
        y = apply_activation(y, self.activation, self.activation_params)
        return y.to(self.out_dtype or torch.float32)


# -- candidates ------------------------------------------------------------------------------------------------

def dequantized(wq, w_scale):
    """The int8 weight in float32 (per-channel scales applied): what the float fallbacks compute with."""
    return wq.float() * w_scale.float().reshape(-1, *([1] * (wq.dim() - 1)))


def int8_candidates(node: Node, wq, w_scale, bias, precisions: list[str], flow, pinned: bool, fp8: bool,
                    out_scale: float | None = None, int8_input: bool = False,
                    residual_scale: float | None = None, pixels: int | None = None) -> list[Candidate]:
    """Candidates of a kiln::QGemm / kiln::QConv step: its int8 tactics, and unless the layer is pinned to int8
    (obey), its float tactics as fallbacks and, with --fp8, its fp8 ones. Called with the step's inputs
    (X, Wq, Ws, B?, R?); float weights, bias and scales come prepared from the graph's fp32 initializers.

    The int8 hand-off (handoff_scales), in an engine lowered with it: with out_scale, the convolution writes its
    output in int8 in that scale (its readers' input scale); int8_input: its X arrives so; residual_scale: its
    residual arrives in int8, in that scale. Each way only kiln's Triton kernels, which do all three, are offered.
    pixels: how many output pixels the convolution makes (batch x height x width), where the engine's shapes fix it."""
    from . import candidates as cands

    x_scale = float(node.attrs["x_scale"])
    has_residual = len(node.inputs) > 4 and bool(node.inputs[4])
    conv = node.op == "QConv"
    if out_scale is not None or int8_input or residual_scale is not None:
        return _triton_int8_conv(node, wq, w_scale, bias, x_scale, flow, out_scale, int8_input, residual_scale, pixels)
    found = _int8_conv(node, wq, w_scale, bias, x_scale, flow, pixels) if conv else \
        _int8_gemm(node, wq, w_scale, bias, x_scale, flow)
    if pinned:
        if not found:
            raise PrecisionError(f"layer {node.name!r} ({node.op_key}) has no int8 tactic on CUDA, but obey asks for int8",
                                 code="KILN-E301", where=node.describe(),
                                 hint="int8 runs matrix layers and ungrouped 2-D convolutions on CUDA (with triton); use "
                                      "--precisionConstraints prefer to let this layer fall back to fp16")
        return found
    # the float twin of the layer (kiln::Conv / kiln::Gemm on the dequantized weight): its tactics and its reference
    twin = node.replace(op=node.op[1:], inputs=(node.inputs[0], "", node.inputs[3] if len(node.inputs) > 3 else "",
                                                 node.inputs[4] if has_residual else ""),
                        attrs={k: v for k, v in node.attrs.items() if k not in ("x_scale", "x_amax")})
    weight = dequantized(wq, w_scale)
    if conv:
        floats = cands.conv_candidates(twin, weight, bias, precisions, flow)
    else:
        floats = cands.gemm_candidates(twin, weight, bias, precisions, flow)
    reference = _float_reference(twin, weight, bias, residual_at=4)
    found += [Candidate(f"fallback-{c.name}", c.precision, _from_quantized_args(c.run), reference=reference) for c in floats]
    if fp8 and not conv:
        amax = float(node.attrs.get("x_amax") or x_scale * 127.0)
        found += [Candidate(c.name, c.precision, _from_quantized_args(c.run), reference=reference)
                  for c in fp8_candidates(twin, weight, bias, amax, flow)]
    return found


def fp8_candidates(node: Node, weight, bias, x_amax: float, flow) -> list[Candidate]:
    """torch._scaled_mm in e4m3 for a kiln::Gemm step (x, W, B?, R?), per-tensor scales from the weight's |max| and
    the input's calibrated |max|. Checked against the layer in fp32 (see TOLERANCE['fp8'])."""
    activation, params = node.attrs.get("activation", ""), tuple(node.attrs.get("activation_params", ()))
    layer = Fp8Linear.prepare(weight, bias, x_amax, device=weight.device, activation=activation,
                              activation_params=params, out_dtype=flow)

    def run(x, w_unused=None, b_unused=None, residual=None):
        return layer(x, residual)

    return [Candidate("fp8-cublaslt", "fp8", run, reference=_float_reference(node, weight, bias, residual_at=3))]


def explain(node: Node, chosen: Candidate, offered: list[Candidate], record: dict) -> None:
    """Say in the build log why an int8 layer does not run int8 on this GPU."""
    if chosen.precision == "int8":
        return
    int8 = [c.key for c in offered if c.precision == "int8"]
    times = record.get("times_ms", {})
    if not int8:
        log.info("int8: layer %s (%s) has no int8 tactic on CUDA; it runs %s (%s)", node.name, _shape_words(node),
                 chosen.precision, chosen.name)
        return
    fastest = min((times[k] for k in int8 if k in times), default=None)
    why = f"faster than its int8 tactics ({times.get(chosen.key, float('nan')):.4f} ms vs {fastest:.4f} ms)" \
        if fastest is not None else f"its int8 tactics were rejected: {record.get('rejected', {})}"
    log.info("int8: layer %s runs %s (%s): %s", node.name, chosen.precision, chosen.name, why)


def _shape_words(node: Node) -> str:
    if node.op != "QConv":
        return "matrix layer"
    kernel = "x".join(str(k) for k in node.attrs.get("kernel_shape") or [])
    group = int(node.attrs.get("group", 1))
    return f"{kernel} convolution" + (f", {group} groups" if group > 1 else "")


def _int8_gemm(node: Node, wq, w_scale, bias, x_scale: float, flow) -> list[Candidate]:
    from .candidates import triton_available

    activation, params = node.attrs.get("activation", ""), tuple(node.attrs.get("activation_params", ()))
    found = []
    variants = [("int8-cublaslt", False)] + ([("int8-cublaslt+triton", True)] if _triton_epilogue(activation) else [])
    for name, fused in variants:
        layer = Int8Linear.prepare(wq, w_scale, bias, x_scale, activation, params, device=wq.device, out_dtype=flow,
                                   triton=fused)
        found.append(Candidate(name, "int8", lambda x, wq_=None, ws_=None, b_=None, residual=None, layer=layer: layer(x, residual)))
    if triton_available() and _triton_epilogue(activation):
        from .int8_kernels import CONV_CONFIGS, gemm_int8

        weight_nk, scale = wq.contiguous(), (w_scale.float() * x_scale).contiguous()
        fp32_bias = None if bias is None else bias.float().contiguous()
        for config in CONV_CONFIGS:
            def run(x, wq_=None, ws_=None, b_=None, residual=None, config=config):
                return gemm_int8(x, weight_nk, scale, fp32_bias, residual, x_scale, activation, flow, config)

            found.append(Candidate(f"triton-int8-gemm-{_blocks(config)}", "int8", run, compile_ahead=True))
    return found


def _int8_conv(node: Node, wq, w_scale, bias, x_scale: float, flow, pixels: int | None = None) -> list[Candidate]:
    pads = list(node.attrs.get("pads") or [0, 0, 0, 0])
    strides = list(node.attrs["strides"])
    group, activation = int(node.attrs.get("group", 1)), node.attrs.get("activation", "")
    params = tuple(node.attrs.get("activation_params", ()))
    if wq.dim() != 4 or group != 1 or pads[:2] != pads[2:]:
        return []
    found = []
    out_channels, channels = wq.shape[:2]
    if tuple(wq.shape[2:]) == (1, 1) and not any(pads):
        for name, fused in [("int8-cublaslt-1x1", False)] + ([("int8-cublaslt-1x1+triton", True)] if _triton_epilogue(activation) else []):
            layer = Int8Linear.prepare(wq.reshape(out_channels, channels), w_scale, bias, x_scale, activation, params,
                                       device=wq.device, out_dtype=flow, triton=fused)
            found.append(Candidate(name, "int8", _pointwise(layer, strides)))
    return found + _triton_int8_conv(node, wq, w_scale, bias, x_scale, flow, pixels=pixels)


def triton_conv_applies(node: Node) -> bool:
    """kiln's Triton int8 convolution runs this kiln::QConv: 2-D, ungrouped, symmetric pads, an epilogue it has."""
    pads = list(node.attrs.get("pads") or [0, 0, 0, 0])
    return (node.op_key == "kiln::QConv" and len(node.attrs.get("kernel_shape") or ()) == 2
            and int(node.attrs.get("group", 1)) == 1 and pads[:2] == pads[2:]
            and _triton_epilogue(node.attrs.get("activation", "")))


def _triton_int8_conv(node: Node, wq, w_scale, bias, x_scale: float, flow, out_scale: float | None = None,
                      int8_input: bool = False, residual_scale: float | None = None,
                      pixels: int | None = None) -> list[Candidate]:
    """kiln's Triton int8 convolutions (int8_kernels.conv_kernels) in each block configuration. With out_scale they
    write int8 in that scale ("-int8-out" tactics); int8_input: X is int8 already; residual_scale: so is the
    residual, in that scale.
    On the hand-off each candidate is checked against the layer's own int8 arithmetic (kiln::QConv's reference)
    on the dequantized inputs, quantized like the output."""
    from .candidates import triton_available

    if not (triton_available() and wq.dim() == 4 and triton_conv_applies(node)):
        return []
    import torch

    from .int8_kernels import conv_kernels

    out_channels = wq.shape[0]
    pads, strides, dilations = list(node.attrs.get("pads") or [0, 0, 0, 0]), list(node.attrs["strides"]), list(node.attrs["dilations"])
    activation = node.attrs.get("activation", "")
    scale = (w_scale.float() * x_scale).contiguous()
    fp32_bias = None if bias is None else bias.float().contiguous()
    weight_nk = wq.permute(0, 2, 3, 1).reshape(out_channels, -1).contiguous()
    geometry = (tuple(wq.shape[2:]), tuple(strides), tuple(pads[:2]), tuple(dilations))
    handed = out_scale is not None or int8_input or residual_scale is not None
    reference = _int8_reference(node, wq, w_scale, bias, x_scale, out_scale, int8_input, residual_scale) if handed else None
    suffix = "-int8-out" if out_scale is not None else ""
    found = []
    out_dtype = torch.int8 if out_scale is not None else flow
    for kind, config, kernel in conv_kernels(wq.shape[1], out_channels, geometry, int8_input, out_dtype, pixels):
        def run(x, wq_=None, ws_=None, b_=None, residual=None, config=config, kernel=kernel):
            return kernel(x, weight_nk, scale, fp32_bias, residual, x_scale, geometry, activation, flow, config,
                          out_scale, residual_scale)

        found.append(Candidate(f"triton-int8-{kind}-{_blocks(config)}{suffix}", "int8", run, reference=reference,
                               compile_ahead=True))
    return found


def _int8_reference(node: Node, wq, w_scale, bias, x_scale: float, out_scale: float | None, int8_input: bool,
                    residual_scale: float | None = None):
    """kiln::QConv's reference on the step's inputs, its int8 input dequantized first (which the reference's own
    quantization gives back exactly), an int8 residual dequantized by residual_scale, its output quantized into
    out_scale (as float: compared value for value)."""
    from ...ops.quantize import qconv, quantize_activation
    from .candidates import fp32_reference

    attrs = {k: node.attrs[k] for k in ("dilations", "group", "kernel_shape", "pads", "strides", "activation",
                                        "activation_params") if k in node.attrs}
    b = None if bias is None else bias.float()

    def reference(x, wq_=None, ws_=None, b_=None, residual=None):
        x = x.float() * x_scale if int8_input else x.float()
        if residual is not None:
            residual = residual.float() * residual_scale if residual_scale is not None else residual.float()
        with fp32_reference():
            y = qconv(x, wq, w_scale.float(), b, residual, x_scale=x_scale, **attrs)
        return y if out_scale is None else quantize_activation(y, out_scale).float()

    return reference


# A convolution whose input cannot reach it in int8 (a graph input, or made by a layer that is not on the hand-off)
# stays off the int8 hand-off when its fastest Triton int8 kernel, timed in the engine without the hand-off, is more
# than this many times its fastest tactic: the hand-off would commit it to that kernel on the same fp16 input. The
# margin is wide because the hand-off still saves its output's bytes. ResNet-50's 3-channel stem at batch 128 is 3.6
# times cuDNN's (1.02 against 0.28 ms). A convolution whose input would arrive in int8 is not judged on that timing:
# quantizing its fp16 input as it loads, it overstates the hand-off's kernel by 1.0-2.5 times (benchmarks/int8_conv.py,
# b128, H200), and leaving such layers out (the 3x3s of layers 1-2, whose int8 time on fp16 input is 2.6 times cuDNN's)
# broke the hand-off into pieces that lost to the per-layer choice (H200 run 15, b128: 3.659 against 3.373 ms).
HANDOFF_MARGIN = 2.0


def slow_int8_layers(layer_info: dict, nodes: list[Node], outputs: set[str]) -> frozenset[str]:
    """Of the Triton-runnable convolutions in a lowering without the hand-off (their layer_info), those with no Triton
    int8 kernel that ran, and those whose input would not reach them in int8 (handoff_scales) and whose Triton int8
    kernels lose to their other tactics by more than HANDOFF_MARGIN: handoff_scales' `slow`. Leaving one out can stop
    its readers' inputs arriving in int8, so they are judged again until nothing changes."""
    inputs = {node.name: node.inputs[0] for node in nodes if node.inputs}
    slow = set()
    while True:
        handed = handoff_scales(nodes, outputs, frozenset(slow))
        found = {name for name, info in layer_info.items() if name not in slow
                 and _slow_int8(info.get("times_ms") or {}, inputs.get(name) in handed)}
        if not found:
            return frozenset(slow)
        slow |= found


def _slow_int8(times: dict, int8_input: bool) -> bool:
    """Whether a layer with these tactic times (ms) stays off the hand-off (slow_int8_layers)."""
    if not times:
        return False
    triton = [ms for key, ms in times.items() if key.startswith("triton-int8")]
    return not triton or (not int8_input and min(triton) > HANDOFF_MARGIN * min(times.values()))


def handoff_scales(nodes: list[Node], outputs: set[str], slow: frozenset[str] = frozenset()) -> dict[str, float]:
    """Tensors an int8 engine may hand from layer to layer in int8: each made by a kiln::QConv that kiln's Triton
    kernel runs, and read only by such layers, as their input X (all in one input scale, at least one) or their
    residual, and not a graph output; or read only by a plain MaxPool whose output is such a tensor (the pool
    then runs on the int8 values: the maximum commutes with rounding to int8, as in TensorRT's int8 pooling).
    Maps each to that scale, in which its producer may quantize in its epilogue: half the bytes written and
    read, and the readers' loads of X go straight to shared memory. `slow` names convolutions whose Triton int8
    kernels lose to their other tactics (slow_int8_layers): the hand-off would commit them to those kernels, so
    no tensor they make or read is handed on."""
    from .candidates import plain_maxpool

    def runs_triton(node: Node) -> bool:
        return triton_conv_applies(node) and node.name not in slow

    readers: dict[str, list[tuple[Node, int]]] = {}
    for node in nodes:
        for position, name in enumerate(node.inputs):
            if name:
                readers.setdefault(name, []).append((node, position))

    def input_scale(tensor: str) -> float | None:
        """The one input scale of the Triton int8 convolutions that alone read `tensor`, or None."""
        uses = readers.get(tensor, [])
        if tensor in outputs or not uses or not all(position in (0, 4) and runs_triton(reader) for reader, position in uses):
            return None
        found = {float(reader.attrs["x_scale"]) for reader, position in uses if position == 0}
        return found.pop() if len(found) == 1 else None

    scales = {}
    for node in nodes:
        if not runs_triton(node) or not node.outputs or node.outputs[0] in outputs:
            continue
        made = node.outputs[0]
        scale = input_scale(made)
        if scale is not None:
            scales[made] = scale
            continue
        uses = readers.get(made, [])
        if len(uses) == 1 and uses[0][1] == 0 and plain_maxpool(uses[0][0]):  # through a max pool
            pooled = uses[0][0].outputs[0]
            scale = input_scale(pooled)
            if scale is not None:
                scales[made] = scales[pooled] = scale
    return scales


def _blocks(config) -> str:
    """A Triton configuration as a tactic name shows it: BLOCK_M x BLOCK_N x BLOCK_K, -w8 for 8 warps (4 unsaid), and
    its splits. Unique within each list of configurations (two 128x128x64 ones differ in warps)."""
    warps = f"-w{config[3]}" if config[3] != 4 else ""
    return "x".join(str(size) for size in config[:3]) + warps + (f"-split{config[5]}" if len(config) > 5 else "")


def pointwise_rows(x, strides):
    """A 1x1 convolution's input as a matrix of pixels: [N * H' * W', C], channels-last (a view when x already is),
    H' and W' sampled by the stride."""
    import torch

    if strides[0] > 1 or strides[1] > 1:
        x = x[:, :, ::strides[0], ::strides[1]]
    x = x.contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch * height * width, channels), (batch, height, width)


def _pointwise(layer: Int8Linear, strides):
    """A 1x1 convolution through an int8 matrix layer: pixels as rows; the result is NCHW channels-last."""
    import torch

    def run(x, wq_=None, ws_=None, b_=None, residual=None):
        rows, (batch, height, width) = pointwise_rows(x, strides)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        y = layer(rows, None if residual is None else residual.reshape(rows.shape[0], -1))
        return y.reshape(batch, height, width, -1).permute(0, 3, 1, 2)

    return run


def _triton_epilogue(activation: str) -> bool:
    return activation in ("", "relu", "gelu", "gelu_tanh", "silu", "sigmoid")


def _from_quantized_args(run):
    """A float tactic of the twin layer (x, W, B, R), called with the int8 step's inputs (x, Wq, Ws, B, R)."""
    def call(x, wq_=None, ws_=None, b_=None, residual=None):
        return run(x, None, None, residual)

    return call


def _float_reference(twin: Node, weight, bias, residual_at: int):
    """The layer in fp32 on the GPU (tf32 off), from the step's inputs (its residual at position `residual_at`):
    what a fallback or fp8 tactic is held to."""
    from ...ops.fused import conv, gemm
    from .candidates import fp32_reference

    attrs = {k: v for k, v in twin.attrs.items() if k in ("activation", "activation_params")}
    if twin.op == "Conv":
        attrs.update({k: twin.attrs[k] for k in ("dilations", "group", "kernel_shape", "pads", "strides") if k in twin.attrs})
    kernel = conv if twin.op == "Conv" else gemm
    b = None if bias is None else bias.float()

    def reference(*args):
        residual = args[residual_at] if len(args) > residual_at else None
        with fp32_reference():
            return kernel(args[0].float(), weight, b, None if residual is None else residual.float(), **attrs)

    return reference
