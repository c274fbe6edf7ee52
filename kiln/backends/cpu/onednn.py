"""kiln's own oneDNN convolutions (onednn.cpp): a primitive per layer and input shape, created once with its weights
reordered, bias, residual sum and activation inside, executed by a plain C call that replay.py can also replay.

Why: torch's oneDNN convolution builds the primitive's descriptor again on every call. That costs 20-22 us here, even
on a 16-channel 4x4 input, against 1-2 us for a primitive kept. ResNet-50 at batch 1 runs 53 convolutions, of which
the 1x1s take 0.2-0.3 ms each, so the calls alone cost it about 1 ms a run (docs/benchmarks.md, run T).

It builds against the oneDNN of the `onednn-devel-cpu-gomp` wheel (headers, and libdnnl through its runtime wheel),
whose OpenMP is the libgomp that torch loads first, so both run on one thread pool. Without that wheel, a compiler or
the native library's launch convention, `available()` says why and convolutions keep torch's oneDNN calls.
`KILN_ONEDNN=0` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np

from ... import log
from . import native

SOURCE = Path(__file__).with_name("onednn.cpp")
# ConvSpec's activation codes (onednn.cpp)
ACTIVATIONS = {"": 0, "relu": 1, "leaky_relu": 2, "clip": 3, "sigmoid": 4, "tanh": 5, "hardswish": 6, "silu": 7,
               "gelu": 8, "gelu_tanh": 9}
_FLOAT_MAX = 3.4e38


class _ConvSpec(ctypes.Structure):
    """onednn.cpp's ConvSpec, field for field."""
    _fields_ = [(name, ctypes.c_int64) for name in ("n", "c", "h", "w", "oc", "oh", "ow", "groups", "kh", "kw", "sh", "sw",
                                                     "pt", "pl", "pb", "pr", "dh", "dw", "activation")] + \
               [("alpha", ctypes.c_float), ("beta", ctypes.c_float)] + \
               [(name, ctypes.c_int64) for name in ("residual", "ldy", "bf16")]


