"""Peak host and device memory while kiln builds or runs, sampled by a background thread into a timeline."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field


def host_resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_peak_resident_bytes() -> int:
    """The kernel's own high-water mark of resident memory (VmHWM), which catches peaks between samples."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def reset_host_peak() -> bool:
    """Restart the kernel's VmHWM count from the current resident size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_available_bytes() -> int | None:
    """Memory the system can still give a process without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def device_available_bytes(device: str) -> int | None:
    """Free memory on the GPU (None for the CPU or without CUDA)."""
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _device_allocated(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated())


def format_bytes(count: float | None) -> str:
    if count is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


@dataclass
class MemoryMonitor:
    """`with MemoryMonitor() as memory: ...` samples resident memory every `interval` seconds.

    Peaks come from the samples and, on Linux, from the kernel's high-water mark (reset on entry), so a
    spike shorter than the interval still counts. On a CUDA device the device peak is torch's allocator
    peak (max_memory_allocated), reset on entry.
    """

    device: str = "cpu"
    interval: float = 0.02
    timeline: list[dict] = field(default_factory=list)  # {"seconds", "host_bytes", "device_bytes", "label"}
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    baseline_host_bytes: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self._label = ""
        self._kernel_peak = False

    def __enter__(self) -> "MemoryMonitor":
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._kernel_peak = reset_host_peak()
        self._start = time.perf_counter()
        self.baseline_host_bytes = host_resident_bytes()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kiln-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def mark(self, label: str) -> None:
        """Name the phase that starts now; the timeline records it with the next sample."""
        self._label = label
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        host = host_resident_bytes()
        device = _device_allocated(self.device)
        self.peak_host_bytes = max(self.peak_host_bytes, host)
        self.peak_device_bytes = max(self.peak_device_bytes, device)
        self.timeline.append({"seconds": round(time.perf_counter() - self._start, 4), "host_bytes": host,
                              "device_bytes": device, "label": self._label})

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._kernel_peak:
            self.peak_host_bytes = max(self.peak_host_bytes, host_peak_resident_bytes())
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_device_bytes = max(self.peak_device_bytes, int(torch.cuda.max_memory_allocated()))

    def summary(self) -> dict:
        return {"device": self.device, "peak_host_bytes": self.peak_host_bytes, "baseline_host_bytes": self.baseline_host_bytes,
                "peak_device_bytes": self.peak_device_bytes if self.device == "cuda" else None,
                "seconds": self.timeline[-1]["seconds"] if self.timeline else 0.0}

    def describe(self) -> str:
        """One line for people: `peak host memory 1.2 GiB (+300.0 MiB over the start)[, peak device memory ...]`."""
        text = (f"peak host memory {format_bytes(self.peak_host_bytes)} "
                f"(+{format_bytes(max(0, self.peak_host_bytes - self.baseline_host_bytes))} over the start)")
        if self.device == "cuda":
            text += f", peak device memory {format_bytes(self.peak_device_bytes)}"
        return text
