"""ai.onnx.preview.training: the optimizer update rules (Adagrad, Momentum, Adam), one step on each tensor given, and
Gradient, which differentiates the part of the graph that computes a value."""
from __future__ import annotations

import weakref

import torch

from ..errors import BuildError
from ..ir import Graph, Node
from .registry import register

_DOMAIN = "ai.onnx.preview.training"


def _groups(tensors, count):
    n = len(tensors) // count
    return [tensors[i * n:(i + 1) * n] for i in range(count)]


@register("Adagrad", since=1, domain=_DOMAIN)
def adagrad(rate, step, *tensors, decay_factor=0.0, epsilon=1e-6, norm_coefficient=0.0):
    r = rate / (1 + step * decay_factor)
    xs, gs, hs = _groups(tensors, 3)
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        g = norm_coefficient * x + g
        h = h + g * g
        new_x.append(x - r * g / (torch.sqrt(h) + epsilon))
        new_h.append(h)
    return tuple(new_x + new_h)


@register("Momentum", since=1, domain=_DOMAIN)
def momentum(rate, step, *tensors, alpha, beta, mode, norm_coefficient):
    xs, gs, vs = _groups(tensors, 3)
    scale = beta if int(step) > 0 else 1.0  # the first step takes the whole gradient
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        g = norm_coefficient * x + g
        v = alpha * v + scale * g
        new_x.append(x - rate * (g + alpha * v) if mode == "nesterov" else x - rate * v)
        new_v.append(v)
    return tuple(new_x + new_v)


@register("Adam", since=1, domain=_DOMAIN)
def adam(rate, step, *tensors, alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.0, norm_coefficient_post=0.0):
    xs, gs, vs, hs = _groups(tensors, 4)
    t = float(step)
    r = rate * (1 - beta ** t) ** 0.5 / (1 - alpha ** t) if t > 0 else rate  # bias correction
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs):
        g = norm_coefficient * x + g
        v = alpha * v + (1 - alpha) * g
        h = beta * h + (1 - beta) * g * g
        new_x.append((1 - norm_coefficient_post) * (x - r * v / (torch.sqrt(h) + epsilon)))
        new_v.append(v)
        new_h.append(h)
    return tuple(new_x + new_v + new_h)


# The element types torch autograd differentiates.
_DIFFERENTIABLE = frozenset({"float16", "bfloat16", "float32", "float64"})

