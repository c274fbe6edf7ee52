"""Lowering the optimized graph to a CUDA program: weights to the GPU in the engine's precision, then one
tuning run over random inputs in which every layer's candidates are timed on the real tensors that
reach it, and the fastest that agrees with the fp32 reference is kept (through the timing cache)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from ... import log
from ...errors import BuildError, PrecisionError, ResourceError
from ...ir import DType, Graph, Node, last_uses
from ...progress import Progress
from ..cpu.kernels import bind_kernel, wants_env
from ..tactics import Candidate, choose
from . import candidates as cands
from .program import CudaProgram, Step

# Input positions that kernels read on the host as shapes, axes or sizes (ONNX's shape-like inputs).
SHAPE_POSITIONS = {
    "Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Tile": {1},
    "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Resize": {1, 2, 3}, "Upsample": {1}, "Pad": {1, 2, 3}, "TopK": {1},
    "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1}, "ReduceL2": {1},
    "Split": {1}, "OneHot": {1}, "CumSum": {1}, "Trilu": {1},
}
MATRIX_LIKE = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "LSTM", "GRU", "RNN", "Attention"}
HOST_CONSTANT_ELEMENTS = 64  # integer constants up to this size are also kept on the host


def precision_plan(config: dict) -> tuple[list[str], str]:
    """(precisions matrix layers may use, the activation dtype between layers) for a build's flags."""
    best = bool(config.get("best"))
    allowed = ["fp32"]
    for name in ("tf32", "fp16", "bf16"):
        # --fp8 runs its matrix layers in fp8 and the rest in fp16 (fp8 tactics are offered beside these)
        if config.get(name) or best or (name == "fp16" and config.get("fp8")):
            allowed.append(name)
    if "fp16" in allowed:
        flow = "fp16"
    elif "bf16" in allowed:
        flow = "bf16"
    else:
        flow = "fp32"
    if flow != "fp32" and not best:
        allowed = [p for p in allowed if p != "fp32" and p != "tf32"] or allowed  # half asked: matrix work in half
    return allowed, flow


def check_precisions(config) -> None:
    """KILN-E301 when this GPU lacks a precision the build asks for, naming the compute capability needed."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    have = major + minor / 10
    name = torch.cuda.get_device_name()
    needs = {"fp16": 7.0, "tf32": 8.0, "bf16": 8.0, "fp8": 8.9}
    for precision, needed in needs.items():
        if getattr(config, precision, False) and have < needed:
            raise PrecisionError(f"--{precision} needs a GPU of compute capability {needed} or newer; {name} is {major}.{minor}",
                                 code="KILN-E301", hint=f"build without --{precision}, or on a newer GPU")


def parse_workspace(text: str | None) -> int | None:
    """trtexec's `--memPoolSize workspace:N` (N in MiB, or with a K/M/G suffix) to bytes."""
    from ...errors import BuildError

    if not text:
        return None
    limits = {}
    for item in text.split(","):
        pool, sep, size = item.strip().partition(":")
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            if not sep:
                raise ValueError
            multiplier = units.get(size[-1:].upper())
            limits[pool] = int(float(size[:-1] if multiplier else size) * (multiplier or 1 << 20))
        except ValueError:
            raise BuildError(f"--memPoolSize {item!r} is not of the form workspace:N", code="KILN-E203",
                             hint="write --memPoolSize workspace:1024 (MiB) or workspace:2G") from None
    unknown = set(limits) - {"workspace"}
    if unknown:
        raise BuildError(f"--memPoolSize knows only the workspace pool, not {', '.join(sorted(unknown))}", code="KILN-E203",
                         hint="write --memPoolSize workspace:N")
    return limits.get("workspace")


