"""kiln's Triton kernel for kiln::Elementwise on the GPU: the whole op chain in one pass, reading x and
each extra operand once (broadcast through stride 0), computing in fp32 registers and writing the
result once, where torch's registry kernel makes one pass over memory per op.

The op list differs per node and Triton compiles real source, so each (ops, operands, rank, operand
count) gets its own kernel, generated as Python source and held in memory (registered with linecache,
which is where Triton's @jit reads a function's source; nothing is written to disk).
Imported only when a CUDA engine is lowered (it needs triton).
"""
from __future__ import annotations

import linecache

import triton
import triton.language as tl

# What each op does to the running value `v` (a binary op: to its left and right operands), in fp32. Division
# and square root are the correctly rounded forms, as torch's: Triton's default `/` is approximate, and a
# Floor or Ceil after it would turn a last-bit difference into a whole unit.
UNARY_CODE = {"Relu": "tl.maximum(v, 0.0)", "Sigmoid": "tl.sigmoid(v)", "Tanh": "_tanh(v)", "Erf": "tl.math.erf(v)",
              "Exp": "tl.exp(v)", "Log": "tl.log(v)", "Sqrt": "tl.sqrt_rn(v)", "Neg": "-v", "Abs": "tl.abs(v)",
              "Reciprocal": "tl.math.div_rn(1.0, v)", "Floor": "tl.floor(v)", "Ceil": "tl.ceil(v)"}
BINARY_CODE = {"Add": "{a} + {b}", "Sub": "{a} - {b}", "Mul": "{a} * {b}", "Div": "tl.math.div_rn({a}, {b})",
               "Pow": "_pow({a}, {b})"}

_KERNELS: dict[tuple, object] = {}


@triton.jit
def _tanh(x):
    # tanh through exp(-2|x|), which never overflows (libdevice's tanh has no Triton interpreter form)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _pow(x, y):
    # torch.pow on floats: |x|^y through exp2/log2, negative x only for integer y (sign by y's parity), 0^0 = 1
    magnitude = tl.exp2(y * tl.log2(tl.abs(x)))
    whole = y == tl.floor(y)
    odd = whole & (y - 2.0 * tl.floor(0.5 * y) == 1.0)
    signed = tl.where(odd, -magnitude, magnitude)
    result = tl.where(x < 0, tl.where(whole, signed, float("nan")), magnitude)
    return tl.where(y == 0, 1.0, result)


def supported(ops, operands) -> bool:
    """Whether every op of the chain has a Triton form here (the ones kiln::Elementwise allows)."""
    return all(op in UNARY_CODE if operand == 0 else op in BINARY_CODE for op, operand in zip(ops, operands)) \
        and len(ops) == len(operands)


def elementwise_chain(x, extra: list, ops, operands, block: int = 1024, warps: int = 4):
    """kiln::Elementwise(x, *extra) in one Triton pass: the output (broadcast of every input's shape,
    contiguous, x's dtype) from inputs of any strides. x and extra must share one float dtype."""
    import torch

    shape = torch.broadcast_shapes(x.shape, *(a.shape for a in extra))
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    sizes, strides = _coalesce(list(shape), [list(t.expand(shape).stride()) for t in (x, *extra)])
    kernel = _kernel(tuple(ops), tuple(operands), len(sizes), len(extra))
    grid = (triton.cdiv(out.numel(), block),)
    flat_strides = [s for each in strides for s in each]
    kernel[grid](out, x, *extra, out.numel(), *sizes, *flat_strides, BLOCK=block, num_warps=warps)
    return out


def _coalesce(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge neighbouring dims that every input walks as one (stride[i] == stride[i+1] * size[i+1]) and drop
    size-1 dims, so a contiguous or channel-broadcast input costs one or two index divisions, not one per dim."""
    keep = [i for i, size in enumerate(sizes) if size != 1]
    sizes, strides = [sizes[i] for i in keep], [[s[i] for i in keep] for s in strides]
    if not sizes:
        return [1], [[0] for _ in strides]
    merged_sizes, merged_strides = [sizes[0]], [[s[0]] for s in strides]
    for i in range(1, len(sizes)):
        if all(m[-1] == s[i] * sizes[i] for m, s in zip(merged_strides, strides)):
            merged_sizes[-1] *= sizes[i]
            for m, s in zip(merged_strides, strides):
                m[-1] = s[i]
        else:
            merged_sizes.append(sizes[i])
            for m, s in zip(merged_strides, strides):
                m.append(s[i])
    return merged_sizes, merged_strides


def _kernel(ops: tuple, operands: tuple, rank: int, count: int):
    """The compiled-on-first-launch kernel for one chain shape, generated once per process."""
    key = (ops, operands, rank, count)
    if key not in _KERNELS:
        name = f"_chain_{len(_KERNELS)}"
        source = kernel_source(name, ops, operands, rank, count)
        filename = f"<kiln elementwise chain {name} {'-'.join(ops)}>"
        # Triton reads the source back through inspect (linecache); mtime None keeps checkcache from dropping it
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        namespace = {"triton": triton, "tl": tl, "_tanh": _tanh, "_pow": _pow}
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (our own generated source)
        _KERNELS[key] = namespace[name]
    return _KERNELS[key]


def kernel_source(name: str, ops, operands, rank: int, count: int) -> str:
    """Triton source of one chain: flat output offsets split into `rank` indices, each input loaded
    through its own strides, then the ops in order on an fp32 value."""
    tensors = ["x"] + [f"a{i}" for i in range(1, count + 1)]
    sizes = [f"size{d}" for d in range(rank)]
    strides = [f"{t}_stride{d}" for t in tensors for d in range(rank)]
    pointers = ["out_ptr"] + [f"{t}_ptr" for t in tensors]
    parameters = ", ".join(pointers + ["total"] + sizes + strides + ["BLOCK: tl.constexpr"])
    lines = ["@triton.jit", f"def {name}({parameters}):",
             "    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
             "    inside = offsets < total",
             "    rest = offsets"]
    for d in reversed(range(1, rank)):
        lines += [f"    i{d} = rest % size{d}", f"    rest = rest // size{d}"]
    lines.append("    i0 = rest")  # offsets < total, so the outermost index needs no modulo
    for t in tensors:
        address = " + ".join(f"i{d} * {t}_stride{d}" for d in range(rank))
        lines.append(f"    {t} = tl.load({t}_ptr + {address}, mask=inside).to(tl.float32)")
    lines.append("    v = x")
    for op, operand in zip(ops, operands):
        if operand == 0:
            lines.append(f"    v = {UNARY_CODE[op]}")
        else:
            other = f"a{abs(operand)}"
            left, right = ("v", other) if operand > 0 else (other, "v")
            lines.append(f"    v = {BINARY_CODE[op].format(a=left, b=right)}")
    lines.append("    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=inside)")
    return "\n".join(lines) + "\n"
