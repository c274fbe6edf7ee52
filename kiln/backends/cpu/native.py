"""kiln's native CPU kernels: C++ with AVX-512 intrinsics (native.cpp), compiled once per machine with the
system's C++ compiler and loaded through ctypes, for the layers where oneDNN's kernels as torch exposes them lose.

Why: oneDNN's convolution call costs 60-80 us of setup here (its allocations and ideep's descriptors) and its small
1x1 kernels run at a third of the cores' peak, so SqueezeNet-sized layers take 1.5-2x what a direct kernel needs
(docs/benchmarks.md, run H). The kernels run on torch's own OpenMP threads (the library links the libgomp torch
loaded), so they share torch's thread count and pool. Which convolutions take them the build decides by timing
(select.py).

Where no compiler, no AVX-512 or no OpenMP is available the library is absent, `available()` says why, and every
layer keeps its oneDNN tactic: an engine never depends on this library, it only runs faster with it.

Every kernel runs through `launch`, which tells a recorder what it ran and on which tensors: replay.py turns a
recorded run into one C call (kiln_replay) per stretch of such layers.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ... import log
from ...progress import interactive
from ...engine.target import cpu_features

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
REQUIRED_FEATURES = {"avx512f"}


class _ConvArgs(ctypes.Structure):
    """native.cpp's ConvArgs, field for field."""
    activations = ("x", "residual", "y")  # the pointer fields that address activations (the rest: weights, tables)
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "residual", "y")] + \
               [(name, ctypes.c_int64) for name in ("n", "h", "w_", "c", "oh", "ow", "oc", "ldy",
                                                     "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _PoolArgs(ctypes.Structure):
    """native.cpp's PoolArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("n", "h", "w_", "c", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")]


class _AmxConvArgs(ctypes.Structure):
    """native.cpp's AmxConvArgs, field for field."""
    activations = ("x", "residual", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "residual", "y", "taps")] + \
               [(name, ctypes.c_int64) for name in ("n", "c", "pixels", "image_pixels", "wv", "tap_count",
                                                     "oh", "ow", "oc", "ldy", "residual_bf16")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _PrepareArgs(ctypes.Structure):
    """native.cpp's PrepareArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("n", "c", "h", "w", "sn", "sc", "sh", "sw", "ph", "pw", "s", "pa", "pb",
                                                     "hq", "wq", "tail")]


class _AvgPoolArgs(ctypes.Structure):
    """native.cpp's AvgPoolArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("n", "h", "w_", "c", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw",
                                                     "ph_end", "pw_end", "count_include_pad")]


