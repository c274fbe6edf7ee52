"""Keeps the memory a CPU engine frees inside the process for its next run, as onnxruntime's arena does.

Why: glibc's malloc serves a large block (its threshold starts at 128 KiB) with a fresh mapping and hands it back to
the kernel when it is freed, and trims the heap's free top the same way. The next run maps it again, and the kernel
zeroes every page before the layer can write it. In ResNet-50 at batch 8 the first 64->256 1x1 convolution, whose
25.7 MB output is such a block, took 6.2 ms in the engine against 1.9 ms alone (docs/benchmarks.md, run R).

kiln raises malloc's mapping threshold to glibc's ceiling (32 MiB) and its trim threshold to twice the engine's
peak activation bytes, so freed activations stay in the heap; an engine with a single activation over 32 MiB turns
mappings off altogether. These are process-wide settings of glibc's malloc, which only ever grow. They cost the
process up to that much resident memory between runs. `KILN_KEEP_FREED_MEMORY=0` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

from ... import log

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_CEILING = 32 << 20  # glibc refuses a larger mapping threshold on 64-bit systems
SMALLEST_TRIM_THRESHOLD = 64 << 20
ENVIRONMENT_SWITCH = "KILN_KEEP_FREED_MEMORY"

_lock = threading.Lock()
_kept = {"trim": 0, "mappings_off": False}  # what this process has set so far: settings only ever grow


@functools.cache
def _mallopt():
    """glibc's mallopt, or None off Linux or under another C library (musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory(peak_bytes: int, largest_bytes: int) -> bool:
    """Set malloc so that an engine whose activations peak at `peak_bytes`, the largest `largest_bytes`, finds its
    freed blocks again on its next run. Returns whether anything was changed."""
    mallopt = _mallopt()
    if mallopt is None or os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return False
    trim = min(max(2 * int(peak_bytes), SMALLEST_TRIM_THRESHOLD), 2**31 - 1)
    mappings_off = largest_bytes > MMAP_THRESHOLD_CEILING
    with _lock:
        changed = False
        if trim > _kept["trim"]:
            # setting either threshold also stops glibc from moving them itself
            if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING) and mallopt(M_TRIM_THRESHOLD, trim):
                _kept["trim"] = trim
                changed = True
        if mappings_off and not _kept["mappings_off"] and mallopt(M_MMAP_MAX, 0):
            _kept["mappings_off"] = changed = True
    if changed:
        log.verbose("malloc keeps freed memory: blocks up to %d MiB from the heap%s, %d MiB of free heap kept (%s=0 "
                    "leaves malloc as it is)", MMAP_THRESHOLD_CEILING >> 20,
                    " and no mappings" if _kept["mappings_off"] else "", _kept["trim"] >> 20, ENVIRONMENT_SWITCH)
    return changed


def keep_for_plan(memory: dict) -> bool:
    """keep_freed_memory for a plan's recorded memory plan (kiln/engine/memory.py); nothing without one."""
    buffers = memory.get("buffers") or []
    if not memory.get("peak_bytes"):
        return False
    return keep_freed_memory(memory["peak_bytes"], max((b["bytes"] for b in buffers), default=0))
