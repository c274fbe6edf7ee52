"""kiln's native bf16 matrix product (native.cpp's kiln_gemm_bf16) for a bf16 engine's kiln::Gemm layers: AVX512-BF16
dot products in register tiles, bias, residual and activation applied before the one store, and the weights of the
next panel asked for from memory while the current one runs.

Why: a BERT-base encoder's 48 products hold 170 MB of bf16 weights, which come from memory at every run, and oneDNN's
product waits on them: at 128 rows (batch 1), 768 -> 768 took 0.19 ms with its weights in cache and 0.40 ms without
(docs/benchmarks.md). A native launch also replays (replay.py), where torch's call costs about 12 us of Python.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import native

# the activations the kernel applies (native.cpp's GEMM_*); ReLU and Clip are its clamp
ACTIVATIONS = {"": 0, "relu": 1, "clip": 1, "gelu": 2, "gelu_tanh": 3}
# rows of x one pass over the panels keeps in L2 (a core's is 1-2 MB; the panel it runs takes up to 400 KB beside)
CHUNK_BYTES = 256 << 10


class _GemmArgs(ctypes.Structure):
    """native.cpp's GemmArgs, field for field."""
    activations = ("x", "residual", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "residual", "y")] + \
               [(name, ctypes.c_int64) for name in ("m", "k", "n", "ldx", "ldr", "ldy", "activation")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float), ("next_w", ctypes.c_void_p), ("next_n", ctypes.c_int64),
                ("next_k", ctypes.c_int64)]


def takes(weight_shape, activation: str) -> bool:
    """Whether the kernel runs a product with weights of `weight_shape` ([out, in]) and `activation`: bf16 kernels
    present, an even reduction (its dot products take pairs) and an activation it applies."""
    import torch

    return (len(weight_shape) == 2 and weight_shape[1] % 2 == 0 and weight_shape[1] > 0 and activation in ACTIVATIONS
            and native.declared_kernel("kiln_gemm", _GemmArgs, 2, torch.bfloat16) is not None)