# Ops whose float output does not depend on their float input's values: losing autograd's track through them is
# right (a zero gradient), not a kernel that leaves torch.
_VALUE_INDEPENDENT = frozenset({"EyeLike", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"})

# body -> {device: its program}; built outside inference mode, whose tensors autograd cannot save.
_GRADIENT_PROGRAMS: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def _check_gradient(node: Node, graph: Graph) -> str | None:
    xs, zs = list(node.attrs.get("xs") or []), list(node.attrs.get("zs") or [])
    if not isinstance(node.attrs.get("body"), Graph):
        return "Gradient has no body: the ONNX frontend extracts the subgraph from xs to y, which this node lacks"
    if len(node.inputs) != len(xs) + len(zs):
        return f"Gradient takes one input per name in xs and zs ({len(xs) + len(zs)}), the node has {len(node.inputs)}"
    for role, name in [("by", x) for x in xs] + [("of", node.attrs["y"])]:
        dtype = graph.value(name).dtype
        if dtype is not None and dtype.name not in _DIFFERENTIABLE:
            return (f"Gradient {role} {name!r}, which is {dtype.name}: torch autograd differentiates "
                    f"{', '.join(sorted(_DIFFERENTIABLE))} only")
    return None


def _gradient_types(inputs, attrs):
    return [(x.dtype, x.shape) for x in inputs[:len(attrs["xs"])]]


@register("Gradient", since=1, domain=_DOMAIN, dtypes=_DIFFERENTIABLE, check=_check_gradient, infer=_gradient_types)
def gradient(*inputs, xs, y, zs=None, body: Graph, _env):
    """dy/dx for each x in xs, with ones as y's gradient: the body (the graph's nodes from xs and zs to y, see
    kiln.frontend.onnx) runs with kiln's own kernels under torch autograd. The engine runs in inference mode, whose
    tensors autograd cannot record, so the body runs outside it on clones."""
    from .control import _device_of

    with torch.inference_mode(False), torch.enable_grad():
        sources = []
        for name, x in zip(xs, inputs):
            if not x.is_floating_point():
                raise BuildError(f"Gradient by {name!r}, which is {x.dtype}: torch autograd differentiates "
                                 f"floating-point tensors only", code="KILN-E101", where=name,
                                 hint="differentiate with respect to a float tensor (cast the integer one first)")
            sources.append(x.detach().clone().requires_grad_(True))
        constants = [None if z is None else _outside_inference(z).detach() for z in inputs[len(xs):]]
        programs = _GRADIENT_PROGRAMS.setdefault(body, {})
        device = _device_of(inputs)
        program = programs.get(device)
        if program is None:
            program = programs[device] = _differentiable_program(body, device)
        feed = dict(_env)
        feed.update(zip(body.input_names(), sources + constants))
        result = program.execute(feed)[body.output_names()[0]]
        if not result.requires_grad:  # no path from any x to y: y is constant in them
            return tuple(torch.zeros_like(x) for x in sources)
        try:
            grads = torch.autograd.grad(result, sources, grad_outputs=torch.ones_like(result), allow_unused=True)
        except RuntimeError as error:
            raise BuildError(f"Gradient of {y!r}: torch autograd cannot differentiate the kernels on its path "
                             f"({str(error).splitlines()[0]})", code="KILN-E101", where=y,
                             hint="one of kiln's kernels between xs and y is not differentiable by torch") from None
    return tuple(torch.zeros_like(x) if g is None else g.detach() for x, g in zip(sources, grads))


def _outside_inference(value):
    """A tensor autograd can record: inference-mode tensors (the engine's inputs, weights and values) are cloned."""
    if isinstance(value, list):
        return [_outside_inference(item) for item in value]
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _differentiable_program(body: Graph, device: str):
    from ..backends.cpu.kernels import bind_kernel
    from ..backends.cpu.program import CpuProgram

    def kernel_for(node: Node):
        return _differentiable(node, bind_kernel(node, body.opsets.get(node.domain, body.opset)))

    program = CpuProgram(body, kernel_for=kernel_for)
    if device != "cpu":
        program.constants = {name: tensor.to(device) for name, tensor in program.constants.items()}
    return program


def _tracked(value) -> bool:
    items = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(item, torch.Tensor) and item.requires_grad for item in items)


def _detached(value):
    if isinstance(value, list):
        return [_detached(item) for item in value]
    return value.detach() if isinstance(value, torch.Tensor) else value


def _differentiable(node: Node, kernel):
    """`kernel`, failing with a KilnError naming the node where it cannot carry autograd's track from its inputs to its
    outputs: it raises on tensors that require grad (numpy, in-place writes) or hands back float outputs without it."""
    def run(*args, **context):
        args = [_outside_inference(a) for a in args]
        if not _tracked(args):
            return kernel(*args, **context)
        try:
            result = kernel(*args, **context)
        except Exception as error:
            with torch.no_grad():  # failing without autograd too, it is the data's fault: a layer error as any other
                kernel(*[_detached(a) for a in args], **context)
            raise _not_differentiable(node, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        outputs = result if isinstance(result, tuple) else (result,)
        lost = [name for name, value in zip(node.outputs, outputs)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad]
        if lost and node.op not in _VALUE_INDEPENDENT:
            raise _not_differentiable(node, f"its output {lost[0]!r} does not carry the gradient")
        return result

    return run


def _not_differentiable(node: Node, why: str) -> BuildError:
    return BuildError(f"Gradient cannot differentiate through {node.describe()}: kiln's {node.op_key} kernel has no "
                      f"torch-differentiable path ({why})", code="KILN-E101", where=node.describe(),
                      hint="differentiate with respect to values computed after this node: a name in xs or zs ends "
                           "the path back from y")