def _constants(graph: Graph, flow_dtype) -> tuple[dict, dict, dict]:
    """(weights on the GPU, float ones in the engine's precision; small integer ones also on the host; every weight
    on the GPU as the model stores it, for the candidates to cast, which the build drops after lowering). Each goes
    up once, as stored, and is rounded there, many times faster than rounding on the host."""
    import torch

    from ...tensors import numpy_to_device, numpy_to_torch

    device, host, stored = {}, {}, {}
    for name, array in graph.initializers.items():
        tensor = stored[name] = numpy_to_device(array, "cuda")
        if tensor.dtype == torch.float32 and flow_dtype != torch.float32:
            limit = torch.finfo(flow_dtype).max
            tensor = tensor.clamp(-limit, limit).to(flow_dtype)  # -3.4e38 masks stay the most negative half
        device[name] = tensor
        if not tensor.dtype.is_floating_point and tensor.numel() <= HOST_CONSTANT_ELEMENTS:
            host[name] = numpy_to_torch(array)
    return device, host, stored


def _example_feed(graph: Graph, profiles: list, flow_dtype) -> dict:
    """Fixed-seed random inputs at the shapes the engine is tuned for (a profile's opt shapes, else symbols as 1)."""
    import numpy as np
    import torch

    from ...engine.bindings import Binding
    from ...tools.inputs import random_feed

    bindings = [Binding.of(graph.value(v.name)) for v in graph.inputs]
    shapes = {}
    for profile in profiles or []:
        for name, entry in profile.items() if isinstance(profile, dict) else []:
            if isinstance(entry, dict) and "opt" in entry:
                shapes[name] = tuple(entry["opt"])
        break
    feed = random_feed(bindings, seed=0, shapes=shapes)
    rng = np.random.default_rng(0)
    for name, array in feed.items():
        if array.dtype.kind in "iu":  # 0 or 1: in range for every index table, and a valid attention mask
            feed[name] = rng.integers(0, 2, size=array.shape).astype(array.dtype)
    device_feed = {}
    for name, array in feed.items():
        tensor = torch.from_numpy(array).to("cuda")
        if tensor.dtype == torch.float32 and flow_dtype != torch.float32:
            tensor = tensor.to(flow_dtype)
        device_feed[name] = tensor
    return device_feed


def _attributes(node: Node) -> dict:
    """A node's attributes as a timing-cache key sees them: small arrays as lists, large ones as "<tensor>", no bodies."""
    import numpy as np

    return {k: (v.tolist() if isinstance(v, np.ndarray) and v.size <= 16 else "<tensor>" if isinstance(v, np.ndarray) else v)
            for k, v in node.attrs.items() if not hasattr(v, "nodes")}


def _signature(node: Node, args: list, allowed: list[str], flow: str) -> dict:
    return {"op": node.op_key, "attrs": _attributes(node), "allowed": allowed, "flow": flow,
            "inputs": [None if a is None else [list(a.shape), str(a.dtype), list(a.stride())] if hasattr(a, "stride") else repr(a)
                       for a in args]}


def _reference(kernel, args: list):
    """The step in fp32 on the GPU (tf32 off): what every candidate is checked against."""
    import torch

    upcast = [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a for a in args]
    with cands.fp32_reference():
        return kernel(*upcast)


def _dequantizing(kernel, scales: dict[int, float]):
    """A step's kernel, called with the inputs at these positions in int8 (each in its scale): those as float first."""
    def run(*args):
        return kernel(*(a.float() * scales[i] if i in scales else a for i, a in enumerate(args)))

    return run


def _in_flow(kernel, flow_dtype, node: Node):
    """A registry kernel in a half engine: a Cast to float32 casts to the engine's dtype instead, and
    float32 tensors meeting half ones are brought to half (the model's own fp32 islands, e.g. masks)."""
    import torch

    if flow_dtype == torch.float32:
        return kernel
    if node.op == "Cast" and node.domain == "" and int(node.attrs.get("to", 0)) == 1:
        return lambda x: x.to(flow_dtype)

    def run(*args, **context):
        if any(isinstance(a, torch.Tensor) and a.dtype == flow_dtype for a in args):
            args = [a.to(flow_dtype) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.is_cuda else a
                    for a in args]
        return kernel(*args, **context)

    return run


