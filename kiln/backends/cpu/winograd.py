"""Winograd F(2x2, 3x3) convolutions (native.cpp's kiln_winograd_f2x3): a stride-1, undilated 3x3 convolution of NHWC
activations as 16 matrix products over transformed 4x4 input patches, one per 2x2 output tile, and weights
transformed once here. It does 4/9 of the direct kernel's multiply-adds, for extra passes over per-thread buffers
that stay in cache. In fp32 or, where the library has AVX512-BF16 kernels, bf16: the transformed patches and
weights rounded to bf16, their products summed in fp32.

Why: the 3x3 layers hold about half of ResNet-50's multiply-adds, and oneDNN 3.2 has no Winograd kernel for this CPU
(its convolution_winograd is refused here), so its 3x3s run at the fp32 peak of the direct method. The transforms
add and subtract only (the weights' G has halves), so results stay within a few fp32 roundings of the direct sums.
Which layers take it, the build decides by timing (select.py), as for the direct kernel.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from . import native

# G of F(2x2, 3x3): U = G g G^T turns a 3x3 filter into its 4x4 transform
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
# Bytes a task's transformed patches (16 per tile and input channel) and its products (16 per tile and output channel,
# 64 channels at a time, fp32) may take: both stay in a core's L2 between the transforms and the products
PATCH_BYTES_PER_TASK = 256 << 10
PRODUCT_BYTES_PER_TASK = 256 << 10
TASKS_PER_THREAD = 8


class _WinogradArgs(ctypes.Structure):
    """native.cpp's WinogradArgs, field for field."""
    activations = ("x", "residual", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "u", "bias", "residual", "y")] + \
               [(name, ctypes.c_int64) for name in ("n", "h", "w_", "c", "oh", "ow", "oc", "ldy", "pt", "pl")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _Plan(NamedTuple):
    shape: object  # the output's torch.Size
    tiles_per_task: int
    blocks_per_task: int


def takes(weight_shape, strides, dilations, groups: int) -> bool:
    """Whether a layer fits the kernel: 3x3, stride 1, no dilation, one group, channels in and out multiples of 16."""
    out_channels, in_channels, kh, kw = weight_shape
    return (kh, kw) == (3, 3) and list(strides) == [1, 1] and list(dilations) == [1, 1] and groups == 1 \
        and in_channels % 16 == 0 and out_channels % 16 == 0


def transformed_weights(weight: np.ndarray) -> np.ndarray:
    """[16 patch positions][out / 16][in][16 output channels] float32: G g G^T per filter, in float64 first."""
    out_channels, in_channels = weight.shape[:2]
    u = np.einsum("ak,oikl,bl->abio", _G, weight.astype(np.float64), _G)  # [4][4][in][out]
    u = u.reshape(16, in_channels, out_channels // 16, 16).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(u, dtype=np.float32)


def _packed(weight: np.ndarray, dtype):
    """The kernel's weights: transformed_weights as fp32, or for bf16 rounded and in input-channel pairs,
    [16][out / 16][in / 2][16 output channels][2] (each lane's two products of one AVX512-BF16 dot product)."""
    import torch

    u = torch.from_numpy(transformed_weights(weight))
    if dtype == torch.float32:
        return u
    positions, blocks, in_channels, lanes = u.shape
    return u.view(positions, blocks, in_channels // 2, 2, lanes).transpose(3, 4).contiguous().to(torch.bfloat16)


class WinogradConvolution:
    """A 3x3, stride-1 convolution (`takes`) with bias, an optional residual and a clamp, on NHWC tensors of `dtype`
    (fp32, or bf16 where native.bf16_available()); the same calls as native.DirectConvolution, so a layer, a
    concatenation's slice (`out`) or a replay takes either."""

    def __init__(self, weight, bias, pads, clamp: tuple[float, float], dtype=None):
        import torch

        out_channels, in_channels = weight.shape[:2]
        self.dtype = dtype or torch.float32  # what it reads and writes
        self._kernel = native.declared_kernel("kiln_winograd_f2x3", _WinogradArgs, 3, self.dtype)
        assert self._kernel is not None, f"WinogradConvolution in {self.dtype} needs the native library's kernel for it"
        self.u = _packed(np.asarray(weight), self.dtype)
        self.bias = torch.from_numpy(np.array(bias if bias is not None else np.zeros(out_channels), np.float32))
        self.out_channels, self.in_channels = out_channels, in_channels
        self.pads = [int(p) for p in pads]  # top, left, bottom, right
        self.clamp = clamp
        self._plans: dict[tuple, _Plan] = {}

    def output_shape(self, x) -> tuple[int, int, int, int]:
        n, _, h, w = getattr(x, "shape", x)
        top, left, bottom, right = self.pads
        return (n, self.out_channels, h + top + bottom - 2, w + left + right - 2)

    def __call__(self, x, residual=None, in_place: bool = False, out=None):
        """conv(x) + bias (+ residual), clamped, as an NHWC tensor; `in_place` sums into the residual's own buffer
        (the caller knows nothing else reads it), `out` takes the result in a channel slice of a wider buffer."""
        import torch

        if not x.dtype.is_floating_point or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} float channels, got {tuple(x.shape)} {x.dtype}")
        threads = torch.get_num_threads()
        plan = self._plans.get((x.shape, threads)) or self._plan_for(x.shape, threads)
        x = native.channels_last(x.to(self.dtype))
        if residual is not None:
            if residual.shape != plan.shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {tuple(plan.shape)}")
            residual = native.channels_last(residual.to(self.dtype))
        if out is None and in_place and residual is not None and residual.data_ptr() != x.data_ptr():
            y, ldy = residual, self.out_channels  # each output reads its own residual element just before writing it
        else:
            y, ldy = native.output_buffer(plan.shape, self.dtype, out)
        n, c, h, w = x.shape
        if not y.numel():
            return y
        args = _WinogradArgs(x.data_ptr(), self.u.data_ptr(), self.bias.data_ptr(),
                             residual.data_ptr() if residual is not None else None, y.data_ptr(),
                             n, h, w, c, *plan.shape[2:], self.out_channels, ldy, *self.pads[:2], *self.clamp)
        native.launch(self._kernel, args, plan.tiles_per_task, plan.blocks_per_task, threads,
                      x=x, residual=residual, y=y)
        return y

    def _plan_for(self, input_shape, threads: int) -> _Plan:
        """Tiles and output-channel blocks per task: as many tiles as keep the transformed patches and the products
        within PATCH_BYTES_PER_TASK and PRODUCT_BYTES_PER_TASK (a multiple of the 6-tile product rows), fewer where
        the output channels leave the threads short of tasks, then the channels split until there are about
        TASKS_PER_THREAD tasks a thread."""
        import torch

        shape = torch.Size(self.output_shape(input_shape))
        tiles = shape[0] * ((shape[2] + 1) // 2) * ((shape[3] + 1) // 2)
        patch_bytes = 16 * self.in_channels * self.dtype.itemsize  # a tile's transformed patch
        fitting = min(PATCH_BYTES_PER_TASK // patch_bytes, PRODUCT_BYTES_PER_TASK // (16 * 64 * 4))
        blocks = self.out_channels // 16
        # where the output channels split into fewer tasks than the threads want (DenseNet's 3x3s write 32), the
        # tiles split further: 128->32 at 14x14 took one task, 0.029 ms, and 0.019 in nine
        tile_blocks_wanted = native._ceil_div(TASKS_PER_THREAD * threads, native._ceil_div(blocks, 4))
        per_task = min(fitting // 6 * 6, native._ceil_div(native._ceil_div(tiles, tile_blocks_wanted), 6) * 6)
        per_task = max(6, per_task)
        tile_blocks = max(1, native._ceil_div(tiles, per_task))
        groups = min(native._ceil_div(blocks, 4), max(1, native._ceil_div(TASKS_PER_THREAD * threads, tile_blocks)))
        plan = _Plan(shape, per_task, native._ceil_div(blocks, groups))
        self._plans[(input_shape, threads)] = plan
        return plan

