"""The candidate implementations of each step on the GPU: cuDNN convolutions in NCHW or channels-last,
cuBLAS / cuBLASLt matrix products with their epilogue in torch, in cuBLASLt or in a kiln Triton kernel,
torch's fused attention backends and kiln's Triton flash attention, Triton LayerNorm, Softmax and
elementwise chains, each in every precision the build allows. Every other step runs its registry
kernel (plain torch) on CUDA tensors.

A candidate takes the step's inputs as they arrive (any float dtype, any layout), casts them to the
precision it computes in, and hands its output on in the engine's activation dtype ("flow")."""
from __future__ import annotations

import contextlib
from typing import Callable

from ...ir import Node
from ..tactics import Candidate

MATRIX_OPS = {("kiln", "Conv"), ("kiln", "Gemm"), ("kiln", "Attention")}


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def math_mode(precision: str) -> Callable:
    """Set cuBLAS/cuDNN tf32 use for one call: tf32 only where the layer's precision is tf32 (TensorRT's rule)."""
    import torch

    allow = precision == "tf32"
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def apply():
        if matmul.allow_tf32 != allow:
            matmul.allow_tf32 = allow
        if cudnn.allow_tf32 != allow:
            cudnn.allow_tf32 = allow

    return apply


def triton_available() -> bool:
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


# A convolution over fewer input channels than this (an image stem's 3) is also offered channels-last with its
# input and weight zero-padded to PADDED_CHANNELS: cuDNN's tensor-core kernels want channels in multiples of
# 4 or 8, and its kernels for 3 channels run at a tenth of the GPU's fp16 rate (ResNet-50's 7x7 stem at
# batch 128: 0.33 ms, 10% of the engine).
PADDED_CHANNELS = (4, 8)


def conv_candidates(node: Node, weight, bias, precisions: list[str], flow) -> list[Candidate]:
    """cuDNN 2-D convolution, NCHW or channels-last, with its epilogue (bias, residual, activation) either
    fused by cuDNN (conv+bias+relu, conv+bias+add+relu), done in one kiln Triton pass, or done by torch;
    with few input channels, also channels-last over zero-padded channels."""
    import torch
    import torch.nn.functional as F

    pads = list(node.attrs["pads"])
    if weight.dim() != 4 or pads[:2] != pads[2:]:
        return []
    geometry = (list(node.attrs["strides"]), pads[:2], list(node.attrs["dilations"]), int(node.attrs["group"]))
    activation, params = node.attrs.get("activation", ""), list(node.attrs.get("activation_params", []))
    has_residual = len(node.inputs) > 3 and bool(node.inputs[3])
    epilogues = ["torch"]
    if activation == "relu":
        epilogues.append("cudnn-fused")
    if triton_available() and activation in ("", "relu", "gelu", "gelu_tanh", "silu", "sigmoid"):
        epilogues.append("triton")
    candidates = []
    for precision in precisions:
        dtype, set_math = torch_dtype(precision), math_mode(precision)
        b = _cast(bias, dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
        channels = weight.shape[1]
        padded = [c for c in PADDED_CHANNELS if channels < c] if geometry[3] == 1 else []
        layouts = [("nchw", torch.contiguous_format, channels), ("nhwc", torch.channels_last, channels)]
        layouts += [(f"nhwc-c{c}", torch.channels_last, c) for c in padded]
        for layout, memory_format, width in layouts:
            w = F.pad(weight.to(dtype), (0, 0, 0, 0, 0, width - channels)).contiguous(memory_format=memory_format)
            for epilogue in epilogues:
                name = {"torch": f"cudnn-{layout}", "cudnn-fused": f"cudnn-fused-{layout}",
                        "triton": f"cudnn-{layout}+triton-epilogue"}[epilogue]
                run = _conv_run(w, b, geometry, memory_format, dtype, flow, set_math, activation, params, epilogue,
                                has_residual)
                candidates.append(Candidate(name, precision, run))
    return candidates


def _conv_input(x, dtype, memory_format, channels: int):
    """A convolution's input in its candidate's dtype and layout; with fewer channels than `channels`, those
    padded with zeros (channels-last), to match a weight padded the same way."""
    import torch.nn.functional as F

    x = _cast(x, dtype)
    if x.shape[1] == channels:
        return x.contiguous(memory_format=memory_format)
    return F.pad(x.permute(0, 2, 3, 1), (0, channels - x.shape[1])).permute(0, 3, 1, 2)


def _conv_run(w, b, geometry, memory_format, dtype, flow, set_math, activation, params, epilogue, has_residual):
    import torch
    import torch.nn.functional as F

    from ...ops.fused import apply_activation

    stride, padding, dilation, groups = geometry
    if epilogue == "cudnn-fused":
        def run(x, w_unused=None, b_unused=None, residual=None):
            set_math()
            x = _conv_input(x, dtype, memory_format, w.shape[1])
            if residual is None:
                y = torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
            else:
                residual = _cast(residual, dtype).contiguous(memory_format=memory_format)
                y = torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, stride, padding, dilation, groups)
            return _cast(y, flow)
        return run

    if epilogue == "triton":
        from .triton_kernels import epilogue as fused_epilogue

        def run(x, w_unused=None, b_unused=None, residual=None):
            set_math()
            x = _conv_input(x, dtype, memory_format, w.shape[1])
            y = F.conv2d(x, w, None, stride, padding, dilation, groups)
            if y.is_contiguous(memory_format=torch.channels_last) and memory_format == torch.channels_last:
                inner = 1
            elif y.is_contiguous():
                inner = y.shape[2] * y.shape[3]
            else:
                inner = None
            if residual is not None:
                residual = _cast(residual, dtype).contiguous(memory_format=memory_format)
            if inner is None or (residual is not None and residual.stride() != y.stride()):
                y = y.add_(b.view(1, -1, 1, 1))  # one flat index cannot walk both: let torch do it
                if residual is not None:
                    y = y.add_(residual)
                return _cast(apply_activation(y, activation, params), flow)
            return _cast(fused_epilogue(y, b, residual, activation, inner=inner), flow)
        return run

    def run(x, w_unused=None, b_unused=None, residual=None):
        set_math()
        x = _conv_input(x, dtype, memory_format, w.shape[1])
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        if residual is not None:
            y = y.add_(_cast(residual, dtype))
        return _cast(apply_activation(y, activation, params), flow)
    return run