class _StemArgs(ctypes.Structure):
    """native.cpp's StemArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "y", "offsets")] + \
               [(name, ctypes.c_int64) for name in ("n", "image", "wp", "taps", "oh", "ow", "oc", "sh", "sw")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _StemPairArgs(ctypes.Structure):
    """native.cpp's StemPairArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "w", "bias", "y")] + \
               [(name, ctypes.c_int64) for name in ("n", "c", "h", "w_", "pt", "pl", "hp", "wp", "kh", "kw", "oh", "ow",
                                                   "oc", "sh", "sw")] + \
               [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _StemPoolArgs(ctypes.Structure):
    """native.cpp's StemPoolArgs, field for field: its StemPairArgs spelled out (that one's y unused, the pooled
    output after it), so that a replay finds x and y by name."""
    activations = ("x", "y")
    _fields_ = [(name if name != "y" else "convolution_y", kind) for name, kind in _StemPairArgs._fields_] + \
               [("y", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("pool_k", "pool_s", "pool_pad", "poh", "pow_", "band")]


class _MeanArgs(ctypes.Structure):
    """native.cpp's MeanArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + [(name, ctypes.c_int64) for name in ("n", "pixels", "c")]


class _LrnArgs(ctypes.Structure):
    """native.cpp's LrnArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + \
               [(name, ctypes.c_int64) for name in ("pixels", "c", "before", "after")] + \
               [("scale", ctypes.c_float), ("bias", ctypes.c_float), ("power", ctypes.c_int64)]


class _AffineArgs(ctypes.Structure):
    """native.cpp's AffineArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "y", "scale", "shift")] + \
               [(name, ctypes.c_int64) for name in ("outer", "c", "inner", "ldx")] + [("lo", ctypes.c_float), ("hi", ctypes.c_float)]


class _TransposeArgs(ctypes.Structure):
    """native.cpp's TransposeArgs, field for field."""
    activations = ("x", "y")
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + [(name, ctypes.c_int64) for name in ("n", "c", "pixels")]


class ReplayCall(ctypes.Structure):
    """native.cpp's ReplayCall: one recorded kernel launch (its entry point, arguments and trailing integers)."""
    _fields_ = [("function", ctypes.c_void_p), ("args", ctypes.c_void_p), ("params", ctypes.c_int64 * 5),
                ("param_count", ctypes.c_int64)]


class ReplayPatch(ctypes.Structure):
    """native.cpp's ReplayPatch: before a replay, pointer field `field` (a byte offset) of call `call`'s arguments
    is set to sources[source] + delta."""
    _fields_ = [(name, ctypes.c_int64) for name in ("call", "field", "source", "delta")]


class Launch(NamedTuple):
    """One kernel launch as recorded: the ctypes function, its argument structure, its trailing integers, and the
    tensor behind each of the structure's activation fields (None for a null pointer)."""
    function: object
    args: ctypes.Structure
    params: tuple
    tensors: dict


class Recorder:
    """The native kernels a run launched, by step index (replay.py turns them into replays), and the steps that
    declared all their work done without a kernel (a concatenation whose inputs are already in its buffer)."""

    def __init__(self):
        self.step = -1
        self.launches: dict[int, list[Launch]] = {}
        self.views: set[int] = set()


_recording = threading.local()


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Within `with recording(recorder):`, the native kernels launched on this thread are also recorded."""
    _recording.recorder = recorder
    try:
        yield recorder
    finally:
        _recording.recorder = None


def launch(function, args, *params, **tensors) -> None:
    """Run a kernel on `args`; `tensors` names the tensor behind each of its activation fields, for a recorder."""
    function(ctypes.byref(args), *params)
    recorder = getattr(_recording, "recorder", None)
    if recorder is not None:
        assert set(tensors) == set(type(args).activations), f"{type(args).__name__} launched with {sorted(tensors)}"
        recorder.launches.setdefault(recorder.step, []).append(Launch(function, args, params, tensors))


def note_view_step() -> None:
    """Tell a recorder that the current step did all its work without a kernel: its outputs are views of buffers
    that kernels already wrote (replay.py may then skip it)."""
    recorder = getattr(_recording, "recorder", None)
    if recorder is not None:
        recorder.views.add(recorder.step)


def cache_dir() -> Path:
    """Where compiled kernels are kept: $KILN_CACHE_DIR, else ~/.cache/kiln (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "kiln")
    return Path(root) / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library, or None and the reason it is absent (logged once)."""
    library, reason = _build_and_open()
    if library is None:
        log.verbose("native CPU kernels unavailable: %s", reason)
    return library, reason


def _build_and_open() -> tuple[ctypes.CDLL | None, str]:
    import torch  # noqa: F401  (loads torch's libgomp first, so that the library's OpenMP is torch's)

    if os.environ.get("KILN_NATIVE", "1") == "0":
        return None, "KILN_NATIVE=0"
    missing = REQUIRED_FEATURES - cpu_features()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    library, reason = compiled(SOURCE, FLAGS)
    if library is not None:
        _declare(library)
    return library, reason


def compiled(source: Path, flags: list[str], name: str = "native") -> tuple[ctypes.CDLL | None, str]:
    """`source` compiled with `flags` into the cache (once per source, compiler, flags and CPU) and loaded, or None
    and the reason."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{compiler} does not run: {error}"
    key = hashlib.sha256(source.read_bytes() + version.encode() + " ".join(flags).encode()
                         + " ".join(sorted(cpu_features())).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        reason = _compile(compiler, source, flags, target)
        if reason:
            return None, reason
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as error:
        return None, f"{target} does not load: {error}"


def _declare(library) -> None:
    """Set the argument types of the library's entry points; the AMX ones exist only where the compiler targets AMX
    (not on AMD's Zen 4, which has AVX512-BF16 without it), the _bf16 ones only where it targets AVX512-BF16."""
    library.kiln_conv_nhwc.argtypes = [ctypes.POINTER(_ConvArgs)] + [ctypes.c_int64] * 5
    library.kiln_conv_nhwc.restype = None
    library.kiln_replay.argtypes = [ctypes.POINTER(ReplayCall), ctypes.c_int64, ctypes.POINTER(ReplayPatch), ctypes.c_int64,
                                    ctypes.POINTER(ctypes.c_int64)]
    library.kiln_replay.restype = None
    for name, args in (("kiln_max_pool_nhwc", _PoolArgs), ("kiln_channel_affine", _AffineArgs), ("kiln_pixel_mean", _MeanArgs),
                       ("kiln_nchw_to_nhwc", _TransposeArgs)):
        for function in (name, name + "_bf16") if library.kiln_native_bf16() else (name,):
            getattr(library, function).argtypes = [ctypes.POINTER(args), ctypes.c_int64]
            getattr(library, function).restype = None
    if library.kiln_native_amx():
        library.kiln_conv_amx.argtypes = [ctypes.POINTER(_AmxConvArgs), ctypes.c_int64, ctypes.c_int64]
        library.kiln_conv_amx.restype = None
        library.kiln_prepare_phases.argtypes = [ctypes.POINTER(_PrepareArgs), ctypes.c_int64]
        library.kiln_prepare_phases.restype = None


def _compile(compiler: str, source: Path, flags: list[str], target: Path) -> str:
    """Compile `source` into `target` (written under a temporary name and renamed, so that concurrent builds never
    load half a file); the reason on failure, else ''."""
    message = f"compiling kiln's {source.name} (once per machine; about 20 s) into {target}"
    log.info(message)
    if interactive():  # a first build on a terminal would otherwise pause without a word
        print(f"kiln: {message}", file=sys.stderr, flush=True)
    partial = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as file:
            partial = file.name
        result = subprocess.run([compiler, str(source), *flags, "-o", partial], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            return f"compiling {source.name} failed: {last}"
        os.replace(partial, target)
        partial = None
        return ""
    except (OSError, subprocess.SubprocessError) as error:
        return f"compiling {source.name} failed: {error}"
    finally:  # a failed or timed-out compile leaves no half-written library behind
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)


def available() -> tuple[bool, str]:
    """Whether the native kernels run here, and why not."""
    library, reason = _load()
    return library is not None, reason


def bf16_available() -> bool:
    """Whether the library has its bf16 kernels (max pooling, the channel affine map): where the compiler targets
    AVX512-BF16, which every CPU with AMX-BF16 has."""
    library = _load()[0]
    return library is not None and bool(library.kiln_native_bf16())


def amx_available() -> bool:
    """Whether the library has its AMX bf16 convolution and Linux lets this process use the tile registers."""
    library = _load()[0]
    return library is not None and bool(library.kiln_native_amx()) and bool(library.kiln_amx_init())


def _typed_kernels(library, name: str) -> dict:
    """{dtype: the library's `name` kernel for it}, for the types _typed serves here (looked up once, not per call)."""
    import torch

    return {dtype: _typed(library, name, dtype) for dtype in (torch.float32, torch.bfloat16)
            if dtype == torch.float32 or library.kiln_native_bf16()}


def declared_kernel(name: str, args_type, params: int, dtype=None):
    """The library's `name` kernel for tensors of `dtype` (fp32 by default; bf16 takes `name`_bf16), its arguments
    declared as a pointer to `args_type` and `params` integers, once per library; None where the library, or its bf16
    kernels for bf16, are absent. The kernels of winograd.py, softmax.py and attention.py, whose argument structures
    live there."""
    import torch

    library = _load()[0]
    if library is None or (dtype == torch.bfloat16 and not library.kiln_native_bf16()):
        return None
    return _declared(library, name, args_type, params, dtype or torch.float32)


@functools.cache
def _declared(library, name: str, args_type, params: int, dtype):
    function = _typed(library, name, dtype)
    function.argtypes = [ctypes.POINTER(args_type)] + [ctypes.c_int64] * params
    function.restype = None
    return function


def _typed(library, name: str, dtype):
    """The library's `name` kernel for tensors of `dtype` (float32, or bfloat16 where bf16_available())."""
    import torch

    if dtype == torch.float32:
        return getattr(library, name)
    if dtype == torch.bfloat16 and library.kiln_native_bf16():
        return getattr(library, name + "_bf16")
    raise ValueError(f"no native {name} kernel for {dtype}")


# Blocks of 16 output channels one task computes (4 x 16 channels x 6 pixels fill 24 of the 32 vector registers);
# how many bytes of weights one pass over the input channels keeps in a core's L2 (2 MB here); how many pieces
# per thread a 1x1 convolution's pixels are cut into.
BLOCKS_PER_TASK = 4
WEIGHT_BYTES_PER_PASS = 1 << 20
TASKS_PER_THREAD = 8
_PIXELS_PER_TILE = {4: 6, 3: 8, 2: 12, 1: 14}  # native.cpp's tile widths


class DirectConvolution:
    """An fp32 NHWC convolution (groups of 1) with bias, an optional residual added and a clamp (ReLU, Clip, or
    none), run by native.cpp; weights packed once, as [out/16][kh][kw][in][16]. What every call on one input shape
    shares (output shape, schedule, the kernel's geometry) is planned once per shape and thread count: a small
    layer's call costs its Python as much as its sums."""

    def __init__(self, weight, bias, strides, pads, dilations, clamp: tuple[float, float]):
        import torch

        out_channels, in_channels, kh, kw = weight.shape
        w, self.bias = _blocked(weight, bias)
        self.weight = w.view(-1, 16, in_channels, kh, kw).permute(0, 3, 4, 2, 1).contiguous()
        self.out_channels, self.in_channels, self.kernel = out_channels, in_channels, (kh, kw)
        self.strides, self.pads, self.dilations = list(strides), list(pads), list(dilations)
        self.clamp = clamp
        self.dtype = torch.float32  # what it writes
        self.pointwise = (kh, kw) == (1, 1) and self.strides == [1, 1] and not any(self.pads)
        self._library = _load()[0]
        assert self._library is not None, "DirectConvolution needs available()"
        self._pointers = (self.weight.data_ptr(), self.bias.data_ptr())
        self._window = (kh, kw, *self.strides, *self.pads, *self.dilations)
        self._plans: dict[tuple, _DirectPlan] = {}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return window_output_sizes((h, w), self.kernel, self.strides, self.dilations, self.pads)

    def output_shape(self, x) -> tuple[int, int, int, int]:
        return (x.shape[0], self.out_channels, *self.output_size(x.shape[2], x.shape[3]))

    def __call__(self, x, residual=None, in_place: bool = False, out=None):
        """The convolution of NCHW `x` (any layout; NHWC is read without a copy) as an NHWC tensor, plus `residual`
        where given. `in_place` writes the sum into the residual's own buffer (the caller knows nothing else reads
        it); `out`, a channel slice of a wider NHWC buffer (a concatenation's), takes the result instead of a new
        tensor."""
        import torch

        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} float32 channels, got {tuple(x.shape)} {x.dtype}")
        threads = torch.get_num_threads()
        plan = self._plans.get((x.shape, threads)) or self._plan_for(x.shape, threads)
        x = channels_last(x)
        if residual is not None:
            if residual.shape != plan.shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {tuple(plan.shape)}")
            residual = channels_last(residual.to(torch.float32))
        # in place only where one pass over the input channels reads each residual element before writing it
        if out is None and in_place and residual is not None and plan.schedule[3] == self.in_channels \
                and residual.data_ptr() != x.data_ptr():
            y, ldy = residual, self.out_channels
        else:
            y, ldy = output_buffer(plan.shape, torch.float32, out)
        args = _ConvArgs(x.data_ptr(), *self._pointers, residual.data_ptr() if residual is not None else None,
                         y.data_ptr(), *plan.geometry, ldy, *self._window, *self.clamp)
        launch(self._library.kiln_conv_nhwc, args, *plan.schedule, threads, x=x, residual=residual, y=y)
        return y

    def _plan_for(self, input_shape, threads: int) -> "_DirectPlan":
        import torch

        n, c, h, w = input_shape
        oh, ow = self.output_size(h, w)
        shape = torch.Size((n, self.out_channels, oh, ow))
        schedule = self._schedule(n, 1, oh * ow, threads) if self.pointwise else self._schedule(n, oh, ow, threads)
        if self.pointwise:  # one row of h*w pixels: tiles never straddle an edge
            h, w, oh, ow = 1, h * w, 1, oh * ow
        plan = _DirectPlan(shape, schedule, (n, h, w, c, oh, ow, self.out_channels))
        self._plans[(input_shape, threads)] = plan
        return plan

    def _schedule(self, n: int, oh: int, ow: int, threads: int) -> tuple[int, int, int, int]:
        """(blocks per task, rows per task, columns per task, input channels per pass) for native.cpp."""
        blocks = _ceil_div(self.out_channels, 16)
        per_task = min(BLOCKS_PER_TASK, blocks)
        groups = _ceil_div(blocks, per_task)
        target = TASKS_PER_THREAD * threads
        if self.pointwise:  # split the pixel row into tiles' multiples
            tile = _PIXELS_PER_TILE[per_task]
            chunks = max(1, _ceil_div(target, n * groups))
            columns = _ceil_div(_ceil_div(ow, chunks), tile) * tile
            rows = 1
        else:  # a task per output row: the kernel hands them out one at a time
            columns, rows = ow, 1
        kh, kw = self.kernel
        channels = max(16, WEIGHT_BYTES_PER_PASS // (per_task * kh * kw * 64) // 16 * 16)
        return per_task, rows, columns, min(self.in_channels, channels)


class _DirectPlan(NamedTuple):
    shape: object  # the output's torch.Size
    schedule: tuple  # _schedule's
    geometry: tuple  # ConvArgs' n, h, w_, c, oh, ow, oc (a 1x1's pixels as one row)


def _channels_last_strides(shape) -> tuple:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


# Below this many input channels a convolution is a stem's (an image's 3 channels): StemConvolution takes it
STEM_MAX_IN_CHANNELS = 15
# Tasks a thread gets in a pooled stem: more balance the threads, fewer (taller bands) recompute fewer shared rows
POOL_TASKS_PER_THREAD = 4
POOL_MAX_KERNEL = 16  # the pooled stem keeps a window's rows in an array of this many


class StemConvolution:
    """A convolution of at most STEM_MAX_IN_CHANNELS input channels (groups of 1) from an NCHW input, with bias and a
    clamp, written NHWC in fp32 or bf16 (`dtype`): the 3-channel stems, whose loop over input channels is all overhead
    in the direct kernel.
    - fp32 math (fp32 out, and bf16 out where dilated): every (channel, ky, kx) is one tap of a flat reduction,
      weights packed once as [out/16][tap][16]; a padded layer reads a zero-padded copy of its input (torch's pad:
      0.03 ms on 3x224x224).
    - bf16 (`bf16_math`, undilated): AVX512-BF16 dot products over pairs of each kernel row's (kx, channel) elements,
      from a padded NHWC bf16 copy of the image that the kernel makes itself (native.cpp's kiln_stem_pairs_bf16).
      With `pool` (kernel, stride, pad, ceil mode: a square max pool after it, the fuse_stem_pool pass) it pools the
      rows it computes while they are in cache and writes only the pooled output (kiln_stem_pool_bf16)."""

    def __init__(self, weight, bias, strides, pads, dilations, clamp: tuple[float, float], dtype, pool=None):
        import torch

        out_channels, in_channels, kh, kw = weight.shape
        if in_channels > STEM_MAX_IN_CHANNELS:
            raise ValueError(f"a stem convolution takes at most {STEM_MAX_IN_CHANNELS} input channels, "
                             f"got {in_channels}")
        w, self.bias = _blocked(weight, bias)
        self.out_channels, self.in_channels, self.kernel = out_channels, in_channels, (kh, kw)
        self.strides, self.pads = [int(v) for v in strides], [int(v) for v in pads]
        self.dilations = [int(v) for v in dilations]
        self.clamp, self.dtype = clamp, dtype
        self._library = _load()[0]
        assert self._library is not None, "StemConvolution needs available()"
        self.bf16_math = dtype == torch.bfloat16 and self.dilations == [1, 1] and bool(self._library.kiln_native_bf16())
        self.pool = tuple(int(v) for v in pool) if pool is not None else None
        if self.pool is not None and not self.bf16_math:
            raise ValueError("a stem convolution pools only in bf16 math (bf16, undilated, AVX512-BF16)")
        if self.pool is not None and not 0 < self.pool[0] <= POOL_MAX_KERNEL:
            raise ValueError(f"a stem convolution pools windows of at most {POOL_MAX_KERNEL}, got {self.pool[0]}")
        if self.bf16_math:
            # [out/16][kh][pairs][16][2]: each kernel row's (kx, channel) elements in pairs, the odd one out with a zero
            elements = kw * in_channels
            rows = w.view(-1, 16, in_channels, kh, kw).permute(0, 3, 1, 4, 2).reshape(-1, kh, 16, elements)
            rows = torch.nn.functional.pad(rows, (0, elements % 2))
            self.weight = rows.view(rows.shape[0], kh, 16, -1, 2).permute(0, 1, 3, 2, 4).contiguous().to(torch.bfloat16)
            self._convolve = _declared(self._library, "kiln_stem_pairs", _StemPairArgs, 1, torch.bfloat16)
            self._pooled = _declared(self._library, "kiln_stem_pool", _StemPoolArgs, 1, torch.bfloat16)
        else:
            self.weight = w.view(-1, 16, in_channels * kh * kw).permute(0, 2, 1).contiguous()
            self._convolve = _typed(self._library, "kiln_stem_conv", dtype)
        self._offsets: dict[tuple, object] = {}  # padded image (h, w) -> tap offsets

    def output_shape(self, x) -> tuple[int, int, int, int]:
        """The output's shape for input `x` (pooled where the layer pools)."""
        shape = self._convolution_shape(x)
        if self.pool is None:
            return shape
        kernel, stride, pad, ceil_mode = self.pool
        return (*shape[:2], *window_output_sizes(shape[2:], [kernel] * 2, [stride] * 2, [1, 1], [pad] * 2, bool(ceil_mode)))

    def _convolution_shape(self, x) -> tuple[int, int, int, int]:
        return (x.shape[0], self.out_channels,
                *window_output_sizes(x.shape[2:], self.kernel, self.strides, self.dilations, self.pads))

    def __call__(self, x, residual=None, in_place: bool = False, out=None):
        """The convolution of NCHW `x` (any float type and layout) as an NHWC tensor of `dtype`."""
        import torch
        import torch.nn.functional as F

        if residual is not None or out is not None:
            raise ValueError("a stem convolution takes no residual and writes a tensor of its own")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [n, {self.in_channels}, h, w], got {tuple(x.shape)}")
        shape = self.output_shape(x)
        (ph, pw), (sh, sw) = self.pads, self.strides
        x = x.to(torch.float32).contiguous()
        if self.bf16_math:
            y = output_buffer(shape, self.dtype)[0]
            if y.numel():
                n, c, h, w = x.shape
                convolution = (x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(), y.data_ptr(), n, c, h, w, ph,
                               pw, h + 2 * ph, w + 2 * pw, *self.kernel, *self._convolution_shape(x)[2:],
                               self.out_channels, sh, sw, *self.clamp)
                threads = torch.get_num_threads()
                if self.pool is None:
                    launch(self._convolve, _StemPairArgs(*convolution), threads, x=x, y=y)
                else:
                    kernel, stride, pad, _ = self.pool
                    # bands of pooled rows: about POOL_TASKS_PER_THREAD tasks a thread, each as tall as that allows
                    groups = _ceil_div(_ceil_div(self.out_channels, 16), 4)
                    band = max(1, _ceil_div(n * shape[2] * groups, POOL_TASKS_PER_THREAD * threads))
                    args = _StemPoolArgs(*convolution, y.data_ptr(), kernel, stride, pad, *shape[2:], band)
                    launch(self._pooled, args, threads, x=x, y=y)
            return y
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        hp, wp = x.shape[2:]
        offsets = self._offsets.get((hp, wp))
        if offsets is None:
            (kh, kw), (dh, dw) = self.kernel, self.dilations
            taps = [c * hp * wp + ky * dh * wp + kx * dw
                    for c in range(self.in_channels) for ky in range(kh) for kx in range(kw)]
            offsets = self._offsets[(hp, wp)] = torch.tensor(taps, dtype=torch.int64)
        y = output_buffer(shape, self.dtype)[0]
        if y.numel():
            args = _StemArgs(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(), y.data_ptr(),
                             offsets.data_ptr(), shape[0], self.in_channels * hp * wp, wp, offsets.numel(), shape[2],
                             shape[3], self.out_channels, sh, sw, *self.clamp)
            launch(self._convolve, args, torch.get_num_threads(), x=x, y=y)
        return y


def _blocked(weight, bias):
    """fp32 weights [out, in, kh, kw] and bias [out] (zeros where None), zero-padded to whole blocks of 16 output
    channels, which the kernels compute and never store."""
    import torch

    out_channels = weight.shape[0]
    padded = _ceil_div(out_channels, 16) * 16
    w = torch.zeros(padded, *weight.shape[1:])
    w[:out_channels] = torch.from_numpy(np.array(weight, dtype=np.float32))
    b = torch.zeros(padded)
    if bias is not None:
        b[:out_channels] = torch.from_numpy(np.array(bias, dtype=np.float32))
    return w, b


def output_buffer(shape, dtype, out=None):
    """(the tensor a kernel writes, elements between its pixels): `out` where given, which must be `shape`, `dtype`,
    and NHWC pixels at one stride (a channel slice of a wider NHWC buffer: how native.cpp writes), else a new
    channels-last tensor."""
    import torch

    if out is None:
        return torch.empty_strided(shape, _channels_last_strides(shape), dtype=dtype), shape[1]
    pixel = _pixel_stride(out)
    if tuple(out.shape) != shape or out.dtype != dtype or pixel is None:
        raise ValueError(f"out must be a {dtype} channel slice of an NHWC buffer of shape {shape}; "
                         f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")
    return out, pixel


def _pixel_stride(x) -> int | None:
    """The elements between consecutive pixels where 4-D `x` is NHWC pixels at one stride (channels contiguous:
    channels-last, or a channel slice of a wider channels-last buffer), else None."""
    if x.dim() != 4:
        return None
    n, c, h, w = x.shape
    if c > 1 and x.stride(1) != 1:
        return None
    # the stride a dimension of size > 1 must have, per pixel stride p: w -> p, h -> w * p, n -> h * w * p
    spans = [(size, stride, pixels) for size, stride, pixels in ((w, x.stride(3), 1), (h, x.stride(2), w), (n, x.stride(0), h * w))
             if size > 1]
    pixel = spans[0][1] // spans[0][2] if spans else c
    if pixel < c or any(stride != pixels * pixel for _, stride, pixels in spans):
        return None
    return pixel


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def window_output_size(size: int, kernel: int, stride: int, dilation: int, pad: int, ceil_mode: bool = False) -> int:
    """torch's output size of a sliding window (a convolution's, or a pool's: in ceil mode a last window that would
    start in the right padding is dropped)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (_ceil_div(span, stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def window_output_sizes(spatial, kernel, strides, dilations, pads, ceil_mode: bool = False) -> tuple[int, ...]:
    """window_output_size along each spatial axis (`pads` one per axis, symmetric)."""
    return tuple(window_output_size(size, k, s, d, p, ceil_mode)
                 for size, k, s, d, p in zip(spatial, kernel, strides, dilations, pads))


class MaxPool:
    """An NHWC max pool in fp32 or bf16 with symmetric padding (padding never wins; NaN propagates, as in torch's),
    run by native.cpp: 0.28 against torch's 0.59 ms on 64x111x111 fp32 here; since its NaN check moved from every
    tap to a running sum per window, 0.72-0.82x of that (SqueezeNet's and ResNet's pools, fp32 and bf16)."""

    def __init__(self, kernel, strides, pads, dilations, ceil_mode: bool):
        self.kernel, self.strides, self.pads, self.dilations = list(kernel), list(strides), list(pads), list(dilations)
        self.ceil_mode = ceil_mode
        self._library = _load()[0]
        assert self._library is not None, "MaxPool needs available()"
        self._kernels = _typed_kernels(self._library, "kiln_max_pool_nhwc")
        self._window = (*self.kernel, *self.strides, *self.pads, *self.dilations)
        self._outputs: dict[tuple, tuple] = {}  # input shape -> (output shape, its channels-last strides)

    def __call__(self, x):
        import torch

        pool = self._kernels.get(x.dtype) or _typed(self._library, "kiln_max_pool_nhwc", x.dtype)
        output = self._outputs.get(x.shape)
        if output is None:
            n, c, h, w = x.shape
            shape = (n, c, *window_output_sizes((h, w), self.kernel, self.strides, self.dilations, self.pads,
                                                self.ceil_mode))
            output = self._outputs[x.shape] = (shape, _channels_last_strides(shape))
        x = channels_last(x)
        y = torch.empty_strided(*output, dtype=x.dtype)
        n, c, h, w = x.shape
        args = _PoolArgs(x.data_ptr(), y.data_ptr(), n, h, w, c, *output[0][2:], *self._window)
        launch(pool, args, torch.get_num_threads(), x=x, y=y)
        return y


class AveragePool:
    """An NHWC average pool in fp32 or bf16 (fp32 sums) with pads of their own at each end ([top, left, bottom,
    right]), dividing by the taps inside the input or, with `count_include_pad`, inside the padded input; the
    output size is the caller's (ONNX's, ceil mode included). GoogLeNet's 7x7 average with its one-sided pad took
    torch's general kernel 0.75 ms in bf16."""

    def __init__(self, kernel, strides, pads, count_include_pad: bool):
        self.kernel, self.strides = [int(v) for v in kernel], [int(v) for v in strides]
        self.pads = [int(v) for v in pads]
        if len(self.kernel) != 2 or len(self.strides) != 2 or len(self.pads) != 4:
            raise ValueError(f"a 2-D pool takes 2 kernel sizes, 2 strides and 4 pads, got {kernel}, {strides}, {pads}")
        self.count_include_pad = int(bool(count_include_pad))
        self._library = _load()[0]
        assert self._library is not None, "AveragePool needs available()"
        self._kernels = _typed_kernels(self._library, "kiln_average_pool_nhwc")

    def __call__(self, x, output_size: tuple[int, int]):
        import torch

        pool = self._kernels.get(x.dtype) or _typed(self._library, "kiln_average_pool_nhwc", x.dtype)
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D tensor, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        shape = (n, c, *output_size)
        x = channels_last(x)
        y = torch.empty_strided(shape, _channels_last_strides(shape), dtype=x.dtype)
        (ph, pw, ph_end, pw_end) = self.pads
        if y.numel():
            args = _AvgPoolArgs(x.data_ptr(), y.data_ptr(), n, h, w, c, *output_size, *self.kernel, *self.strides,
                                ph, pw, ph_end, pw_end, self.count_include_pad)
            launch(pool, args, torch.get_num_threads(), x=x, y=y)
        return y


def channels_last(x):
    """`x` (4-D) as an NHWC tensor: itself where it is one; an NCHW-contiguous fp32 or bf16 one transposed by
    native.cpp (a launch, which a replay repeats: replay.py), where the library runs; anything else by torch."""
    import torch

    if x.is_contiguous(memory_format=torch.channels_last):
        return x
    library = _load()[0]
    if library is None or not x.is_contiguous() or x.dtype not in (torch.float32, torch.bfloat16) \
            or (x.dtype == torch.bfloat16 and not library.kiln_native_bf16()):
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    y = torch.empty_strided(x.shape, _channels_last_strides(x.shape), dtype=x.dtype)
    if x.numel():
        launch(_typed(library, "kiln_nchw_to_nhwc", x.dtype), _TransposeArgs(x.data_ptr(), y.data_ptr(), n, c, h * w),
               torch.get_num_threads(), x=x, y=y)
    return y


def global_average_pool(x):
    """The mean over the pixels of a 4-D fp32 or bf16 tensor, per image and channel ([n, c, 1, 1], x's type) in one
    native pass with fp32 sums: 0.05 against torch's 0.3 ms on SqueezeNet's last 1000x13x13 in bf16. A tensor
    that is not channels-last is made so first."""
    import torch

    library = _load()[0]
    assert library is not None, "global_average_pool needs available()"
    mean = _typed(library, "kiln_pixel_mean", x.dtype)
    n, c, h, w = x.shape
    x = channels_last(x)
    y = torch.empty(n, c, 1, 1, dtype=x.dtype)
    if x.numel():
        launch(mean, _MeanArgs(x.data_ptr(), y.data_ptr(), n, h * w, c), torch.get_num_threads(), x=x, y=y)
    return y


class LocalResponseNorm:
    """ONNX's LRN, y = x / (bias + alpha / size * sum of x² over `size` neighbouring channels) ** beta, over a 4-D
    fp32 or bf16 tensor in one native pass (fp32 sums), written channels-last in x's type: GoogLeNet's two, on
    64 and 192 channels at 56x56, took torch's reference kernel 2-3 ms each in bf16. Takes beta 0.75, 0.5 or 1 with
    bias > 0 and alpha >= 0 (`takes` says why not otherwise)."""

    POWERS = {0.75: 0, 0.5: 1, 1.0: 2}  # beta -> native.cpp's power code

    def __init__(self, size: int, alpha: float, beta: float, bias: float):
        why_not = self.takes(size, alpha, beta, bias)
        if why_not:
            raise ValueError(f"native LRN {why_not}")
        self.size, self.power = int(size), self.POWERS[float(beta)]
        self.scale, self.bias = float(alpha) / int(size), float(bias)
        self._library = _load()[0]
        assert self._library is not None, "LocalResponseNorm needs available()"
        self._kernels = _typed_kernels(self._library, "kiln_lrn_nhwc")

    @classmethod
    def takes(cls, size, alpha, beta, bias) -> str:
        """'' where the kernel runs this LRN, else why not."""
        if float(beta) not in cls.POWERS:
            return f"takes beta 0.75, 0.5 or 1, got {beta}"
        if not float(bias) > 0 or not float(alpha) >= 0 or int(size) < 1:
            return f"needs bias > 0, alpha >= 0 and size >= 1, got bias {bias}, alpha {alpha}, size {size}"
        return ""

    def __call__(self, x):
        import torch

        lrn = self._kernels.get(x.dtype) or _typed(self._library, "kiln_lrn_nhwc", x.dtype)
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D tensor, got shape {tuple(x.shape)}")
        x = channels_last(x)
        y = torch.empty_strided(x.shape, _channels_last_strides(x.shape), dtype=x.dtype)
        n, c, h, w = x.shape
        before = (self.size - 1) // 2
        if x.numel():
            args = _LrnArgs(x.data_ptr(), y.data_ptr(), n * h * w, c, before, self.size - 1 - before,
                            self.scale, self.bias, self.power)
            launch(lrn, args, torch.get_num_threads(), x=x, y=y)
        return y


class ChannelAffine:
    """y = clamp(x * scale[c] + shift[c], lo, hi) along axis 1 of an fp32 or bf16 tensor, in one pass (an inference
    BatchNormalization and its ReLU): scale and shift stay fp32 for both. NCHW-contiguous and channels-last
    tensors, and channel slices of a wider channels-last buffer (concat.py's), are read in place; anything else is
    made contiguous first."""

    def __init__(self, scale, shift, clamp: tuple[float, float]):
        import torch

        self.scale = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(-1))
        self.shift = torch.from_numpy(np.ascontiguousarray(shift, dtype=np.float32).reshape(-1))
        if self.scale.shape != self.shift.shape:
            raise ValueError(f"scale of {self.scale.numel()} channels, shift of {self.shift.numel()}")
        self.clamp = clamp
        self._library = _load()[0]
        assert self._library is not None, "ChannelAffine needs available()"
        self._kernels = _typed_kernels(self._library, "kiln_channel_affine")
        self._pointers = (self.scale.data_ptr(), self.shift.data_ptr())

    def __call__(self, x):
        import torch

        affine = self._kernels.get(x.dtype) or _typed(self._library, "kiln_channel_affine", x.dtype)
        if x.dim() < 2 or x.shape[1] != self.scale.numel():
            raise ValueError(f"expected {self.scale.numel()} channels on axis 1, got shape {tuple(x.shape)}")
        c = x.shape[1]
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        pixel = c if channels_last else _pixel_stride(x)
        if pixel is not None and not x.is_contiguous():  # NHWC, or a channel slice of a wider NHWC buffer
            outer, inner, ldx = x.numel() // c, 1, pixel
            y = torch.empty_strided(x.shape, _channels_last_strides(x.shape), dtype=x.dtype)
        else:
            x = x.contiguous()
            outer, inner, ldx = x.shape[0], x.numel() // max(1, x.shape[0] * c), c
            y = torch.empty_like(x)
        args = _AffineArgs(x.data_ptr(), y.data_ptr(), *self._pointers, outer, c, inner, ldx, *self.clamp)
        if x.numel():
            launch(affine, args, torch.get_num_threads(), x=x, y=y)
        return y


# Tasks per thread the AMX kernel aims for: a small layer's tasks are split along its output channels too, so that
# both cores get work
AMX_TASKS_PER_THREAD = 4


class AmxConvolution:
    """A bf16 NHWC convolution (groups of 1, input channels a multiple of 16, one stride for both axes) on AMX
    tiles with fp32 sums, bias, an optional residual and a clamp, run by native.cpp; bf16 out. A 1x1 with stride 1
    and no padding reads its input in place; others read a zero-padded copy split by the stride into phase images
    (native.cpp says why), and take a dilation only at stride 1. Weights packed once as [out/16][tap][in/2][16][2].

    Not taken: input channels that are no multiple of 16 (the 3-channel stems). Unrolled into one row per output
    pixel (im2col), ResNet's 7x7/2 stem ran 1.9x oneDNN's time here: the 4 MB of rows cost more than the sums.
    Folding only each row's 7 taps into the channels (1.6 MB, taps along rows only) still ran 1.8-2.1x."""

    def __init__(self, weight, bias, strides, pads, dilations, clamp: tuple[float, float]):
        import torch

        out_channels, in_channels, kh, kw = weight.shape
        why_not = self.takes(in_channels, strides, dilations)
        if why_not:
            raise ValueError(f"AMX convolution {why_not}")
        w, self.bias = _blocked(weight, bias)
        self.weight = w.view(-1, 16, in_channels // 2, 2, kh, kw).permute(0, 4, 5, 2, 1, 3).contiguous().to(torch.bfloat16)
        self.out_channels, self.in_channels, self.kernel = out_channels, in_channels, (kh, kw)
        self.stride, self.pads, self.dilations = int(strides[0]), list(pads), [int(d) for d in dilations]
        self.clamp = clamp
        self.dtype = torch.bfloat16  # what it writes
        self.reads_input_in_place = (kh, kw) == (1, 1) and self.stride == 1 and not any(self.pads)
        self._library = _load()[0]
        self._plans: dict[tuple, _AmxPlan] = {}
        self._zero_tap = torch.zeros(1, dtype=torch.int64)
        self._pointers = (self.weight.data_ptr(), self.bias.data_ptr())
        assert amx_available(), "AmxConvolution needs amx_available()"

    @staticmethod
    def takes(in_channels: int, strides, dilations) -> str:
        """'' where the kernel takes a convolution of these input channels, strides and dilations, else why not."""
        if in_channels % 16:
            return f"needs input channels a multiple of 16, got {in_channels}"
        if strides[0] != strides[1]:
            return f"needs one stride for both axes, got {list(strides)}"
        if strides[0] > 1 and list(dilations) != [1, 1]:
            return "takes a dilation only at stride 1"
        return ""

    def output_shape(self, x) -> tuple[int, int, int, int]:
        import torch

        threads = torch.get_num_threads()
        return tuple((self._plans.get((x.shape, threads)) or self._plan_for(x.shape, threads)).shape)

    def __call__(self, x, residual=None, in_place: bool = False, out=None):
        """The convolution of NCHW `x` (fp32 or bf16, any layout) as an NHWC bf16 tensor, plus `residual`.
        `in_place` writes the sum into a bf16 residual's own buffer (each output pixel is read, then written, once);
        `out`, a channel slice of a wider NHWC bf16 buffer (a concatenation's), takes the result instead."""
        import torch

        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {x.shape[1]}")
        threads = torch.get_num_threads()
        plan = self._plans.get((x.shape, threads)) or self._plan_for(x.shape, threads)
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        source = self._prepared(x, plan)
        bf16_residual = 0
        if residual is not None:
            if residual.shape != plan.shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {tuple(plan.shape)}")
            if residual.dtype not in (torch.bfloat16, torch.float32):
                residual = residual.to(torch.float32)
            residual = channels_last(residual)
            bf16_residual = int(residual.dtype == torch.bfloat16)
        if out is None and in_place and bf16_residual and residual.data_ptr() != x.data_ptr():
            y, ldy = residual, self.out_channels
        else:
            y, ldy = output_buffer(plan.shape, torch.bfloat16, out)
        args = _AmxConvArgs(source.data_ptr(), *self._pointers, residual.data_ptr() if residual is not None else None,
                            y.data_ptr(), plan.taps.data_ptr(), *plan.geometry, ldy, bf16_residual, *self.clamp)
        launch(self._library.kiln_conv_amx, args, plan.pairs_per_task, threads, x=source, residual=residual, y=y)
        return y

    def _prepared(self, x, plan):
        """The buffer the kernel reads for bf16 `x`: x itself (NHWC) for a 1x1 that reads in place, else its phase
        images."""
        import torch

        if plan.prepare is None:
            return channels_last(x)
        phases = torch.empty(plan.prepared_pixels, self.in_channels, dtype=torch.bfloat16)
        prepare = _PrepareArgs(x.data_ptr(), phases.data_ptr(), *x.shape, *x.stride(), *self.pads, *plan.prepare)
        launch(self._library.kiln_prepare_phases, prepare, plan.threads, x=x, y=phases)
        return phases

    def _plan_for(self, input_shape, threads: int) -> "_AmxPlan":
        """What every call on an input of `input_shape` shares (kept per shape and thread count): the output shape,
        PrepareArgs' fields from `s` on (None where the input is read in place), the kernel's pixels per image,
        numbered width and tap offsets, the prepared buffer's pixels, and the output-channel pairs per task."""
        import torch

        n, _, h, w = input_shape
        (kh, kw), s, (ph, pw), (dh, dw) = self.kernel, self.stride, self.pads, self.dilations
        spatial = window_output_sizes((h, w), self.kernel, (s, s), self.dilations, self.pads)
        shape = torch.Size((n, self.out_channels, *spatial))
        oh, ow = shape[2:]
        if self.reads_input_in_place:
            prepare, image_pixels, wv, taps, prepared_pixels = None, h * w, w, self._zero_tap, 0
        else:
            pa, pb = min(s, kh), min(s, kw)
            hq, wq = _ceil_div(h + 2 * ph, s), _ceil_div(w + 2 * pw, s)
            image_pixels, wv = pa * pb * hq * wq, wq
            taps = torch.tensor([((ky % s) * pb + kx % s) * hq * wq + (ky // s) * dh * wq + (kx // s) * dw
                                 for ky in range(kh) for kx in range(kw)], dtype=torch.int64)
            # the last 32-pixel block of the last image reads up to 31 numbered pixels past its last output
            last_read = (n - 1) * image_pixels + _ceil_div((oh - 1) * wq + ow, 32) * 32 - 1 + int(taps.max())
            tail = max(0, last_read + 1 - n * image_pixels)
            prepare, prepared_pixels = (s, pa, pb, hq, wq, tail), n * image_pixels + tail
        pairs = _ceil_div(_ceil_div(self.out_channels, 16), 2)
        blocks = n * _ceil_div(oh * wv, 32)
        groups = max(1, min(pairs, _ceil_div(AMX_TASKS_PER_THREAD * threads, blocks)))
        pixels = prepared_pixels if prepare is not None else n * h * w  # in the buffer the kernel reads
        geometry = (n, self.in_channels, pixels, image_pixels, wv, taps.numel(), oh, ow, self.out_channels)
        plan = _AmxPlan(shape, prepare, taps, prepared_pixels, _ceil_div(pairs, groups), threads, geometry)
        self._plans[(input_shape, threads)] = plan
        return plan


class _AmxPlan(NamedTuple):
    shape: object  # the output's torch.Size
    prepare: tuple | None
    taps: object  # int64 tensor
    prepared_pixels: int
    pairs_per_task: int
    threads: int
    geometry: tuple  # AmxConvArgs' n, c, pixels, image_pixels, wv, tap_count, oh, ow, oc