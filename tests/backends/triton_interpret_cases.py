"""Cases for kiln's Triton flash attention and elementwise chain kernels, run on the CPU under Triton's
interpreter against float64 references (the registry kernels of kiln/ops/fused.py in float64).

Run as a script (`python triton_interpret_cases.py`), it sets TRITON_INTERPRET=1 before kiln's kernel
modules are imported (Triton reads it when a kernel is decorated), runs every case and prints
{case: relative error} as JSON. tests/backends/test_triton_interpret.py runs it in a subprocess so that
the interpreter never leaks into a pytest process that also runs the kernels on a GPU. Importing this
module (for the case tables) needs neither torch nor triton.
"""
import json
import os
import sys

# Attention: name -> (q shape without D, key length, D, value D, mask shape or None, dtype, (block_m, block_n)).
# Odd lengths leave partial query and key blocks; several key blocks exercise the online softmax.
ATTENTION = {
    "bhsd-d64-key-mask-fp32": ((2, 3, 37), 45, 64, 64, (2, 1, 1, 45), "float32", (16, 16)),
    "bhsd-d64-full-mask-fp32": ((2, 2, 33), 29, 64, 64, (2, 1, 33, 29), "float32", (32, 16)),
    "bhsd-d64-key-mask-fp16": ((2, 3, 37), 45, 64, 64, (2, 1, 1, 45), "float16", (16, 16)),
    "bhsd-d48-full-mask-fp16": ((1, 2, 20), 70, 48, 48, (1, 1, 20, 70), "float16", (16, 32)),
    "bhsd-d80-dv24-no-mask-fp32": ((1, 2, 19), 40, 80, 24, None, "float32", (16, 16)),
    "bhsd-d64-one-block-fp32": ((1, 2, 9), 7, 64, 64, (1, 1, 1, 7), "float32", (64, 64)),
    "bhs-3d-d64-no-mask-fp32": ((6, 33), 19, 64, 64, None, "float32", (16, 16)),
    "bhs-3d-d40-mask-fp16": ((4, 17), 23, 40, 40, (1, 17, 23), "float16", (16, 16)),
    "bhsd-d128-mask-fp32": ((1, 2, 24), 24, 128, 128, (1, 1, 24, 24), "float32", (16, 16)),
}
ATTENTION_TOLERANCE = {"float32": 1e-5, "float16": 3e-3}  # fp16: inputs and p rounded to fp16 (~5e-4 seen)

# Elementwise: name -> (x shape, extra inputs, ops, operands, dtype, x transposed?). An extra input is a shape
# (values drawn in [0.5, 1.5), so Pow's base, Log and Sqrt stay in their domains) or a number (a 0-d tensor
# holding it: integer exponents of negative bases). Operands: k > 0 is op(value, input k), -k is op(input k, value).
CHAINS = {
    "add-lastaxis-relu-pow-reversed":
        ((2, 3, 5, 7), [(7,), (2, 3, 5, 7)], ["Add", "Relu", "Pow"], [1, 0, -2], "float32", False),
    "mul-channel-tanh-sub-reversed-sigmoid":
        ((2, 3, 5, 7), [(3, 1, 1), (2, 3, 5, 7)], ["Mul", "Tanh", "Sub", "Sigmoid"], [1, 0, -2, 0], "float32", False),
    "small-x-broadcast-up-erf-exp-neg-abs":
        ((7,), [(2, 3, 5, 7)], ["Add", "Erf", "Exp", "Neg", "Abs"], [-1, 0, 0, 0, 0], "float32", False),
    "transposed-x-abs-pow-add-sqrt-reciprocal-log":
        ((2, 7, 5, 3), [(), ()], ["Abs", "Pow", "Add", "Sqrt", "Reciprocal", "Log"], [0, 1, 2, 0, 0, 0], "float32", True),
    "div-floor-abs-add-div-reversed-ceil":
        ((4, 6, 8), [(), (6, 1)], ["Div", "Floor", "Abs", "Add", "Div", "Ceil"], [1, 0, 0, 2, -2, 0], "float32", False),
    "negative-base-integer-pow":
        ((4, 9), [2.0, 3.0], ["Pow", "Sub", "Pow"], [1, -1, 2], "float32", False),
    "add-lastaxis-relu-pow-reversed-fp16":
        ((2, 3, 5, 7), [(7,), (2, 3, 5, 7)], ["Add", "Relu", "Pow"], [1, 0, -2], "float16", False),
    "mul-channel-tanh-sub-reversed-sigmoid-bf16":
        ((2, 3, 5, 7), [(3, 1, 1), (2, 3, 5, 7)], ["Mul", "Tanh", "Sub", "Sigmoid"], [1, 0, -2, 0], "bfloat16", False),
    "large-unary-tail":
        ((3, 1000), [(1000,)], ["Sub", "Exp", "Log", "Neg", "Sigmoid", "Sqrt"], [1, 0, 0, 0, 0, 0], "float32", False),
}
# fp32 against float64: exp/log/erf in fp32 (~1e-7 each); half: one rounding of the output (2^-11, 2^-8).
CHAIN_TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}