def gemm_candidates(node: Node, weight, bias, precisions: list[str], flow) -> list[Candidate]:
    """x @ W^T + b (+ residual) with the activation: cuBLAS then torch, cuBLASLt's fused epilogue, or cuBLAS
    then one kiln Triton pass for bias, residual and activation."""
    import torch
    import torch.nn.functional as F

    from ...ops.fused import apply_activation

    activation, params = node.attrs.get("activation", ""), list(node.attrs.get("activation_params", []))
    has_residual = len(node.inputs) > 3 and bool(node.inputs[3])
    use_triton = triton_available() and activation in ("", "relu", "gelu", "gelu_tanh", "silu", "sigmoid")
    candidates = []
    for precision in precisions:
        dtype, set_math = torch_dtype(precision), math_mode(precision)
        w, b = weight.to(dtype).contiguous(), _cast(bias, dtype)
        wt = w.t()

        def plain(x, w_unused=None, b_unused=None, residual=None, w=w, b=b, dtype=dtype, set_math=set_math):
            set_math()
            y = F.linear(_cast(x, dtype), w, b)
            if residual is not None:
                y = y.add_(_cast(residual, dtype))
            return _cast(apply_activation(y, activation, params), flow)

        candidates.append(Candidate("cublas", precision, plain))
        # cuBLASLt's GELU epilogue is the tanh form: offered for erf GELU only in half precision, where the
        # difference (under 1e-3) is below the rounding already accepted; the tolerance check still applies
        lt_gelu = activation == "gelu_tanh" or (activation == "gelu" and precision in ("fp16", "bf16"))
        if b is not None and not has_residual and (activation in ("", "relu") or lt_gelu):
            def lt(x, *unused, wt=wt, b=b, dtype=dtype, set_math=set_math):
                set_math()
                x = _cast(x, dtype)
                rows = x.reshape(-1, x.shape[-1])
                if activation:
                    y = torch._addmm_activation(b, rows, wt, use_gelu=activation != "relu")
                else:
                    y = torch.addmm(b, rows, wt)
                return _cast(y.reshape(*x.shape[:-1], wt.shape[1]), flow)

            name = "cublaslt-tanh-gelu-epilogue" if activation == "gelu" else "cublaslt-epilogue"
            candidates.append(Candidate(name, precision, lt))
        if use_triton and (b is not None or activation or has_residual):
            from .triton_kernels import epilogue as fused_epilogue

            def tri(x, w_unused=None, b_unused=None, residual=None, wt=wt, b=b, dtype=dtype, set_math=set_math, plain=plain):
                set_math()
                x = _cast(x, dtype)
                y = torch.matmul(x, wt)
                if residual is not None:
                    residual = _cast(residual, dtype)
                    if residual.shape != y.shape:  # a broadcast residual: one flat index cannot walk it
                        return plain(x, None, None, residual)
                    residual = residual.contiguous()
                return _cast(fused_epilogue(y, b, residual, activation), flow)

            candidates.append(Candidate("cublas+triton-epilogue", precision, tri))
    return candidates


