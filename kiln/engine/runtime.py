"""Engine: a built plan that runs. `Engine.run(feed)` checks the feed against the bindings, runs the
backend program, and returns outputs of the kind it was given (numpy in, numpy out; torch in, torch out)."""
from __future__ import annotations

import os
from typing import Any

from ..errors import EngineFileError
from ..tensors import restore_carried, tensor_to_numpy
from . import fileformat
from .bindings import Binding, check_feed, check_profiles
from .plan import Plan
from .target import check_target


class Engine:
    def __init__(self, plan: Plan):
        self.plan = plan
        self._programs: dict[int, Any] = {}  # optimization profile -> its backend program
        self._profiles = None
        self.active_profile: int | None = None  # the optimization profile of the latest run, for the backend to read
        # Made once: a run's checks read them on every call (a GPU engine's latency at batch 1 is ~0.3 ms).
        self._inputs = tuple(Binding.of(plan.graph.value(v.name)) for v in plan.graph.inputs)
        self._outputs = tuple(Binding.of(plan.graph.value(v.name)) for v in plan.graph.outputs)
        self._output_dtypes = {b.name: b.dtype for b in self._outputs}
        self._passed: tuple | None = None  # the signature of the last feed of torch tensors check_feed passed

    # -- description ---------------------------------------------------------------------------
    @property
    def inputs(self) -> list[Binding]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[Binding]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        return self.plan.target["device"]

    def __repr__(self) -> str:
        ins = ", ".join(str(b) for b in self.inputs)
        outs = ", ".join(str(b) for b in self.outputs)
        return f"<kiln.Engine {self.device} ({ins}) -> ({outs}), {len(self.plan.graph.nodes)} layers>"

    # -- running -------------------------------------------------------------------------------
    @property
    def program(self):
        """The backend program of the latest run's optimization profile (the first before any run), lowered on first
        use (kernels bound, weights on the device)."""
        return self.program_for_profile(self.active_profile or 0)

    def program_for_profile(self, index: int):
        """The program tuned for profile `index`: on the CPU each profile's own (weights packed for its opt shapes,
        the other weights shared), on the GPU the one program that serves them all."""
        program = self._programs.get(index)
        if program is not None:
            return program
        from ..backends import TUNED_PER_PROFILE, lower

        own = index if self.device in TUNED_PER_PROFILE else 0
        if own not in self._programs:
            shares = self.program_for_profile(0) if own else None
            self._programs[own] = lower(self.plan, own, shares)
        self._programs[index] = self._programs[own]
        return self._programs[index]

    def select(self, tensors: dict, profile: int | None = None):
        """The program for a checked feed (input name -> torch tensor): the profile `profile`, or the first that fits
        its shapes (KILN-E406 where none does), becomes the active one. Tools that run the program themselves use it."""
        self.active_profile = check_profiles(tensors, self.profiles, profile)
        return self.program

    @property
    def profiles(self) -> list:
        """The optimization profiles the engine was built with (kiln.Profile), empty for a static engine."""
        if self._profiles is None:
            from .profiles import Profile

            self._profiles = [Profile.from_data(data) for data in self.plan.profiles]
        return self._profiles

    def create_execution_context(self, profile: int | None = None) -> "ExecutionContext":
        return ExecutionContext(self, profile)

    def run(self, feed: dict[str, Any], profile: int | None = None) -> dict[str, Any]:
        """Run on `feed`; with several optimization profiles, `profile` picks one (None: the first that fits)."""
        import torch

        tensors, uses_torch = self._checked(feed)
        program = self.select(tensors, profile)
        with torch.inference_mode():
            results = program.execute(tensors)
        dtypes = self._output_dtypes
        return {name: restore_carried(_deliver(value, uses_torch, name in self.plan.graph.initializers or name in tensors),
                                      dtypes.get(name))
                for name, value in results.items()}

    def _checked(self, feed) -> tuple[dict, bool]:
        """check_feed's result. A feed of torch tensors with the names, dtypes, shapes and devices of the last one
        that passed passes again without the walk (what the checks read is all in that signature)."""
        signature = _torch_signature(feed)
        if signature is not None and signature == self._passed:
            return dict(feed), True
        tensors, uses_torch = check_feed(feed, self._inputs)
        self._passed = signature
        return tensors, uses_torch

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        fileformat.save(self.plan, path)

    def serialize(self) -> bytes:
        return fileformat.serialize(self.plan)


class ExecutionContext:
    """Runs an engine with one chosen optimization profile, as TensorRT's execution context does (profile None:
    each run picks the first profile that fits its shapes)."""

    def __init__(self, engine: Engine, profile: int | None = None):
        self.engine = engine
        self.set_optimization_profile(profile)

    def set_optimization_profile(self, profile: int | None) -> None:
        from .profiles import choose_profile

        if profile is not None:
            choose_profile(self.engine.profiles, {}, profile)  # an index that does not exist fails here, not at run
        self.profile = profile

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        return self.engine.run(feed, profile=self.profile)


def _torch_signature(feed) -> tuple | None:
    """(name, dtype, shape, device) of each input of a dict of plain torch tensors; None for any other feed."""
    import torch

    if type(feed) is not dict:
        return None
    signature = []
    for name, value in feed.items():
        if type(value) is not torch.Tensor:
            return None
        signature.append((name, value.dtype, value.shape, value.device))
    return tuple(signature)


def _deliver(value, as_torch: bool, aliased: bool):
    """Hand an output to the caller: a fresh tensor or array it owns (a list for a sequence, None for an empty optional)."""
    if value is None:
        return None
    if isinstance(value, list):  # a sequence's tensors may be inputs or weights themselves: always copy
        return [_deliver(item, as_torch, True) for item in value]
    if aliased:
        value = value.copy() if hasattr(value, "copy") and not hasattr(value, "clone") else value.clone()  # strings: numpy
    if as_torch:
        return value
    return tensor_to_numpy(value)


def load(source: str | os.PathLike | bytes) -> Engine:
    """Load an engine file (or its bytes), checking it is whole, readable and built for this machine."""
    from ..plugins import check_plugins

    if isinstance(source, (bytes, bytearray)):
        blob, name = bytes(source), "engine"
    else:
        blob, name = fileformat.load_bytes(source), str(source)
    plan = fileformat.deserialize(blob, name)
    check_target(plan.target, name)
    check_plugins(plan.plugins, name)
    if not plan.graph.inputs and not plan.graph.outputs:
        raise EngineFileError(f"{name} holds no bindings", code="KILN-E503", hint="rebuild the engine")
    return Engine(plan)
