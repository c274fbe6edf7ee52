"""The GPU int8/fp8 matrix kernels' arithmetic, checked on the CPU (torch._int_mm and torch._scaled_mm run
there too) against float64; on a GPU the same tests run on CUDA tensors."""
import numpy as np
import pytest
import torch

from kiln.backends.cuda.int8 import Fp8Linear, Int8Linear
from kiln.ops.quantize import int_matmul

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 20, 10), (40, 64, 24)])  # odd sizes: the CUDA path pads to its multiples
def test_int_matmul_exact(device, shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    got = int_matmul(a.to(device), b.to(device)).cpu()
    assert torch.equal(got, (a.long() @ b.long()).int())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_matches_float64(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g)
    wq = torch.randint(-127, 128, (24, 48), generator=g, dtype=torch.int8)
    w_scale, bias, x_scale = torch.rand(24, generator=g) * 0.01 + 0.001, torch.randn(24, generator=g), 0.03
    layer = Int8Linear.prepare(wq, w_scale, bias, x_scale, activation="relu", device=device)
    got = layer(x.to(device)).cpu().numpy()
    xq = np.clip(np.rint(x.double().numpy() / x_scale), -128, 127)
    want = np.maximum(xq @ wq.double().numpy().T * (w_scale.double().numpy() * x_scale) + bias.double().numpy(), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_linear_close_to_fp32():
    device = "cuda" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else "cpu"
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(7, 40, generator=g), torch.randn(30, 40, generator=g) * 0.1, torch.randn(30, generator=g)
    layer = Fp8Linear.prepare(weight, bias, x_amax=float(x.abs().max()), device=device)
    got = layer(x.to(device)).cpu()
    want = x @ weight.t() + bias
    # e4m3 keeps 3 mantissa bits: a few percent per product, averaging out over the 40-long sums
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_as_int8_gemm_matches_qconv(stride):
    """A 1x1 convolution as _int_mm over channels-last pixels (stride 2 samples first) = kiln::QConv's reference."""
    from kiln.backends.cuda.int8 import _pointwise
    from kiln.ops.quantize import qconv

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 7, 9, generator=g)
    wq = torch.randint(-127, 128, (16, 24, 1, 1), generator=g, dtype=torch.int8)
    w_scale, bias, x_scale = torch.rand(16, generator=g) * 0.01 + 0.001, torch.randn(16, generator=g), 0.02
    residual = torch.randn(2, 16, (7 - 1) // stride + 1, (9 - 1) // stride + 1, generator=g)
    layer = Int8Linear.prepare(wq.reshape(16, 24), w_scale, bias, x_scale, "relu", device="cpu")
    got = _pointwise(layer, [stride, stride])(x, None, None, None, residual)
    want = qconv(x, wq, w_scale, bias, residual, x_scale=x_scale, strides=[stride, stride], pads=[0, 0, 0, 0],
                 dilations=[1, 1], group=1, kernel_shape=[1, 1], activation="relu")
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_linear_epilogue_in_half():
    """Bias inside _scaled_mm, then residual and activation, handed on in fp16."""
    g = torch.Generator().manual_seed(4)
    x, weight, bias = torch.randn(9, 48, generator=g), torch.randn(32, 48, generator=g) * 0.1, torch.randn(32, generator=g)
    residual = torch.randn(9, 32, generator=g)
    layer = Fp8Linear.prepare(weight, bias, x_amax=float(x.abs().max()), device="cpu", activation="relu",
                              out_dtype=torch.float16)
    got = layer(x.half(), residual.half())
    want = torch.relu(x @ weight.t() + bias + residual)
    assert got.dtype == torch.float16 and float((got.float() - want).norm() / want.norm()) < 0.05


TRITON_CHECK = """
import torch
from kiln.backends.cuda import int8_kernels as K
from kiln.ops.quantize import qconv, qgemm, quantize_activation
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 24, 9, 7, generator=g)
wq = torch.randint(-127, 128, (20, 24, 3, 3), generator=g, dtype=torch.int8)
ws, b, xs = torch.rand(20, generator=g) * 0.01, torch.randn(20, generator=g), 0.02
res = torch.randn(2, 20, 5, 4, generator=g)
want = qconv(x, wq, ws, b, res, x_scale=xs, strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1], group=1,
             kernel_shape=[3, 3], activation="relu")
weight_nk = wq.permute(0, 2, 3, 1).reshape(20, -1).contiguous()
got = K.conv_int8(x, weight_nk, ws * xs, b, res, xs, ((3, 3), (2, 2), (1, 1), (1, 1)), "relu", torch.float32, (32, 32, 32, 4, 2))
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
quantized = K.quantize(x.permute(0, 2, 3, 1), xs).permute(0, 3, 1, 2)  # int8 input, channels-last: taken as is
got = K.conv_int8(quantized, weight_nk, ws * xs, b, res, xs, ((3, 3), (2, 2), (1, 1), (1, 1)), "relu", torch.float32, (16, 32, 64, 4, 2))
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
got = K.conv_int8(quantized, weight_nk, ws * xs, b, res, xs, ((3, 3), (2, 2), (1, 1), (1, 1)), "relu", torch.float32, (16, 32, 64, 4, 2), out_scale=0.05)
assert got.dtype == torch.int8 and torch.equal(got, quantize_activation(want, 0.05))  # int8 out, in the next layer's scale
from kiln.backends.cuda.int8 import int8_candidates
from kiln.backends.tactics import relative_error
from kiln.ir import Node
node = Node("QConv", ("x", "w", "s", "b", "r"), ("y",), domain="kiln", name="q", attrs={"x_scale": xs,
            "kernel_shape": [3, 3], "group": 1, "pads": [1, 1, 1, 1], "strides": [2, 2], "dilations": [1, 1], "activation": "relu"})
handed_out = int8_candidates(node, wq, ws, b, ["fp32"], torch.float32, False, False, out_scale=0.05, int8_input=True)
handed_in = int8_candidates(node, wq, ws, b, ["fp32"], torch.float32, False, False, int8_input=True)
assert all(c.precision == "int8" and c.name.endswith("-int8-out") for c in handed_out)
assert all(c.precision == "int8" and not c.name.endswith("-int8-out") for c in handed_in)
res_q = K.quantize(res.permute(0, 2, 3, 1), 0.04).permute(0, 3, 1, 2)  # a residual handed on in int8
want = qconv(x, wq, ws, b, res_q.float() * 0.04, x_scale=xs, strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1],
             group=1, kernel_shape=[3, 3], activation="relu")
got = K.conv_int8(quantized, weight_nk, ws * xs, b, res_q, xs, ((3, 3), (2, 2), (1, 1), (1, 1)), "relu", torch.float32,
                  (16, 32, 64, 4, 2), residual_scale=0.04)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
handed_res = int8_candidates(node, wq, ws, b, ["fp32"], torch.float32, False, False, int8_input=True, residual_scale=0.04)
args = [quantized, wq, ws, b, res_q]
assert relative_error(handed_res[0].run(*args), handed_res[0].reference(*args)) < 1e-3
for candidate in (handed_in[0], handed_out[0]):  # int8 in; float out, int8 out
    args = [quantized, wq, ws, b, res]
    assert relative_error(candidate.run(*args), candidate.reference(*args)) < 1e-3, candidate.name
for kernel, stride, pad in ((7, 2, 3), (3, 1, 1)):  # a 3-channel stem: its reduction packs (kh, kw, c) columns
    assert K.packs(3, (kernel, kernel)) and K.conv_configs(3, (kernel, kernel)) == K.PACKED_CONFIGS
    xs3, ws3 = torch.randn(2, 3, 13, 11, generator=g), torch.rand(8, generator=g) * 0.01
    wq3 = torch.randint(-127, 128, (8, 3, kernel, kernel), generator=g, dtype=torch.int8)
    want = qconv(xs3, wq3, ws3, b[:8], None, x_scale=xs, strides=[stride] * 2, pads=[pad] * 4, dilations=[1, 1], group=1,
                 kernel_shape=[kernel] * 2, activation="relu")
    w3 = wq3.permute(0, 2, 3, 1).reshape(8, -1).contiguous()
    geometry3 = ((kernel, kernel), (stride, stride), (pad, pad), (1, 1))
    for config in ((16, 32, 32, 4, 2), (32, 32, 64, 4, 2)):  # 147 or 27 columns: a partial last block either way
        got = K.conv_int8(xs3, w3, ws3 * xs, b[:8], None, xs, geometry3, "relu", torch.float32, config)  # NCHW float in
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    q3 = K.quantize(xs3.permute(0, 2, 3, 1), xs).permute(0, 3, 1, 2)
    got = K.conv_int8(q3, w3, ws3 * xs, b[:8], None, xs, geometry3, "relu", torch.float32, (16, 32, 32, 4, 2), out_scale=0.05)
    assert torch.equal(got, quantize_activation(want, 0.05))
assert not K.packs(24, (3, 3)) and not K.packs(3, (1, 1))
xp, wp = torch.randn(2, 32, 5, 3, generator=g), torch.randint(-127, 128, (48, 32, 1, 1), generator=g, dtype=torch.int8)
wsp, rp = torch.rand(48, generator=g) * 0.01, torch.randn(2, 48, 5, 3, generator=g)  # 30 pixels: a partial row tile
qx, rq = K.quantize(xp.permute(0, 2, 3, 1), xs).permute(0, 3, 1, 2), K.quantize(rp.permute(0, 2, 3, 1), 0.04).permute(0, 3, 1, 2)
want = qconv(qx.float() * xs, wp, wsp, b[:16].repeat(3), rq.float() * 0.04, x_scale=xs, strides=[1, 1], pads=[0] * 4,
             dilations=[1, 1], group=1, kernel_shape=[1, 1], activation="relu")
wp_nk = wp.reshape(48, 32).contiguous()
assert K.pointwise_applies(32, 48, torch.int8) and not K.pointwise_applies(24, 48, torch.int8)
for config, out_scale in (((16, 32, 32, 4, 2), None), ((32, 16, 16, 4, 2), 0.05)):  # 48 columns: a partial column tile
    got = K.pointwise_int8(qx, wp_nk, wsp * xs, b[:16].repeat(3), rq, xs, ((1, 1), (1, 1), (0, 0), (1, 1)), "relu",
                           torch.float32, config, out_scale, 0.04)
    assert got.shape == want.shape
    if out_scale is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got.dtype == torch.int8 and torch.equal(got, quantize_activation(want, out_scale))
node1 = Node("QConv", ("x", "w", "s", "b", "r"), ("y",), domain="kiln", name="p", attrs={"x_scale": xs,
             "kernel_shape": [1, 1], "group": 1, "pads": [0] * 4, "strides": [1, 1], "dilations": [1, 1], "activation": "relu"})
tma = [c for c in int8_candidates(node1, wp, wsp, b[:16].repeat(3), ["fp32"], torch.float32, False, False, out_scale=0.05,
                                  int8_input=True, residual_scale=0.04) if "tma" in c.name]
assert len(tma) == len(K.POINTWISE_CONFIGS) and all(c.name.endswith("-int8-out") for c in tma)
w3x3 = torch.randint(-127, 128, (48, 32, 3, 3), generator=g, dtype=torch.int8)
w3x3_nk = w3x3.permute(0, 2, 3, 1).reshape(48, -1).contiguous()
want = qconv(qx.float() * xs, w3x3, wsp, b[:16].repeat(3), rq.float() * 0.04, x_scale=xs, strides=[1, 1], pads=[1] * 4,
             dilations=[1, 1], group=1, kernel_shape=[3, 3], activation="relu")
geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
assert K.window_applies(32, 48, torch.int8, geometry) and not K.window_applies(32, 48, torch.int8, ((3, 3), (2, 2), (1, 1), (1, 1)))
for config, out_scale in (((4, 8, 32, 32, 4, 2), None), ((8, 4, 16, 64, 4, 2), 0.05)):  # windows past the 5x3 image's edges
    got = K.window_conv_int8(qx, w3x3_nk, wsp * xs, b[:16].repeat(3), rq, xs, geometry, "relu", torch.float32, config,
                             out_scale, 0.04)
    assert got.shape == want.shape
    if out_scale is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got.dtype == torch.int8 and torch.equal(got, quantize_activation(want, out_scale))
node3 = node1.replace(attrs={**node1.attrs, "kernel_shape": [3, 3], "pads": [1] * 4})
window = [c for c in int8_candidates(node3, w3x3, wsp, None, ["fp32"], torch.float32, False, False, int8_input=True)
          if "tma-window" in c.name]
assert len(window) == len(K.WINDOW_CONFIGS)
kinds = lambda *args: [kind for kind, _, _ in K.conv_kernels(*args)]
assert set(kinds(32, 48, ((3, 3), (1, 1), (1, 1), (1, 1)), True, torch.int8)) == {"implicit-gemm", "tma-window"}
assert set(kinds(32, 48, ((1, 1), (1, 1), (0, 0), (1, 1)), True, torch.int8)) == {"implicit-gemm", "tma-1x1"}
assert set(kinds(32, 48, ((1, 1), (2, 2), (0, 0), (1, 1)), True, torch.int8)) == {"implicit-gemm"}  # stride 2: no TMA
assert set(kinds(32, 48, ((3, 3), (1, 1), (1, 1), (1, 1)), False, torch.float16)) == {"implicit-gemm"}  # float in
xk, wk = torch.randn(2, 128, 5, 3, generator=g), torch.randint(-127, 128, (48, 128, 3, 3), generator=g, dtype=torch.int8)
wk_nk = wk.permute(0, 2, 3, 1).reshape(48, -1).contiguous()
split_geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
assert "split-k" in kinds(128, 48, split_geometry, False, torch.float32, 30)  # 30 pixels: one tile, 1152 reduction lanes
assert "split-k" not in kinds(128, 48, split_geometry, False, torch.float32, 30 * 4096)  # enough tiles already
want = qconv(xk, wk, wsp, b[:16].repeat(3), rq.float() * 0.04, x_scale=xs, strides=[1, 1], pads=[1] * 4,
             dilations=[1, 1], group=1, kernel_shape=[3, 3], activation="relu")
for config, out_scale in (((16, 32, 32, 4, 2, 3), None), ((16, 32, 32, 4, 2, 5), 0.05)):  # 36 steps: 3 x 12, 5 x 8 (a tail)
    got = K.conv_int8(xk, wk_nk, wsp * xs, b[:16].repeat(3), rq, xs, split_geometry, "relu", torch.float32, config,
                      out_scale, 0.04)
    if out_scale is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got.dtype == torch.int8 and torch.equal(got, quantize_activation(want, out_scale))
from kiln.backends.cpu.kernels import bind_kernel
from kiln.backends.cuda.candidates import maxpool_candidates
pool = Node("MaxPool", ("p",), ("q",), name="pool", attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
qp = K.quantize(torch.randn(2, 9, 8, 6, generator=g) - 3.0, 0.05).permute(0, 3, 1, 2)  # int8, channels-last, negatives
(candidate,) = maxpool_candidates(pool, bind_kernel(pool, 17), torch.float32, int8_scale=0.05)  # int8 through the pool
got = candidate.run(qp)
assert got.dtype == torch.int8 and torch.equal(got, torch.nn.functional.max_pool2d(qp.float(), 3, 2, 1).to(torch.int8))
assert torch.equal(got, candidate.reference(qp))  # padding never wins, negative maxima included
xg, wg, r = torch.randn(3, 5, 40, generator=g), torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8), torch.randn(3, 5, 24, generator=g)
want = qgemm(xg, wg, ws.repeat(2)[:24], None, r, x_scale=xs, activation="gelu")
got = K.gemm_int8(xg, wg, ws.repeat(2)[:24] * xs, None, r, xs, "gelu", torch.float32, (32, 32, 32, 4, 2))
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
assert torch.equal(K.quantize(xg * 3, xs), quantize_activation(xg * 3, xs))
acc = torch.randint(-1000, 1000, (6, 12), dtype=torch.int32)[:, :10]
torch.testing.assert_close(K.dequantize(acc, ws[:10], b[:10], None, "", torch.float32), acc.float() * ws[:10] + b[:10])
print("ok")
"""


def test_triton_int8_kernels_match_the_reference_in_the_interpreter():
    """kiln's Triton int8 kernels (implicit-GEMM convolution with stride, padding, bias, residual and ReLU, on a float
    input and on an int8 one, with a float output and an int8 one, a float residual and an int8 one (also as the
    hand-off's candidates, each against its own reference), with a channel count that does not fill the last channel block,
    and 3-channel stems whose reduction packs (kh, kw, c) columns; the max pool on int8 with padding; the TMA pointwise GEMM and window convolution on int8 pixels with partial tiles; split-K with a
    partial last split; the
    fused GEMM; quantize; dequantize from a padded int32 product), run by Triton's CPU interpreter: exact integer
    sums, the same rounding as kiln::QConv / kiln::QGemm."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernels are decorated: a fresh process
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tma_and_packed_int8_kernels_on_the_gpu():
    """On a real GPU (TMA and int8 tensor cores, which the interpreter only imitates): the 1x1 TMA GEMM and the TMA
    window convolution on int8 pixels with an int8 residual, in every configuration the tactic chooser offers, with
    fp16 output (within fp16 rounding of kiln::QConv's reference) and int8 output (within one step); the packed
    3-channel stem; split-K on batch 1's layer4 3x3; the max pool on int8."""
    pytest.importorskip("triton")
    from kiln.backends.cuda import int8_kernels as K
    from kiln.backends.cuda.triton_kernels import maxpool_nhwc
    from kiln.ops.quantize import qconv, quantize_activation

    g, xs = torch.Generator().manual_seed(0), 0.02
    x, r = torch.randn(4, 64, 14, 14, generator=g), torch.randn(4, 128, 14, 14, generator=g)
    qx = K.quantize(x.permute(0, 2, 3, 1).cuda(), xs).permute(0, 3, 1, 2)
    rq = K.quantize(r.permute(0, 2, 3, 1).cuda(), 0.04).permute(0, 3, 1, 2)
    ws, b = (torch.rand(128, generator=g) * 0.01).cuda(), torch.randn(128, generator=g).cuda()
    for k, pad, configs in ((1, 0, K.POINTWISE_CONFIGS), (3, 1, K.WINDOW_CONFIGS)):
        wq = torch.randint(-127, 128, (128, 64, k, k), generator=g, dtype=torch.int8).cuda()
        want = qconv(qx.float() * xs, wq, ws, b, rq.float() * 0.04, x_scale=xs, strides=[1, 1], pads=[pad] * 4,
                     dilations=[1, 1], group=1, kernel_shape=[k, k], activation="relu")
        nk = wq.permute(0, 2, 3, 1).reshape(128, -1).contiguous()
        geometry = ((k, k), (1, 1), (pad, pad), (1, 1))
        kernel = K.pointwise_int8 if k == 1 else K.window_conv_int8
        for config in configs:
            for out_scale in (None, 0.05):
                got = kernel(qx, nk, ws * xs, b, rq, xs, geometry, "relu", torch.float16, config, out_scale, 0.04)
                if out_scale is None:
                    assert float((got.float() - want).norm() / want.norm()) < 2e-3, (k, config)
                else:
                    steps = (got.float() - quantize_activation(want, out_scale).float()).abs().max()
                    assert got.dtype == torch.int8 and float(steps) <= 1, (k, config)
    x3 = torch.randn(2, 3, 32, 32, generator=g).cuda().half()
    w3 = torch.randint(-127, 128, (64, 3, 7, 7), generator=g, dtype=torch.int8).cuda()
    ws3 = (torch.rand(64, generator=g) * 0.01).cuda()
    want = qconv(x3.float(), w3, ws3, b[:64], None, x_scale=xs, strides=[2, 2], pads=[3] * 4, dilations=[1, 1], group=1,
                 kernel_shape=[7, 7], activation="relu")
    nk3 = w3.permute(0, 2, 3, 1).reshape(64, -1).contiguous()
    for config in K.PACKED_CONFIGS:
        got = K.conv_int8(x3, nk3, ws3 * xs, b[:64], None, xs, ((7, 7), (2, 2), (3, 3), (1, 1)), "relu", torch.float16, config)
        assert float((got.float() - want).norm() / want.norm()) < 2e-3, config
    x4 = torch.randn(1, 512, 7, 7, generator=g).cuda().half()  # batch 1's layer4 3x3: one row of tiles, split-K
    w4 = torch.randint(-127, 128, (512, 512, 3, 3), generator=g, dtype=torch.int8).cuda()
    ws4 = (torch.rand(512, generator=g) * 0.001).cuda()
    want = qconv(x4.float(), w4, ws4, None, None, x_scale=xs, strides=[1, 1], pads=[1] * 4, dilations=[1, 1], group=1,
                 kernel_shape=[3, 3], activation="relu")
    nk4 = w4.permute(0, 2, 3, 1).reshape(512, -1).contiguous()
    for config in K.SPLIT_CONFIGS:
        got = K.conv_int8(x4, nk4, ws4 * xs, None, None, xs, ((3, 3), (1, 1), (1, 1), (1, 1)), "relu", torch.float16, config)
        assert float((got.float() - want).norm() / want.norm()) < 2e-3, config
    qp = K.quantize((torch.randn(2, 9, 8, 16, generator=g) - 3).cuda(), 0.05).permute(0, 3, 1, 2)
    pooled = maxpool_nhwc(qp, (3, 3), (2, 2), (1, 1, 1, 1))
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(qp.float(), 3, 2, 1).to(torch.int8))