def attention_candidates(node: Node, precisions: list[str], flow) -> list[Candidate]:
    """Fused scaled-dot-product attention through torch's backends (flash, memory-efficient, cuDNN), the
    unfused math as a baseline, and kiln's own Triton flash kernel in a few block shapes."""
    import torch
    from torch.nn.attention import SDPBackend

    scale = float(node.attrs.get("scale", 1.0))
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    candidates = []
    for precision in precisions:
        dtype, set_math = torch_dtype(precision), math_mode(precision)
        for name, backend in backends.items():
            if name in ("sdpa-flash", "sdpa-cudnn") and dtype == torch.float32:
                continue  # fp32 attention runs only on the efficient and math backends
            candidates.append(Candidate(name, precision, _sdpa_run(scale, dtype, set_math, backend, flow)))
    if triton_available():
        for precision in precisions:
            fallback = _sdpa_run(scale, torch_dtype(precision), math_mode(precision), SDPBackend.MATH, flow)
            for block_m, block_n, warps, stages in FLASH_VARIANTS:
                run = _flash_run(scale, precision, flow, (block_m, block_n, warps, stages), fallback)
                candidates.append(Candidate(f"triton-flash-m{block_m}-n{block_n}-w{warps}-s{stages}", precision, run))
    return candidates


# Triton flash attention launch variants: (query rows per program, keys per step, warps, pipeline stages).
FLASH_VARIANTS = ((64, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3))


def _sdpa_run(scale: float, dtype, set_math: Callable, backend, flow) -> Callable:
    """One torch SDPA backend in one precision; an additive float mask is cast along, a bool one kept."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, mask=None):
        set_math()
        q, k, v = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype)
        if mask is not None and mask.dtype.is_floating_point:
            mask = mask.to(dtype)
        with sdpa_kernel(backend):
            return _cast(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), flow)

    return run


def _flash_run(scale: float, precision: str, flow, launch: tuple, fallback: Callable) -> Callable:
    """kiln's Triton flash attention in one precision and launch variant; inputs it does not take (rank above
    4, heads wider than 128, a non-float mask) run `fallback`, SDPA's math backend, instead."""
    from .triton_attention import flash_attention, flash_supported

    dtype = torch_dtype(precision)
    products = "ieee" if precision == "fp32" else "tf32"  # fp32 keeps full-precision products; tf32 asks for tf32
    block_m, block_n, warps, stages = launch

    def run(q, k, v, mask=None):
        q, k, v = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype)
        if not flash_supported(q, k, v, mask):
            return fallback(q, k, v, mask)
        return flash_attention(q, k, v, mask, scale, flow, block_m, block_n, warps, stages, products)

    return run


# Triton elementwise chain launch variants: (elements per program, warps).
CHAIN_VARIANTS = ((512, 4), (1024, 4), (2048, 8))


def elementwise_candidates(node: Node, kernel: Callable, flow) -> list[Candidate]:
    """torch's registry kernel (one pass over memory per op), and kiln's one-pass Triton chain where every
    op of the node has a Triton form. Inputs of mixed or non-float dtypes go to the registry kernel."""
    import torch

    candidates = [Candidate("torch", _precision_of(flow), kernel)]
    ops, operands = list(node.attrs.get("ops", [])), [int(o) for o in node.attrs.get("operands", [])]
    if not triton_available():
        return candidates
    from .triton_elementwise import elementwise_chain, supported

    if not supported(ops, operands):
        return candidates
    for block, warps in CHAIN_VARIANTS:
        def run(x, *extra, block=block, warps=warps):
            same = all(isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.device == x.device for t in extra)
            if not same or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return kernel(x, *extra)
            return elementwise_chain(x, list(extra), ops, operands, block, warps)

        candidates.append(Candidate(f"triton-chain-b{block}-w{warps}", _precision_of(flow), run))
    return candidates


