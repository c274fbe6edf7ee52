"""Building an engine: parse, optimize, choose precisions and tactics, and lower to a plan."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import log
from .errors import BuildError, PrecisionError
from .progress import Progress

DEVICES = ("cpu", "cuda")


@dataclass
class BuilderConfig:
    """How to build: target device and precisions (trtexec's flags by the same names)."""

    device: str = "cpu"
    fp16: bool = False
    bf16: bool = False
    tf32: bool = False
    int8: bool = False
    fp8: bool = False
    best: bool = False
    optimize: bool = True  # run the optimization passes beyond folding and dead-code removal
    profiles: list = field(default_factory=list)  # kiln.Profile or {input: (min, opt, max)}; see add_profile
    use_model_shapes: bool = False  # dynamic inputs without a profile take the sizes the model declares
    unbounded_shapes: bool = False  # dynamic inputs without a profile take any size (one-off tool builds, onnx backend)
    # int8 (kiln/quant): calibration data is a directory of .npz/.npy feeds or any iterable of feed dicts
    calib: Any = None
    calib_cache: str | None = None  # thresholds written here, and read instead of calibrating when it exists
    calibrator: str = "entropy"  # entropy, percentile (99.99), mse, minmax
    calib_batches: int | None = None  # use at most this many calibration feeds
    layer_precisions: dict[str, str] = field(default_factory=dict)  # layer name or pattern -> "int8" / "fp32"
    precision_constraints: str = "none"  # none: int8 where faster; prefer / obey: as layer_precisions say
    validation: Any = None  # feeds for the coverage check and the accuracy budget
    accuracy_budget: float | None = None  # most error allowed against fp32, in accuracy_metric's unit
    accuracy_metric: str = "top1"  # top1 (points of top-1 disagreement) or relerr (relative L2 error)
    extra: dict[str, Any] = field(default_factory=dict)  # options later features read (calibration, timing cache)

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise BuildError(f"unknown device {self.device!r}", code="KILN-E203", hint=f"choose one of: {', '.join(DEVICES)}")
        if self.device == "cpu":
            cpu_only = {"fp16": self.fp16, "tf32": self.tf32, "fp8": self.fp8}
            asked = [name for name, on in cpu_only.items() if on]
            if asked:
                raise PrecisionError(f"{', '.join(asked)} is a GPU precision; kiln's CPU engines run fp32, bf16 and int8",
                                     code="KILN-E301", hint="build with --device cuda for it, or use --bf16 on a CPU with AVX512-BF16/AMX")
            if self.bf16:
                from .backends.cpu.fast import check_bf16

                check_bf16()
        if self.device == "cuda":
            from .engine.target import cuda_available

            if not cuda_available():
                raise BuildError("--device cuda was asked for, but no CUDA GPU is visible to torch", code="KILN-E203",
                                 hint="build on a machine with an NVIDIA GPU, or build for the CPU (the default)")
            from .backends.cuda.lowering import check_precisions, parse_workspace

            check_precisions(self)
            parse_workspace(self.extra.get("mem_pool_size"))

        if self.int8 or self.fp8 or self.layer_precisions or self.accuracy_budget is not None:
            from .quant.config import check_config

            check_config(self)

    def add_profile(self, profile=None):
        """Add an optimization profile and return it: a kiln.Profile, {input: (min, opt, max)}, or nothing for an
        empty Profile to fill with `set_shape(name, min, opt, max)`. Several profiles make an engine that runs each
        shape with the first profile that allows it."""
        from .engine.profiles import Profile, as_profile

        profile = Profile() if profile is None else as_profile(profile)
        self.profiles.append(profile)
        return profile

    def precisions(self) -> list[str]:
        chosen = ["fp32"]
        for name in ("tf32", "fp16", "bf16", "int8", "fp8"):
            if getattr(self, name):
                chosen.append(name)
        return chosen


def build_info(device: str) -> dict[str, Any]:
    import onnx
    import torch

    from . import __version__

    return {"kiln": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
            "host": platform.node(), "device": device, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def build(model, config: BuilderConfig | None = None, **options):
    """Build an Engine from an ONNX path or ModelProto (or a torch module, see kiln.frontend.torch)."""
    from .engine.plan import Plan
    from .engine.profiles import resolve_profiles
    from .engine.runtime import Engine
    from .frontend import parse_with_profiles
    from .frontend.onnx_file import release_file_bytes
    from .passes.context import PassContext
    from .passes.pipeline import optimize
    from .plugins import plugins_used

    config = BuilderConfig() if config is None else config
    if not isinstance(config, BuilderConfig):
        raise BuildError(f"kiln.build takes a kiln.BuilderConfig as its config, got {type(config).__name__}",
                         code="KILN-E203", hint="write kiln.build(model, kiln.BuilderConfig(fp16=True, ...)); "
                                                "BuilderConfig's fields are its options")
    config.validate()
    started = time.perf_counter()
    with Progress("kiln build", total=3) as bar:
        graph, declared = parse_with_profiles(model, config, **options)  # declared: a torch module's Dim ranges
        profiles = resolve_profiles([graph.value(v.name) for v in graph.inputs], config.profiles or declared,
                                    config.use_model_shapes, config.unbounded_shapes)
        bar.advance("parsed")
        stages = {"parse": round(time.perf_counter() - started, 3)}
        ctx = PassContext(config=config, validate=os.environ.get("KILN_VALIDATE") == "1")
        optimize(graph, ctx, config=config)
        release_file_bytes(graph.initializers)
        bar.advance("optimized")
        stages["optimize"] = round(time.perf_counter() - started - sum(stages.values()), 3)
        plan = Plan(graph=graph, target=_target(config), build_info=build_info(config.device),
                    config=_config_record(config), plugins=plugins_used(graph), profiles=[p.to_data() for p in profiles])
        plan.layers = {node.name: {"op": node.op_key, "precision": "fp32", "tactic": "torch", "origin": list(node.origin)}
                       for node in graph.nodes}
        plan.build_info["counters"] = dict(ctx.counters)
        if "quantization" in config.extra:  # what the int8 pass chose and measured (kiln/quant/lower.py)
            plan.build_info["quantization"] = config.extra.pop("quantization")
        if config.device == "cpu":  # planned before lowering: the CPU program sizes malloc's kept memory by it
            from .engine.memory import plan_memory
            from .engine.profiles import largest_sizes

            plan.memory = plan_memory(graph, largest_sizes([graph.value(v.name) for v in graph.inputs], profiles))
        engine = Engine(plan)
        engine.program  # lower now, so a build that cannot run fails here and not at the first run  # noqa: B018
        for name, info in getattr(engine.program, "layer_info", {}).items():
            plan.layers.setdefault(name, {}).update(info)
        bar.advance("lowered")
    plan.build_info["build_seconds"] = round(time.perf_counter() - started, 3)
    stages["lower"] = round(plan.build_info["build_seconds"] - sum(stages.values()), 3)
    plan.build_info["stage_seconds"] = stages  # where a build's time went: parse, optimize, lower (tactics, packing)
    if log.is_verbose():
        _log_steps(plan, stages["lower"])
    log.verbose("built %s engine with %d layers in %.2f s", config.device, len(graph.nodes), plan.build_info["build_seconds"])
    return engine


def _log_steps(plan, seconds: float) -> None:
    """--verbose: what lowering chose, one line per step (precision, tactic, shapes, the model nodes it runs), then
    a count of steps per tactic."""
    from collections import Counter

    graph = plan.graph
    log.verbose("lowered to %d steps for %s in %.2f s", len(graph.nodes), plan.target.get("device", "?"), seconds)

    def shapes(names) -> str:
        return ", ".join(graph.value(n).describe().partition(": ")[2] for n in names
                         if n and n not in graph.initializers) or "-"

    tactics = Counter()
    for index, node in enumerate(graph.nodes):
        layer = plan.layers.get(node.name, {})
        tactics[layer.get("tactic", "?")] += 1
        origin = ", ".join(node.origin[:3]) + (f" +{len(node.origin) - 3}" if len(node.origin) > 3 else "")
        log.verbose("step %3d %-32s %-22s %-5s %-16s %s -> %s  from %s", index, node.name, node.op_key,
                    layer.get("precision", "?"), layer.get("tactic", "?"), shapes(node.inputs), shapes(node.outputs),
                    origin or "-")
    log.verbose("steps per tactic: %s", ", ".join(f"{tactic} {count}" for tactic, count in tactics.most_common()))


def _target(config: BuilderConfig) -> dict[str, Any]:
    from .engine.target import cpu_target

    if config.device == "cpu":
        return cpu_target(["avx512_bf16"] if config.bf16 else [])
    import torch

    return {"device": "cuda", "name": torch.cuda.get_device_name(), "capability": "%d.%d" % torch.cuda.get_device_capability()}


def _config_record(config: BuilderConfig) -> dict[str, Any]:
    from dataclasses import replace

    # calibration/validation data given as Python iterables is not recorded (nor deep-copied) into the engine
    data = {k: os.fspath(v) if isinstance(v, (str, os.PathLike)) else None if v is None else "<python iterable>"
            for k, v in (("calib", config.calib), ("validation", config.validation))}
    record = asdict(replace(config, **data))
    record["extra"] = {k: v for k, v in config.extra.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return record
