"""Choosing, layer by layer, between kiln's native convolution and oneDNN's by timing both inside the engine.

Why inside: alone, the native kernel takes 0.8-0.95x oneDNN's time on most ResNet-50, SqueezeNet and DenseNet
layers, but in the running engine, where weights and activations arrive cold, ResNet-50's 3x3 layers took 1.11x
oneDNN's and SqueezeNet's 0.89x (docs/benchmarks.md, run H). So the builder runs the engine both ways, in turns,
times every layer as it runs there, and keeps the faster tactic per layer, as TensorRT keeps the fastest tactic it
timed. Per-layer times taken in the two pure engines do not add up to the engine that mixes them (in run H a
ResNet-50 b1 built on per-layer wins ran 1.05-1.08x the oneDNN-only engine), so the mixed engine is then timed whole
against both pure ones, and the native kernel stays only in an engine that runs at least ENGINE_MARGIN faster
than oneDNN's alone. The choice is recorded in the plan's layers, and a loaded engine follows it instead of timing
again.
"""
from __future__ import annotations

import time

ROUNDS = 7  # timed runs of each program, in turns, after one warm-up; a layer's time is its fastest run
# Each of the two timings stops adding rounds past this many seconds (after MIN_ROUNDS): a large model at a large
# batch (VGG-19, ResNet-50 b8) would otherwise add tens of seconds to its build.
BUDGET_S = 2.0
MIN_ROUNDS = 2
# The native kernel must beat oneDNN's by this share per layer, and an engine with native kernels oneDNN's alone by
# ENGINE_MARGIN: a near tie stays with oneDNN, whose kernels are the more widely tested. The engine's margin is the
# smaller one because whole runs in turns vary less than single layers: ResNet-50 b1 with its 11 Winograd 3x3s ran
# 5.5-6.0% under the oneDNN engine in alternating runs, and the race, at 5%, kept oneDNN's.
NATIVE_MARGIN = 0.05
ENGINE_MARGIN = 0.02
NATIVE, ONEDNN, MIXED = "native", "onednn", "mixed"
WHOLE_ROUNDS = 5  # whole-engine runs of each candidate, each after a pause and an untimed run (as benchmarks time)
SETTLE_S = 0.02
clock = time.perf_counter  # what the timings read (tests substitute a fake clock)


def timing_feed(graph, sizes: dict[str, int]):
    """Random inputs (fixed seed) at the profile's opt shapes, or None where an input is not a float tensor with a
    known shape (token ids or masks, whose values a random feed would get wrong)."""
    import torch

    from ...ir.dtypes import to_torch

    generator = torch.Generator().manual_seed(0)
    feed = {}
    for value in graph.inputs:
        if value.shape is None or not value.dtype.is_float:
            return None
        shape = [d if isinstance(d, int) else sizes.get(d) for d in value.shape]
        if any(d is None for d in shape):
            return None
        feed[value.name] = torch.randn(shape, generator=generator).to(to_torch(value.dtype))
    return feed


def fastest(programs: dict[str, object], feed: dict, layers: list[str]) -> dict[str, str] | None:
    """For each of `layers`, the key of the program (NATIVE or ONEDNN) whose step ran it faster, each program run
    ROUNDS times in turns on `feed`; None where a run fails (the build then keeps the rule's choice)."""
    import torch

    best: dict[str, dict[str, float]] = {key: {} for key in programs}

    def timer(key):
        last = [0.0]

        def on_step(step, env=None):
            now = clock()
            elapsed = now - last[0]
            best[key][step.name] = min(best[key].get(step.name, elapsed), elapsed)
            last[0] = now

        return on_step, last

    order = list(programs)
    try:
        with torch.inference_mode():
            for program in programs.values():
                program.execute(dict(feed))
            started = clock()
            for round_ in range(ROUNDS):
                if round_ >= MIN_ROUNDS and clock() - started > BUDGET_S:
                    break
                for key in order if round_ % 2 == 0 else order[::-1]:
                    on_step, last = timer(key)
                    last[0] = clock()
                    programs[key].execute(dict(feed), on_step=on_step)
    except Exception:  # noqa: BLE001 (a model the random feed cannot run: keep the rule's choice)
        return None
    return {name: NATIVE if best[NATIVE][name] <= (1 - NATIVE_MARGIN) * best[ONEDNN][name] else ONEDNN for name in layers}


def fastest_engine(programs: dict[str, object], feed: dict) -> str:
    """The key of the fastest of `programs` (ONEDNN, NATIVE and maybe MIXED), each run whole WHOLE_ROUNDS times in
    turns, its median taken; a program with native kernels must run ENGINE_MARGIN under ONEDNN's to be chosen, and
    NATIVE ENGINE_MARGIN under MIXED's where there is one."""
    import statistics

    import torch

    times: dict[str, list[float]] = {key: [] for key in programs}
    started = clock()
    with torch.inference_mode():
        for round_ in range(WHOLE_ROUNDS):
            if round_ >= MIN_ROUNDS and clock() - started > BUDGET_S:
                break
            for key, program in programs.items():
                time.sleep(SETTLE_S)  # the last runner's spinning OpenMP threads must not land on this one
                program.execute(dict(feed))
                start = clock()
                program.execute(dict(feed))
                times[key].append(clock() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    # the mixed engine carries the per-layer timings' verdict, so the all-native one, which overrides it, must run
    # the margin under it too: at the margin's width the two often trade places from run to run (ResNet-50 b1 in
    # bf16 kept its two 7x7 Winograd layers, 0.53 ms each against oneDNN's 0.43, in one build of four)
    best = MIXED if MIXED in programs else NATIVE
    if best == MIXED and median[NATIVE] <= (1 - ENGINE_MARGIN) * median[MIXED]:
        best = NATIVE
    return best if median[best] <= (1 - ENGINE_MARGIN) * median[ONEDNN] else ONEDNN