class Gemm:
    """y = act(x w^T + bias (+ residual)) for bf16 x [..., k] and weights [n, k]; y is bf16, or fp32 where the residual
    is (the sum meets an fp32 stream, as torch's bf16 + fp32 does)."""

    def __init__(self, weight, bias, activation: str, params=()):
        import torch

        n, k = weight.shape
        if not takes(weight.shape, activation):
            raise ValueError(f"the native product takes an even reduction and one of {sorted(ACTIVATIONS)}, "
                             f"got weights {tuple(weight.shape)} and {activation!r}")
        self.n, self.k = n, k
        blocks = native._ceil_div(n, 16)
        w = torch.zeros(blocks * 16, k)
        w[:n] = torch.from_numpy(np.array(weight, dtype=np.float32))
        # [n/16][k/2][16][2]: a block's 16 columns side by side, pairs along k
        self.weight = w.view(blocks, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous().to(torch.bfloat16)
        self.bias = torch.zeros(blocks * 16)
        if bias is not None:
            self.bias[:n] = torch.from_numpy(np.array(bias, dtype=np.float32))
        self.activation = ACTIVATIONS[activation]
        low, high = (float(p) for p in params) if activation == "clip" else (0.0, float("inf"))
        self.bounds = (low, high)
        # by the type they write: bf16 (kiln_gemm_bf16) or fp32 (kiln_gemm_bf16_fp32)
        self._kernels = {torch.bfloat16: native.declared_kernel("kiln_gemm", _GemmArgs, 2, torch.bfloat16),
                         torch.float32: native.declared_kernel("kiln_gemm_bf16_fp32", _GemmArgs, 2)}
        self.rows_per_chunk = max(6, CHUNK_BYTES // (2 * k) // 6 * 6)
        self.next: Gemm | None = None  # the product the engine runs after this one (prefetch_in_turn)

    def __call__(self, x, residual=None):
        import torch

        if x.shape[-1] != self.k or not x.dtype.is_floating_point:
            raise ValueError(f"expected float rows of {self.k}, got {tuple(x.shape)} {x.dtype}")
        shape = (*x.shape[:-1], self.n)
        rows = x.to(torch.bfloat16).reshape(-1, self.k).contiguous()
        out_dtype = torch.float32 if residual is not None and residual.dtype == torch.float32 else torch.bfloat16
        if residual is not None:
            if tuple(residual.shape) != shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {shape}")
            residual = residual.to(out_dtype).contiguous()
        y = torch.empty(shape, dtype=out_dtype)
        self.launch(rows, self.k, residual, self.n, y, self.n)
        return y

    def launch(self, x, ldx: int, residual, ldr: int, y, ldy: int) -> None:
        """The product of x's rows (bf16, `ldx` elements apart; as many as y has) into y's (`ldy` apart), plus
        residual's (`ldr` apart, y's type) where given; y bf16 or fp32."""
        import torch

        rows = y.numel() // self.n
        if rows:
            args = _GemmArgs(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(),
                             residual.data_ptr() if residual is not None else None, y.data_ptr(),
                             rows, self.k, self.n, ldx, ldr, ldy, self.activation, *self.bounds, *self._next_weights())
            native.launch(self._kernels[y.dtype], args, self.rows_per_chunk, torch.get_num_threads(),
                          x=x, residual=residual, y=y)

    def _next_weights(self) -> tuple:
        """GemmArgs' next_w, next_n and next_k: where the next product's weights are."""
        following = self.next
        return (following.weight.data_ptr(), following.n, following.k) if following is not None else (None, 0, 0)


class PointwiseConvolution:
    """A 1x1 convolution of stride 1, unpadded, in one group, as the product over NHWC pixels (bf16), with bias, a
    residual (also summed in place into its buffer) and ReLU or Clip: the same calls as native.DirectConvolution, so a
    layer, a concatenation's slice (`out`) or a replay takes either. Its weights join the engine's chain of products
    (prefetch_in_turn), which a small layer's weights, arriving from memory, wait on."""

    def __init__(self, weight, bias, activation: str, params=()):
        import torch

        self.product = Gemm(np.asarray(weight)[:, :, 0, 0], bias, activation, params)
        self.out_channels, self.in_channels = self.product.n, self.product.k
        self.dtype = torch.bfloat16  # what it writes

    @staticmethod
    def takes(weight_shape, strides, pads, dilations, groups: int, activation: str) -> bool:
        return (len(weight_shape) == 4 and tuple(weight_shape[2:]) == (1, 1) and list(strides) == [1, 1]
                and not any(pads) and list(dilations) == [1, 1] and groups == 1 and activation in ("", "relu", "clip")
                and takes(weight_shape[:2], activation))

    def output_shape(self, x) -> tuple:
        n, _, h, w = getattr(x, "shape", x)
        return (n, self.out_channels, h, w)

    def __call__(self, x, residual=None, in_place: bool = False, out=None):
        import torch

        if x.dim() != 4 or x.shape[1] != self.in_channels or not x.dtype.is_floating_point:
            raise ValueError(f"expected {self.in_channels} float channels, got {tuple(x.shape)} {x.dtype}")
        x = native.channels_last(x.to(torch.bfloat16))
        shape = self.output_shape(x)
        if residual is not None:
            if tuple(residual.shape) != shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {shape}")
            residual = native.channels_last(residual.to(torch.bfloat16))
        if out is None and in_place and residual is not None and residual.data_ptr() != x.data_ptr():
            y, ldy = residual, self.out_channels  # each output element reads its residual just before writing it
        else:
            y, ldy = native.output_buffer(shape, torch.bfloat16, out)
        self.product.launch(x, self.in_channels, residual, self.out_channels, y, ldy)
        return y


def prefetch_in_turn(products: list[Gemm]) -> None:
    """Let each of `products`, in the order an engine runs them, ask for the first weights of the one after it while
    it finishes: a BERT-base encoder's 48 products at batch 1 (docs/benchmarks.md)."""
    for product, following in zip(products, products[1:] + [None]):
        product.next = following
