"""malloc keeps a CPU engine's freed activations (kiln/backends/cpu/heap.py): checked in a fresh process each, since
the settings are process-wide, through glibc's own account of its heap (mallinfo2)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from kiln.backends.cpu import heap

pytestmark = pytest.mark.skipif(heap._mallopt() is None, reason="needs glibc's malloc")

PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from kiln.backends.cpu import heap

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    peak, largest, size = (int(a) for a in sys.argv[1:4])
    changed = heap.keep_freed_memory(peak, largest)
    block = torch.empty(size // 4).fill_(1.0)  # an activation of `size` bytes, written
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    print(json.dumps({"changed": changed, "mapped_during": during.hblkhd, "heap_after_free": after.arena,
                      "free_in_heap_after": after.fordblks}))
""")


def probe(peak: int, largest: int, size: int, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(peak), str(largest), str(size)], capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


MIB = 1 << 20


def test_a_freed_activation_stays_in_the_heap():
    kept = probe(peak=100 * MIB, largest=24 * MIB, size=24 * MIB)
    assert kept["changed"]
    assert kept["mapped_during"] < 24 * MIB  # served from the heap, not a fresh mapping
    assert kept["free_in_heap_after"] >= 24 * MIB  # and still there, free, for the next run


def test_without_it_malloc_maps_the_block_and_gives_it_back():
    default = probe(peak=100 * MIB, largest=24 * MIB, size=24 * MIB, KILN_KEEP_FREED_MEMORY="0")
    assert not default["changed"]
    assert default["mapped_during"] >= 24 * MIB
    assert default["free_in_heap_after"] < 24 * MIB


def test_activations_over_the_mapping_ceiling_turn_mappings_off():
    large = 48 * MIB  # over glibc's 32 MiB ceiling on the mapping threshold
    kept = probe(peak=200 * MIB, largest=large, size=large)
    assert kept["mapped_during"] < large and kept["free_in_heap_after"] >= large
    under = probe(peak=200 * MIB, largest=24 * MIB, size=large)  # the engine's own blocks fit: mappings stay on
    assert under["mapped_during"] >= large


def test_settings_only_grow(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda option, value: calls.append((option, value)) or 1)
    monkeypatch.setattr(heap, "_kept", {"trim": 0, "mappings_off": False})
    assert heap.keep_freed_memory(200 * MIB, 10 * MIB)
    assert (heap.M_TRIM_THRESHOLD, 400 * MIB) in calls and (heap.M_MMAP_THRESHOLD, 32 * MIB) in calls
    calls.clear()
    assert not heap.keep_freed_memory(50 * MIB, 10 * MIB)  # a smaller engine after it changes nothing
    assert calls == []


def test_a_cpu_engine_sizes_malloc_by_its_memory_plan(monkeypatch, tmp_path):
    """Built or loaded, a CPU engine asks malloc to keep its plan's peak and largest activation."""
    import kiln
    from backends.test_cpu_fast import residual_block_model

    asked = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda peak, largest: asked.append((peak, largest)) or True)
    engine = kiln.build(residual_block_model(False), kiln.BuilderConfig())
    memory = engine.plan.memory
    expected = (memory["peak_bytes"], max(b["bytes"] for b in memory["buffers"]))
    assert asked == [expected] and expected[0] > 0
    engine.save(tmp_path / "block.kiln")
    kiln.load(tmp_path / "block.kiln").program  # noqa: B018 (lowering happens here)
    assert asked == [expected, expected]