# kiln's own candidates, through the functions the CUDA lowering calls, on CPU tensors.
CANDIDATES = ("attention-candidates-fp32", "attention-candidates-fp16", "elementwise-candidates-fp32",
              "elementwise-candidates-mixed-dtypes")


def _interpret_numpy_scalars():
    """Triton 3.6's interpreter turns a loop bound into an int with int(1-element array), which numpy 2.4
    refuses (triton-lang/triton#9171): read the one element instead. Interpreter only; GPU runs compile."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _relative(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape or not actual.isfinite().all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm()).item()


def run_attention(name: str) -> float:
    import torch

    from kiln.backends.cuda.triton_attention import flash_attention, flash_supported
    from kiln.ops.fused import attention

    lead, k_len, d, dv, mask_shape, dtype, (block_m, block_n) = ATTENTION[name]
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(len(name))
    batch, q_len = lead[:-1], lead[-1]
    q = torch.randn(*batch, q_len, d, generator=generator).to(dtype)
    k = torch.randn(*batch, k_len, d, generator=generator).to(dtype)
    v = torch.randn(*batch, k_len, dv, generator=generator).to(dtype)
    mask = None
    if mask_shape is not None:
        mask = torch.randn(mask_shape, generator=generator)
        mask[..., -3:] = -10000.0  # padding keys, as a BERT mask has them
        if mask_shape[-2] > 1 and dtype == torch.float32:
            mask[..., 0, :] = torch.finfo(torch.float32).min  # a query row masked out entirely: its keys' plain mean
        mask = mask.to(dtype)
    assert flash_supported(q, k, v, mask), name
    scale = d ** -0.5
    out = flash_attention(q, k, v, mask, scale, dtype, block_m, block_n, 4, 2, "ieee")
    expected = attention(q.double(), k.double(), v.double(), None if mask is None else mask.double(), scale=scale)
    return _relative(out, expected)


def run_chain(name: str) -> float:
    import torch

    from kiln.backends.cuda.triton_elementwise import elementwise_chain
    from kiln.ops.fused import elementwise

    shape, extra_shapes, ops, operands, dtype, transposed = CHAINS[name]
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(len(name))
    x = torch.randn(shape, generator=generator).to(dtype)
    if transposed:
        x = x.transpose(1, 3)  # a strided view: the kernel walks its strides, no copy
    extra = [torch.tensor(s) if isinstance(s, float) else torch.rand(s, generator=generator) + 0.5 for s in extra_shapes]
    extra = [a.to(dtype) for a in extra]
    out = elementwise_chain(x, extra, ops, operands, 256, 4)
    expected = elementwise(x.double(), *[a.double() for a in extra], ops=ops, operands=operands)
    assert out.dtype == dtype, (out.dtype, dtype)
    return _relative(out, expected)


def run_candidates(name: str) -> dict[str, float]:
    """Every candidate of the step, by name, and its error against the float64 registry kernel."""
    import torch

    from kiln.backends.cuda import candidates as cands
    from kiln.ir import Node
    from kiln.ops.fused import attention, elementwise

    generator = torch.Generator().manual_seed(0)
    if name.startswith("attention"):
        precision = name.rsplit("-", 1)[1]
        flow = cands.torch_dtype(precision)
        node = Node("Attention", ("q", "k", "v", "m"), ("y",), {"scale": 0.125}, name="attention", domain="kiln")
        q, k, v = (torch.randn(2, 2, 21, 64, generator=generator).to(flow) for _ in range(3))
        mask = torch.randn(2, 1, 1, 21, generator=generator).to(flow)
        offered = cands.attention_candidates(node, [precision], flow)
        offered = [c for c in offered if c.name.startswith(("triton-flash", "sdpa-math"))]  # the others need CUDA
        expected = attention(q.double(), k.double(), v.double(), mask.double(), scale=0.125)
        return {c.name: _relative(c.run(q, k, v, mask), expected) for c in offered}
    ops, operands = ["Mul", "Add", "Sigmoid"], [1, -2, 0]
    node = Node("Elementwise", ("x", "s", "b"), ("y",), {"ops": ops, "operands": operands}, domain="kiln", name="chain")
    x = torch.randn(3, 4, 10, generator=generator)
    scale, bias = torch.randn(10, generator=generator), torch.randn(4, 1, generator=generator)
    if name.endswith("mixed-dtypes"):
        bias = bias.double()  # not one dtype: every candidate runs the registry kernel

    def kernel(*args):
        return elementwise(*args, ops=ops, operands=operands)

    offered = cands.elementwise_candidates(node, kernel, torch.float32)
    expected = elementwise(x.double(), scale.double(), bias.double(), ops=ops, operands=operands)
    return {c.name: _relative(c.run(x, scale, bias), expected) for c in offered}


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    _interpret_numpy_scalars()
    results = {}
    for name in ATTENTION:
        results[f"attention:{name}"] = run_attention(name)
    for name in CHAINS:
        results[f"chain:{name}"] = run_chain(name)
    for name in CANDIDATES:
        results[f"candidates:{name}"] = run_candidates(name)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
