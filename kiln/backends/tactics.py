"""Tactics: the candidate implementations of one step, and choosing among them by timing them on the
target GPU (CUDA events, warm-up, median of many runs), keeping the fastest whose result agrees with
the reference within its precision's tolerance. Choices go through the timing cache."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

# Relative error (||out - ref|| / ||ref||) a candidate may have against the fp32 reference step: fp32
# arithmetic lands far below 1e-4; tf32 near 3e-4; fp16 near 1e-3; bf16 between 1e-3 and 1e-2. An int8 tactic
# is held to the layer's own int8 arithmetic (kiln::QGemm's reference), so only its fp16 output and the odd
# input rounded the other way count; an fp8 product (3 mantissa bits per operand) lands near 3e-2 from fp32.
TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 2e-2, "bf16": 5e-2, "int8": 2e-2, "fp8": 1e-1}
WARMUP = 3
REPEAT = 15
# A candidate whose eager call takes less than this is timed again inside a CUDA graph of GRAPH_CALLS calls:
# its eager time is mostly the host's launch cost (Python, Triton's launcher), which a graph replay does not
# pay. Past it, launching is a few percent of the call and the eager time stands.
HOST_BOUND_MS = 0.5
GRAPH_CALLS = 8


@dataclass
class Candidate:
    name: str  # what `kiln inspect` shows: "cudnn-nhwc", "cublaslt-epilogue", "triton-b1024-w4", "torch"
    precision: str  # the precision it computes in: fp32, tf32, fp16, bf16
    run: Callable
    workspace_bytes: int = 0  # scratch it allocates beyond its output (measured while timing)
    # The fp32 computation this candidate is checked against, when it is not the step's own: an fp16 fallback
    # of an int8 layer skips the int8 rounding of its input, an fp8 product replaces a float one.
    reference: Callable | None = None
    compile_ahead: bool = False  # a Triton kernel that int8_kernels.compiling_only() compiles without launching

    @property
    def key(self) -> str:
        """Unique among one step's candidates: the same kernel may be offered in several precisions."""
        return f"{self.name}/{self.precision}"


def median_ms(run: Callable, args: list, warmup: int = WARMUP, repeat: int = REPEAT) -> float:
    """Median time of `run(*args)` in milliseconds, timed with CUDA events after `warmup` calls."""
    import torch

    for _ in range(warmup):
        run(*args)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for start, end in zip(starts, ends):
        start.record()
        run(*args)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_ms(run: Callable, args: list, repeat: int = REPEAT) -> float | None:
    """Median GPU time of one `run(*args)` in milliseconds, replayed in a CUDA graph of GRAPH_CALLS calls, as a
    graph-replayed engine runs it: each timed replay is queued behind the one before, so no host time lands
    between its events. None where the calls cannot be captured (a host sync, a host read); call `run` eagerly
    first, so that lazy set-up (cuDNN's algorithm search, Triton's compile) stays out of the capture."""
    import torch

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                run(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 (not capturable: the eager time stands, as the engine would then run eagerly)
        torch.cuda.synchronize()
        return None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    graph.replay()
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / GRAPH_CALLS


def relative_error(output, reference) -> float:
    """||out - ref|| / ||ref|| over every output tensor, in float64; inf for NaN or a shape mismatch."""
    import torch

    outs = output if isinstance(output, (tuple, list)) else (output,)
    refs = reference if isinstance(reference, (tuple, list)) else (reference,)
    worst = 0.0
    for out, ref in zip(outs, refs):
        if not isinstance(ref, torch.Tensor) or not ref.dtype.is_floating_point:
            if isinstance(ref, torch.Tensor) and not torch.equal(out.to(ref.device), ref):
                return float("inf")
            continue
        if tuple(out.shape) != tuple(ref.shape):
            return float("inf")
        difference = (out.double() - ref.double()).norm().item()
        scale = ref.double().norm().item()
        error = difference / scale if scale > 0 else difference
        if math.isnan(error):
            return float("inf")
        worst = max(worst, error)
    return worst


def choose(candidates: list[Candidate], args: list, reference: Callable, signature: dict[str, Any], cache,
           workspace_limit: int | None = None, in_graph: bool = False,
           prepare: Callable | None = None) -> tuple[Candidate, dict[str, Any]]:
    """The fastest candidate that agrees with `reference()` (the step's fp32 output on `args`). in_graph: the
    engine replays a CUDA graph, so a host-bound candidate is timed in one too (graph_ms). prepare(candidates,
    args), when given, runs on a timing-cache miss before any candidate does (to compile their kernels at once).

    Returns the chosen candidate and a record for plan.layers: every candidate's time or why it was
    rejected. A cached choice is taken without timing when that candidate is still offered."""
    by_name = {c.key: c for c in candidates}
    if len(candidates) == 1:
        return candidates[0], {}
    cached = cache.get(signature) if cache is not None else None
    if cached is not None and cached.get("chosen") in by_name:
        return by_name[cached["chosen"]], {"times_ms": cached.get("times", {}), "cached": True}
    import torch

    if prepare is not None:
        prepare(candidates, args)
    references = {None: reference()}
    times: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for candidate in candidates:
        try:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            output = candidate.run(*args)
            torch.cuda.synchronize()
            candidate.workspace_bytes = max(0, torch.cuda.max_memory_allocated() - before - _bytes(output))
        except Exception as error:  # noqa: BLE001 (a tactic that cannot run this step is simply not chosen)
            rejected[candidate.key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            continue
        if candidate.reference not in references:
            references[candidate.reference] = candidate.reference(*args)
        error = relative_error(output, references[candidate.reference])
        if error > TOLERANCE[candidate.precision]:
            rejected[candidate.key] = f"error {error:.2e} above {TOLERANCE[candidate.precision]:.0e}"
            continue
        if workspace_limit is not None and candidate.workspace_bytes > workspace_limit:
            rejected[candidate.key] = f"needs {candidate.workspace_bytes} bytes of workspace, limit {workspace_limit}"
            continue
        del output
        elapsed = median_ms(candidate.run, args)
        replayed = graph_ms(candidate.run, args) if in_graph and elapsed < HOST_BOUND_MS else None
        if replayed is not None:
            elapsed = replayed
        times[candidate.key] = round(elapsed, 5)
    if not times:  # where the step's own kernel is a candidate it always runs; an int8 hand-off layer has none
        from ..errors import BuildError

        raise BuildError(f"no tactic of this {signature.get('op')} layer ran or agreed with its reference",
                         code="KILN-E201", where="; ".join(f"{key}: {why}" for key, why in rejected.items())[:600],
                         hint="report this with the model: each tactic's reason for rejection is listed above")
    chosen = min(times, key=times.get)
    if cache is not None:
        cache.put(signature, times, chosen)
    record: dict[str, Any] = {"times_ms": times}
    if rejected:
        record["rejected"] = rejected
    return by_name[chosen], record


def _bytes(output) -> int:
    outs = output if isinstance(output, (tuple, list)) else (output,)
    return sum(o.numel() * o.element_size() for o in outs if hasattr(o, "element_size"))