class _ConvArgs(ctypes.Structure):
    """onednn.cpp's OnednnConvArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "y", "conv")]


def _prefix() -> tuple[Path, Path]:
    """Where the wheels put oneDNN's headers and library: the environment's include/ and lib/."""
    return Path(sys.prefix) / "include", Path(sys.prefix) / "lib"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = _build_and_open()
    if library is None:
        log.verbose("kiln's own oneDNN convolutions unavailable: %s", reason)
    return library, reason


def _build_and_open() -> tuple[ctypes.CDLL | None, str]:
    import torch  # noqa: F401  (loads torch's libgomp first: libdnnl's OpenMP is then torch's)

    if os.environ.get("KILN_ONEDNN", "1") == "0":
        return None, "KILN_ONEDNN=0"
    include, lib = _prefix()
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() or not (lib / "libdnnl.so.3").exists():
        return None, f"no oneDNN headers and library under {sys.prefix} (pip install onednn-devel-cpu-gomp==2023.2.0)"
    flags = ["-O2", "-fopenmp", "-shared", "-fPIC", "-std=c++17", f"-I{include}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
    library, reason = native.compiled(SOURCE, flags, "onednn")
    if library is None:
        return None, reason
    library.kiln_onednn_conv_create.argtypes = [ctypes.POINTER(_ConvSpec), ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_char_p, ctypes.c_int64]
    library.kiln_onednn_conv_create.restype = ctypes.c_void_p
    library.kiln_onednn_conv_destroy.argtypes = [ctypes.c_void_p]
    library.kiln_onednn_conv_destroy.restype = None
    library.kiln_onednn_conv.argtypes = [ctypes.POINTER(_ConvArgs), ctypes.c_int64]
    library.kiln_onednn_conv.restype = None
    return library, ""


def available() -> tuple[bool, str]:
    library, reason = _load()
    return library is not None, reason


def takes(activation: str) -> bool:
    return activation in ACTIVATIONS


class Convolution:
    """An NHWC convolution with bias, a residual summed in place into its buffer (where `residual`) and an
    activation, on a oneDNN primitive kept per input shape and output pixel stride. Without a residual it can write
    into a channel slice of a wider NHWC buffer (a concatenation's: concat.py), as native.DirectConvolution does.
    Its activations and weights are fp32, or bf16 where `dtype` is torch.bfloat16 (fp32 accumulation and bias; an
    fp32 input is rounded to bf16 first)."""

    def __init__(self, weight, bias, strides, pads, dilations, groups: int, activation: str, params, residual: bool,
                 dtype=None):
        import torch

        self._library = _load()[0]
        assert self._library is not None, "onednn.Convolution needs available()"
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.out_channels = self.weight.shape[0]
        self.bias = np.ascontiguousarray(bias if bias is not None else np.zeros(self.out_channels), dtype=np.float32)
        self.strides, self.pads, self.dilations = [int(v) for v in strides], [int(v) for v in pads], [int(v) for v in dilations]
        self.groups, self.residual = int(groups), bool(residual)
        self.activation = ACTIVATIONS[activation]
        self.alpha, self.beta = _activation_parameters(activation, params)
        self.dtype = dtype or torch.float32  # what it reads and writes
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"oneDNN convolutions here take fp32 or bf16, not {self.dtype}")
        self._primitives: dict[tuple, tuple[int, tuple]] = {}  # (input shape, ldy) -> (primitive, output shape)

    def output_shape(self, x) -> tuple:
        """The output's shape for input `x` (a tensor or its shape)."""
        n, _, h, w = getattr(x, "shape", x)
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[2:], self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        return (n, self.out_channels, (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def primitive(self, input_shape, ldy: int | None = None) -> tuple[int, tuple]:
        """The primitive for NHWC inputs of `input_shape` writing pixels `ldy` floats apart (the output's channels by
        default), created on first use; a ValueError says why oneDNN refused it (or offers only a reference kernel)."""
        import torch

        ldy = ldy or self.out_channels
        known = self._primitives.get((tuple(input_shape), ldy))
        if known is not None:
            return known
        n, c, h, w = (int(d) for d in input_shape)
        shape = self.output_shape(input_shape)
        if c != self.weight.shape[1] * self.groups or min(shape) <= 0:
            raise ValueError(f"input {tuple(input_shape)} does not fit weights {self.weight.shape} in {self.groups} groups")
        spec = _ConvSpec(n, c, h, w, shape[1], shape[2], shape[3], self.groups, *self.weight.shape[2:], *self.strides,
                         *self.pads, *self.dilations, self.activation, self.alpha, self.beta, int(self.residual), ldy,
                         int(self.dtype == torch.bfloat16))
        error = ctypes.create_string_buffer(512)
        handle = self._library.kiln_onednn_conv_create(ctypes.byref(spec), self.weight.ctypes.data, self.bias.ctypes.data,
                                                        error, len(error))
        if not handle:
            raise ValueError(f"oneDNN refused the convolution: {error.value.decode(errors='replace')}")
        self._primitives[(tuple(input_shape), ldy)] = (handle, shape)
        return handle, shape

    def __call__(self, x, residual=None, out=None):
        """conv(x) + bias, plus `residual` (summed into its own buffer, which is returned), then the activation, as
        an NHWC tensor; `out`, a channel slice of a wider NHWC buffer, takes the result instead of a new tensor."""
        import torch

        x = native.channels_last(x.to(self.dtype))
        if self.residual:
            handle, shape = self.primitive(x.shape)
            if residual is None or tuple(residual.shape) != shape or out is not None:
                raise ValueError(f"expected a residual of shape {shape} and no out, got "
                                 f"{None if residual is None else tuple(residual.shape)}")
            y = residual.to(self.dtype).contiguous(memory_format=torch.channels_last)
            if y.data_ptr() == x.data_ptr():  # the sum would overwrite the input it reads
                y = y.clone(memory_format=torch.channels_last)
        else:
            y, ldy = native.output_buffer(self.output_shape(x), self.dtype, out)
            handle, shape = self.primitive(x.shape, ldy)
        native.launch(self._library.kiln_onednn_conv, _ConvArgs(x.data_ptr(), y.data_ptr(), handle), torch.get_num_threads(),
                      x=x, y=y)
        return y

    def __del__(self):
        library = getattr(self, "_library", None)
        for handle, _ in getattr(self, "_primitives", {}).values():
            if library is not None:
                library.kiln_onednn_conv_destroy(handle)


def _activation_parameters(activation: str, params) -> tuple[float, float]:
    params = [float(p) for p in params or []]
    if activation == "leaky_relu":
        return (params[0] if params else 0.01), 0.0
    if activation == "clip":
        low, high = params
        return max(low, -_FLOAT_MAX), min(high, _FLOAT_MAX)
    if activation == "hardswish":
        return 1 / 6, 0.5
    return 0.0, 0.0