def _candidates(node: Node, graph: Graph, stored: dict, kernel, allowed: list[str], flow_dtype,
                pinned: frozenset = frozenset(), fp8: bool = False, out_scale: float | None = None,
                int8_input: bool = False, residual_scale: float | None = None) -> list[Candidate]:
    """stored: the weights on the GPU as the model stores them (fp32), which each candidate casts to its own
    precision; pinned: int8 layers --precisionConstraints obey keeps in int8; fp8: the build allows fp8 tactics;
    out_scale, int8_input, residual_scale: the int8 hand-off of an int8 convolution's output, input and residual
    (int8.handoff_scales); a max pool on the hand-off has its input and output in int8, both in out_scale."""
    import torch

    key = (node.domain, node.op)
    weight = stored.get(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    bias = stored.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    found: list[Candidate] = []
    if key == ("kiln", "Conv") and weight is not None and weight.dim() == 4 and (bias is not None or len(node.inputs) < 3 or not node.inputs[2]):
        found = cands.conv_candidates(node, weight, bias, allowed, flow_dtype)
    elif key == ("kiln", "Gemm") and weight is not None and weight.dim() == 2 and (bias is not None or len(node.inputs) < 3 or not node.inputs[2]):
        found = cands.gemm_candidates(node, weight, bias, allowed, flow_dtype)
        if fp8 and node.attrs.get("x_amax"):
            from .int8 import fp8_candidates

            found += fp8_candidates(node, weight, bias, float(node.attrs["x_amax"]), flow_dtype)
    elif key in (("kiln", "QGemm"), ("kiln", "QConv")) and weight is not None:
        from .int8 import int8_candidates

        q_bias = stored.get(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        shape = graph.value(node.outputs[0]).shape if node.outputs else None
        pixels = shape[0] * shape[2] * shape[3] if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape) \
            else None
        found = int8_candidates(node, weight, bias, q_bias, allowed, flow_dtype, node.name in pinned, fp8, out_scale,
                                int8_input, residual_scale, pixels)
    elif key == ("kiln", "Attention"):
        found = cands.attention_candidates(node, allowed, flow_dtype)
    elif key == ("", "LayerNormalization"):
        found = cands.layernorm_candidates(node, kernel, flow_dtype)
    elif key == ("", "MaxPool"):
        found = cands.maxpool_candidates(node, kernel, flow_dtype, out_scale if int8_input else None)
    elif key == ("", "Softmax"):
        found = cands.softmax_candidates(node, kernel, flow_dtype, graph.opsets.get("", graph.opset))
    elif key == ("kiln", "Elementwise"):
        found = cands.elementwise_candidates(node, kernel, flow_dtype)
    if node.domain == "kiln" or node.op in MATRIX_LIKE:
        # torch's own flags would let cuDNN use tf32 in an fp32 engine: pin this layer's math mode
        set_math = cands.math_mode("tf32" if "tf32" in allowed and flow_dtype == torch.float32 else "fp32")
        plain = kernel

        def kernel(*args):
            set_math()
            return plain(*args)

    reference = Candidate("torch", cands._precision_of(flow_dtype), kernel)
    if not found:
        return [reference]
    if key in cands.MATRIX_OPS and flow_dtype.is_floating_point:
        # The registry kernel stays a candidate in fp32 builds (it is cuDNN/cuBLAS without the extras)
        return found if flow_dtype != torch.float32 else [reference] + found
    return found


def fuse_add_layernorm(graph: Graph) -> tuple[list[Node], dict[str, str], set[str]]:
    """The node list with each residual sum that feeds only a LayerNormalization (last axis) moved into it, so
    that one Triton pass adds and normalizes: the LayerNorm node then takes (a, b, scale, bias). The sum is an
    Add, which goes, or the residual input of a kiln::Gemm without activation, which the Gemm then leaves out
    (its bias stays in the GEMM's epilogue). GPU-only, so it lives here and not in kiln/passes.
    Returns the nodes, {folded Add's name: LayerNorm's name}, and the LayerNorm nodes that now take a sum."""
    consumers = graph.consumers()
    producers = graph.producers()
    outputs = set(graph.output_names())
    folded: dict[str, str] = {}
    replaced: dict[str, Node] = {}
    for node in graph.nodes:
        if node.domain != "" or node.op != "LayerNormalization" or int(node.attrs.get("axis", -1)) != -1:
            continue
        if len([o for o in node.outputs if o]) != 1 or not node.inputs[0]:
            continue
        source = producers.get(node.inputs[0])
        if source is None or source.outputs[0] in outputs or len(consumers.get(source.outputs[0], [])) != 1:
            continue
        if source.domain == "" and source.op == "Add" and not any(n in graph.initializers for n in source.inputs):
            folded[source.name] = node.name
            summands = tuple(source.inputs)
        elif source.op_key == "kiln::Gemm" and len(source.inputs) > 3 and source.inputs[3] \
                and not source.attrs.get("activation"):
            replaced[source.name] = source.replace(inputs=tuple(source.inputs[:3]))
            summands = (source.outputs[0], source.inputs[3])
        else:
            continue
        replaced[node.name] = node.replace(inputs=(*summands, *node.inputs[1:]))
    nodes = [replaced.get(n.name, n) for n in graph.nodes if n.name not in folded]
    fused_norms = {n.name for n in graph.nodes if n.op == "LayerNormalization" and n.name in replaced}
    return nodes, folded, fused_norms


def lower(plan) -> CudaProgram:
    """The CUDA program for `plan`. Each layer's tactic is chosen on the tensor that reaches it, so a greedy
    choice can switch between NCHW and channels-last convolutions, paying a layout copy at every switch, and an
    int8 layer that hands its output on in int8 commits its readers to int8 tactics. Where either happens, the
    engine is also lowered without it (every convolution channels-last; no int8 hand-off), the whole engines
    are timed, and the fastest is kept (the choice for the chain, not the layer). The timing cache keeps that
    choice too, so a second build lowers only the engine it keeps."""
    tuned = (plan.build_info or {}).get("cuda_tactics")
    if tuned:  # a reloaded engine: the tactics its build chose
        tuning = plan.build_info.get("cuda_tuning", {})
        return _lower(plan, conv_layout=tuning.get("conv_layout"), int8_handoff=bool(tuning.get("int8_handoff")),
                      slow_int8=frozenset(tuning.get("int8_slow_layers", ())))
    cache = _timing_cache(plan)
    whole_engine = {"op": "whole-engine variant", "model": _model_signature(plan)}
    remembered = cache.get(whole_engine)
    if remembered is not None and _variant(remembered.get("chosen")) is not None:
        program = _lower(plan, cache=cache, slow_int8=frozenset(remembered.get("int8_slow_layers", ())),
                         **_variant(remembered["chosen"]))
        program.tuning["whole_engine_ms"] = remembered.get("times", {})
    else:
        chosen, program = PER_LAYER, _lower(plan, cache=cache)
        times: dict[str, float] = {}
        choices = {PER_LAYER: _layer_choices(program)}
        slow = _slow_int8_layers(program, plan.graph) if _int8_handoffs(plan.graph) else frozenset()
        rivals = [CHANNELS_LAST] if _mixes_conv_layouts(program) else []
        rivals += [HANDOFF] if _int8_handoffs(plan.graph, slow) else []
        for rival in rivals:
            name = rival if chosen == PER_LAYER else f"{chosen} + {rival}"
            try:
                other = _lower(plan, cache=cache, slow_int8=slow, **_variant(name))
            except (ResourceError, BuildError) as error:  # no room beside the first, or a layer without a tactic
                log.info("whole-engine variant %r not kept: %s", name, str(error).splitlines()[0])
                continue
            choices[name] = _layer_choices(other)
            chosen, program, pair = _faster({chosen: program, name: other}, plan)
            times.update(pair)
        program.tuning["whole_engine_ms"] = times
        if len(choices) > 1:  # what each variant ran, layer by layer: why one lost is then readable in the engine
            program.tuning["variant_layers"] = choices
        cache.put(whole_engine, times, chosen, int8_slow_layers=sorted(slow))
    cache.save()
    program.tuning.update(cache_hits=cache.hits, cache_misses=cache.misses)
    plan.build_info["cuda_tuning"] = program.tuning
    plan.build_info["cuda_tactics"] = {step.name: f"{program.layer_info[step.name]['tactic']}/{program.layer_info[step.name]['precision']}"
                                       for step in program.steps}
    return program


# The whole-engine variants lower() times, and what each changes in _lower; a variant's name joins its parts with " + ".
PER_LAYER, CHANNELS_LAST, HANDOFF = "per-layer choice", "all channels-last", "int8 hand-off"
WHOLE_ENGINE_VARIANTS = {PER_LAYER: {}, CHANNELS_LAST: {"conv_layout": "nhwc"}, HANDOFF: {"int8_handoff": True}}


def _layer_choices(program: CudaProgram) -> dict[str, list]:
    """Each layer's [tactic/precision, its timed ms or None where it was not timed]."""
    choices = {}
    for name, info in program.layer_info.items():
        key = f"{info['tactic']}/{info['precision']}"
        choices[name] = [key, (info.get("times_ms") or {}).get(key)]
    return choices


def _variant(name) -> dict | None:
    """_lower's keyword arguments for a whole-engine variant's name; None for a name it does not know."""
    if not isinstance(name, str):
        return None
    parts = name.split(" + ")
    if any(part not in WHOLE_ENGINE_VARIANTS for part in parts):
        return None
    return {key: value for part in parts for key, value in WHOLE_ENGINE_VARIANTS[part].items()}


def _timing_cache(plan):
    from ..timing_cache import TimingCache

    path = ((plan.config or {}).get("extra", {}) or {}).get("timing_cache_file")
    return TimingCache(path or None)


def _model_signature(plan) -> str:
    """What the whole-engine timing depends on beyond the timing cache's environment: every layer's operator,
    attributes and value shapes, and the build's precision flags and profiles (not the weights' values)."""
    import hashlib
    import json

    graph = plan.graph
    layers = []
    for node in graph.nodes:
        shapes = [[str(graph.value(n).shape), str(graph.value(n).dtype)] if n and n in graph.values else None
                  for n in (*node.inputs, *node.outputs)]
        layers.append([node.op_key, _attributes(node), shapes])
    config = {k: v for k, v in (plan.config or {}).items() if k != "extra"}
    text = json.dumps({"layers": layers, "config": config, "profiles": plan.profiles}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _mixes_conv_layouts(program: CudaProgram) -> bool:
    layouts = {("nchw" if "nchw" in info["tactic"] else "nhwc") for info in program.layer_info.values()
               if "nchw" in info["tactic"] or "nhwc" in info["tactic"]}
    return len(layouts) > 1


def _int8_handoffs(graph: Graph, slow: frozenset[str] = frozenset()) -> dict[str, float]:
    """The tensors an int8 hand-off would carry in int8, and their scales (none without triton or int8 convs);
    `slow`: convolutions kept off it (int8.slow_int8_layers)."""
    if not any(node.op_key == "kiln::QConv" for node in graph.nodes) or not cands.triton_available():
        return {}
    from .int8 import handoff_scales

    return handoff_scales(graph.nodes, set(graph.output_names()), slow)


def _slow_int8_layers(program: CudaProgram, graph: Graph) -> frozenset[str]:
    """The convolutions the int8 hand-off leaves out, judged on a lowering without it (int8.slow_int8_layers)."""
    from .int8 import slow_int8_layers, triton_conv_applies

    convs = {node.name for node in graph.nodes if triton_conv_applies(node)}
    slow = slow_int8_layers({name: info for name, info in program.layer_info.items() if name in convs}, graph.nodes,
                            set(graph.output_names()))
    if slow:
        log.verbose("int8 hand-off leaves out %d layer(s) whose Triton int8 kernels are slower than their other "
                    "tactics: %s", len(slow), ", ".join(sorted(slow)[:5]) + (" ..." if len(slow) > 5 else ""))
    return slow


def _faster(programs: dict[str, CudaProgram], plan) -> tuple[str, CudaProgram, dict[str, float]]:
    """Of programs for the same plan (by variant name), the one whose whole run (as the runtime runs it) is
    fastest: (its name, it, every time in ms). The others' captured graphs are freed."""
    import torch

    from ..tactics import median_ms

    first = next(iter(programs.values()))
    feed = _example_feed(plan.graph, plan.profiles, cands.torch_dtype(first.tuning["flow"]))
    times = {}
    with torch.inference_mode():
        for name, program in programs.items():
            times[name] = round(median_ms(lambda program=program: program.execute(feed), [], warmup=3, repeat=20), 4)
    chosen = min(times, key=times.get)
    for name, program in programs.items():
        if name != chosen:
            program.graphs.clear()
    log.verbose("whole-engine variants: %s", ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))
    return chosen, programs[chosen], times


def _compile_ahead(candidates: list[Candidate], args: list, pool) -> None:
    """Compile a layer's Triton int8 kernels at once, one per thread of `pool`, before they are timed one by one:
    Triton's compiler releases the GIL (two compiles in two threads took 1.33 s against 3.04 s in sequence here),
    so a host with many cores compiles a layer's dozen configurations in about the time of one. A failure here
    only leaves that kernel to compile when it is first timed."""
    ahead = [candidate for candidate in candidates if candidate.compile_ahead]
    if len(ahead) < 2:
        return
    try:
        import triton

        from .int8_kernels import compiling_only

        with triton.AsyncCompileMode(pool, ignore_errors=True), compiling_only():
            for candidate in ahead:
                candidate.run(*args)
    except Exception as error:  # noqa: BLE001 (compiling ahead only saves time)
        log.verbose("compiling ahead: %s: %s", type(error).__name__, str(error).splitlines()[0] if str(error) else "")


def _lower(plan, conv_layout: str | None = None, cache=None, int8_handoff: bool = False,
           slow_int8: frozenset[str] = frozenset()) -> CudaProgram:
    """One lowering; with conv_layout="nhwc", convolutions are offered only their channels-last tactics;
    int8_handoff: int8 convolutions whose output only int8 convolutions read hand it on in int8
    (int8.handoff_scales), except what slow_int8's layers make or read. cache: the build's timing cache (a
    reload runs its recorded tactics and needs none)."""
    import torch

    graph: Graph = plan.graph
    config = plan.config or {}
    allowed, flow = precision_plan(config)
    flow_dtype = cands.torch_dtype(flow)
    extra = config.get("extra", {}) or {}
    use_cuda_graph = extra.get("use_cuda_graph")
    static = all(isinstance(d, int) for v in graph.inputs for d in (graph.value(v.name).shape or (None,)))
    if use_cuda_graph is None:
        use_cuda_graph = static
    workspace_limit = parse_workspace(extra.get("mem_pool_size"))
    if cache is None:
        from ..timing_cache import TimingCache

        cache = TimingCache(None, env={})
    torch.backends.cudnn.benchmark = True  # cuDNN times its own algorithms per shape: part of each conv tactic

    started = time.perf_counter()
    try:
        constants, host_constants, stored = _constants(graph, flow_dtype)
        feed = _example_feed(graph, plan.profiles, flow_dtype)
    except torch.cuda.OutOfMemoryError as error:
        raise ResourceError(f"the engine's weights do not fit on {torch.cuda.get_device_name()}: {str(error).splitlines()[0]}",
                            code="KILN-E601", hint="use a GPU with more memory, or a lower precision (--fp16)") from None
    tuned = (plan.build_info or {}).get("cuda_tactics")
    quantized = ((plan.build_info or {}).get("quantization") or {}).get("layers", {})
    pinned = frozenset(name for name, entry in quantized.items()
                       if entry.get("why") == "asked" and config.get("precision_constraints") == "obey")
    steps: list[Step] = []
    layer_info: dict = {}
    env = dict(constants)
    env.update(feed)
    nodes, folded, fused_norms = fuse_add_layernorm(graph)
    last_use = last_uses(nodes)
    outputs = set(graph.output_names())
    handoffs = _int8_handoffs(graph, slow_int8) if int8_handoff else {}
    with torch.inference_mode(), Progress("kiln tactics", total=len(nodes)) as bar, \
            ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as compilers:
        for index, node in enumerate(nodes):
            opset = graph.opsets.get(node.domain, graph.opset)
            kernel = _in_flow(bind_kernel(node, opset), flow_dtype, node)
            needs_env = wants_env(node, opset)
            positions = frozenset(SHAPE_POSITIONS.get(node.op, ()) if node.domain == "" else ())
            runtime = [env.get(name) for name in node.inputs if name and name not in constants]
            on_host = runtime and all(not (isinstance(a, torch.Tensor) and a.is_cuda) for a in runtime)
            step_host = {name: host_constants[name] for i, name in enumerate(node.inputs)
                         if name in host_constants and (on_host or i in positions)}
            args = [None if not name else step_host.get(name, env[name]) for name in node.inputs]
            from .program import _same_device

            args = _same_device(args, positions)
            # the int8 hand-off: which of this layer's inputs arrive in int8 (their producers' scale), and its output's
            handed = {position: handoffs[node.inputs[position]] for position in (0, 4)
                      if len(args) > position and node.inputs[position] in handoffs
                      and isinstance(args[position], torch.Tensor) and args[position].dtype == torch.int8}
            int8_input, residual_scale = 0 in handed, handed.get(4)
            out_scale = handoffs.get(node.outputs[0]) if node.outputs else None
            if node.name in fused_norms:
                options = cands.add_layernorm_candidates(node, kernel, flow_dtype)
                plain_kernel = bind_kernel(node, opset)
                reference_kernel = lambda a, b, *rest, k=plain_kernel: k(a + b, *rest)  # noqa: E731
            else:
                options = _candidates(node, graph, stored, kernel, allowed, flow_dtype, pinned, bool(config.get("fp8")),
                                      out_scale, int8_input, residual_scale)
                if conv_layout == "nhwc":
                    options = [c for c in options if "nchw" not in c.name] or options
                reference_kernel = bind_kernel(node, opset)
                if handed:  # the layer's reference reads those inputs in float, as their producers' scale gives them back
                    reference_kernel = _dequantizing(reference_kernel, handed)
            if tuned and node.name in tuned:  # a reloaded engine runs the tactics its build chose
                options = [c for c in options if c.key == tuned[node.name]] or options[:1]
            if len(options) > 1:
                signature = {**_signature(node, args, allowed, flow), "layout": conv_layout,
                             "timed": "in a CUDA graph" if use_cuda_graph else "eagerly"}
                if out_scale is not None:  # its output in int8: tactics of their own
                    signature["int8_out_scale"] = out_scale
                chosen, record = choose(options, args, lambda kernel=reference_kernel, inputs=args: _reference(kernel, inputs), signature, cache,
                                        workspace_limit, in_graph=use_cuda_graph,
                                        prepare=lambda found, inputs: _compile_ahead(found, inputs, compilers))
            else:
                chosen, record = options[0], {}
            try:
                result = chosen.run(*args, _env=env) if needs_env else chosen.run(*args)
            except torch.cuda.OutOfMemoryError as error:
                raise ResourceError(f"layer {node.name!r} ran out of GPU memory during the build: {str(error).splitlines()[0]}",
                                    code="KILN-E601", hint="build with a smaller batch (profile) or on a larger GPU") from None
            except Exception as error:  # noqa: BLE001 (on the hand-off: that variant is not kept; else a bug to report)
                if not (handed or out_scale is not None):
                    raise
                raise BuildError(f"layer {node.name!r} ({node.op_key}) cannot run on the int8 hand-off: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                                 code="KILN-E201", where=node.name, hint="the engine without the hand-off is kept") from None
            results = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
            release = tuple(n for n, last in last_use.items() if last == index and n not in outputs and n not in constants)
            for name in release:
                env.pop(name, None)
            if node.domain == "kiln" and node.op in ("QGemm", "QConv") and not tuned:
                from .int8 import explain

                explain(node, chosen, options, record)
            steps.append(Step(node.name, node.op_key, chosen.run, node.inputs, node.outputs, release, step_host, positions,
                              needs_env))
            info = {"tactic": chosen.name, "precision": chosen.precision}
            if handed:  # inputs their producers handed on in int8
                info["int8_inputs"] = [{0: "input", 4: "residual"}[position] for position in sorted(handed)]
            info.update(record)
            layer_info[node.name] = info
            bar.advance(node.name)
    del env, options, chosen, stored
    # What one run needs beyond the weights: a step-by-step run's peak (activations, cuBLAS/cuDNN workspace).
    program = CudaProgram(steps, constants, {}, {}, graph.output_names(), False)
    torch.cuda.synchronize()
    base_memory = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        program.run_steps({**constants, **feed})
    torch.cuda.synchronize()
    activation_bytes = max(0, torch.cuda.max_memory_allocated() - base_memory)
    if workspace_limit is not None and activation_bytes > workspace_limit:
        raise ResourceError(f"the engine needs {activation_bytes / 2**20:.1f} MiB of GPU memory for activations and "
                            f"workspace; --memPoolSize allows {workspace_limit / 2**20:.1f} MiB", code="KILN-E601",
                            hint=f"raise --memPoolSize to at least workspace:{activation_bytes // 2**20 + 1} or build a smaller batch")
    float_inputs = {v.name: flow_dtype for v in graph.inputs if graph.value(v.name).dtype is DType.float32}
    float_outputs = {v.name: torch.float32 for v in graph.outputs if graph.value(v.name).dtype is DType.float32}
    control = [step.name for step in steps if step.wants_env]
    if use_cuda_graph and control:
        # a body's trip count and branch are read on the host at every run: one graph cannot replay them
        log.info("CUDA graph capture is off: control-flow layer(s) %s decide on the host at run time",
                 ", ".join(control[:3]) + (" ..." if len(control) > 3 else ""))
        use_cuda_graph = False
    program = CudaProgram(steps, constants, float_inputs, float_outputs, graph.output_names(), use_cuda_graph)
    for add, norm in folded.items():
        layer_info[add] = {"tactic": f"fused into {norm}", "precision": layer_info[norm]["precision"]}
    program.layer_info = layer_info
    program.tuning = {"seconds": round(time.perf_counter() - started, 3), "cache_hits": cache.hits,
                      "cache_misses": cache.misses, "activation_bytes": activation_bytes, "flow": flow,
                      "allowed": allowed, "cuda_graph": use_cuda_graph, "conv_layout": conv_layout,
                      "int8_handoff": int8_handoff}
    if int8_handoff:
        program.tuning["int8_slow_layers"] = sorted(slow_int8)
    log.verbose("CUDA tactics for %d layers in %.2f s (timing cache: %d hits, %d misses)", len(steps),
                program.tuning["seconds"], cache.hits, cache.misses)
    return program