def layernorm_candidates(node: Node, kernel: Callable, flow) -> list[Candidate]:
    """torch's LayerNorm, and kiln's Triton row kernel (4 or 8 warps) when it normalizes the last axis."""
    candidates = [Candidate("torch", _precision_of(flow), kernel)]
    axis = int(node.attrs.get("axis", -1))
    if triton_available() and axis == -1 and len(node.outputs) == 1:
        from .triton_kernels import layernorm

        eps = float(node.attrs.get("epsilon", 1e-5))
        for warps in (4, 8):
            def run(x, scale, bias=None, warps=warps):
                if x.shape[-1] > 16384 or not x.is_contiguous():
                    return kernel(x, scale, bias)
                return layernorm(x, _cast(scale, x.dtype), _cast(bias, x.dtype), eps, warps)

            candidates.append(Candidate(f"triton-w{warps}", _precision_of(flow), run))
    return candidates


def add_layernorm_candidates(node: Node, kernel: Callable, flow) -> list[Candidate]:
    """LayerNorm(a + b) for a residual Add feeding a LayerNorm: torch's two kernels, or kiln's one Triton pass."""
    import torch

    def reference(a, b, scale, bias=None):
        return kernel(a + b, scale, bias)

    candidates = [Candidate("torch-add+layernorm", _precision_of(flow), reference)]
    if triton_available():
        from .triton_kernels import add_layernorm

        eps = float(node.attrs.get("epsilon", 1e-5))
        for warps in (4, 8):
            def run(a, b, scale, bias=None, warps=warps):
                if a.shape != b.shape or a.shape[-1] > 16384 or not (a.is_contiguous() and b.is_contiguous()) \
                        or a.dtype != b.dtype or not isinstance(a, torch.Tensor):
                    return reference(a, b, scale, bias)
                return add_layernorm(a, b, _cast(scale, a.dtype), _cast(bias, a.dtype), eps, warps)

            candidates.append(Candidate(f"triton-add-layernorm-w{warps}", _precision_of(flow), run))
    return candidates


def plain_maxpool(node: Node) -> bool:
    """A 2-D MaxPool kiln's channels-last Triton pass runs: explicit pads, floor mode, no dilation, no indices."""
    attrs = node.attrs
    return (node.op_key == "MaxPool" and len(attrs.get("kernel_shape") or []) == 2
            and attrs.get("auto_pad", "NOTSET") == "NOTSET" and not attrs.get("ceil_mode", 0)
            and all(d == 1 for d in attrs.get("dilations") or [1, 1]) and len([o for o in node.outputs if o]) == 1)


def maxpool_candidates(node: Node, kernel: Callable, flow, int8_scale: float | None = None) -> list[Candidate]:
    """torch's max pooling, and kiln's channels-last Triton pass (no index output) for plain 2-D MaxPool. With
    int8_scale, the pool's input arrives in int8 in that scale (an int8 hand-off through the pool: the maximum
    commutes with rounding to int8) and the Triton pass, pooling the int8 values, is the only candidate."""
    import torch

    candidates = [Candidate("torch", _precision_of(flow), kernel)] if int8_scale is None else []
    if not (triton_available() and plain_maxpool(node)):
        return candidates
    from .triton_kernels import maxpool_nhwc

    shape = tuple(node.attrs["kernel_shape"])
    strides = tuple(node.attrs.get("strides") or [1, 1])
    pads = tuple(node.attrs.get("pads") or [0, 0, 0, 0])

    def pool(x):
        return maxpool_nhwc(x.contiguous(memory_format=torch.channels_last), shape, strides, pads)

    if int8_scale is not None:
        from ...ops.quantize import quantize_activation

        def pooled_in_float(x):  # what the pool of the dequantized input gives, quantized back: the same integers
            return quantize_activation(kernel(x.float() * int8_scale).float(), int8_scale)

        return [Candidate("triton-nhwc-int8", "int8", pool, reference=pooled_in_float)]

    def run(x):
        if x.dim() != 4 or not x.is_floating_point():
            return kernel(x)
        return pool(x)

    candidates.append(Candidate("triton-nhwc", _precision_of(flow), run))
    return candidates


def softmax_candidates(node: Node, kernel: Callable, flow, opset: int) -> list[Candidate]:
    candidates = [Candidate("torch", _precision_of(flow), kernel)]
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
    if triton_available() and axis == -1:
        from .triton_kernels import softmax

        for warps in (4, 8):
            def run(x, warps=warps):
                if x.shape[-1] > 16384 or not x.is_contiguous():
                    return kernel(x)
                return softmax(x, warps)

            candidates.append(Candidate(f"triton-w{warps}", _precision_of(flow), run))
    return candidates


def _precision_of(flow) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(flow, "fp32")


@contextlib.contextmanager
def fp32_reference():
    """The reference a candidate is checked against: fp32 arithmetic, tf32 off."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
