"""kiln's native direct convolution (kiln/backends/cpu/native.py) against float64 torch, the layers that take it, and
the fallback to oneDNN where the library cannot be built."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.backends.cpu import fast, native, onednn
from kiln.ir import DType, Graph, Node, Value

needs_native = pytest.mark.skipif(not native.available()[0], reason=f"native kernels unavailable: {native.available()[1]}")
needs_native_bf16 = pytest.mark.skipif(not native.bf16_available(), reason="no native bf16 kernels (no AVX512-BF16)")
FLOAT_TYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bf16)]
rng = np.random.default_rng(0)
# what oneDNN runs a convolution as, fp32 or bf16: kiln's own primitive where its library builds, else torch's call
ONEDNN_CONV = "onednn-primitive" if onednn.available()[0] else "onednn-packed"

# (batch, in, out, size, kernel, stride, pad, dilation): 1x1s (one flat pixel row), padded 3x3s narrower than a tile
# (7x7) and wider, strided, dilated, a 7x7 kernel, output channels off the 16-channel block (1000, 24), rectangles, a
# 3x3 whose weights take two passes over the input channels (partial sums kept in the output between them)
SHAPES = [(1, 64, 16, 55, 1, 1, 0, 1), (2, 16, 24, 6, 1, 1, 0, 1), (1, 512, 1000, 13, 1, 1, 0, 1),
          (1, 32, 128, 27, 3, 1, 1, 1), (2, 64, 64, 7, 3, 1, 1, 1), (1, 16, 40, 9, 3, 2, 1, 1),
          (1, 24, 32, 12, 3, 1, 2, 2), (1, 16, 16, 15, 7, 2, 3, 1), (3, 48, 80, (5, 11), 3, 1, 1, 1),
          (1, 128, 64, 14, 1, 2, 0, 1), (1, 16, 17, 1, 3, 1, 1, 1), (1, 512, 72, 9, 3, 1, 1, 1)]


def conv_shape_id(s) -> str:
    return f"n{s[0]}-{s[1]}to{s[2]}-{s[3]}-k{s[4]}s{s[5]}p{s[6]}d{s[7]}"


def conv_case(shape):
    """A test convolution's fp32 input (fixed seed), weights and bias for `shape` (SHAPES' fields)."""
    n, cin, cout, size, k = shape[:5]
    h, w = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(1))
    weight = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    return x, weight, rng.standard_normal(cout).astype(np.float32)


def float64_conv(x, w, b, stride, pad, dilation, residual=None, clamp=(-np.inf, np.inf)):
    y = F.conv2d(x.double(), torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride, pad, dilation)
    if residual is not None:
        y = y + residual.double()
    return y.clamp(*clamp)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=conv_shape_id)
@pytest.mark.parametrize("fused", ["none", "relu+residual", "clip"])
def test_direct_convolution_matches_float64(shape, fused):
    n, cin, cout, size, k, stride, pad, dilation = shape
    x, weight, bias = conv_case(shape)
    clamp = {"none": (-np.inf, np.inf), "relu+residual": (0.0, np.inf), "clip": (-0.5, 0.75)}[fused]
    conv = native.DirectConvolution(weight, bias, [stride] * 2, [pad] * 2, [dilation] * 2, clamp)
    oh, ow = conv.output_size(*x.shape[2:])
    residual = torch.randn(n, cout, oh, ow) if fused == "relu+residual" else None
    expected = float64_conv(x, weight, bias, stride, pad, dilation, residual, clamp)
    actual = conv(x, residual)
    assert actual.shape == expected.shape and actual.is_contiguous(memory_format=torch.channels_last)
    # fp32 sums of up to 4608 terms in another order than float64's: 1e-5 of the sums' scale (before the clamp, which
    # can make the output's scale smaller than its sums': the clip case's 0.75)
    scale = float64_conv(x, weight, bias, stride, pad, dilation, residual).abs().max().item()
    assert (actual.double() - expected).abs().max().item() <= 1e-5 * scale


@needs_native
def test_in_place_residual_sum_writes_the_residuals_buffer():
    weight = (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    conv = native.DirectConvolution(weight, bias, [1, 1], [1, 1], [1, 1], (0.0, np.inf))
    x = torch.randn(1, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    expected = conv(x, residual.clone())
    y = conv(x, residual, in_place=True)
    assert y.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


needs_amx = pytest.mark.skipif(not native.amx_available(), reason="no native AMX kernels (CPU, compiler or Linux)")
# the direct kernel's shapes whose input channels are a multiple of 16 (AMX's), plus 48 input channels (tiles of
# 16 instead of 32), a batch whose last pixels end a 1x1's input (the zeroed copy), a strided 1x1 and 3x3 (phase
# images) and a 7x7/2
AMX_SHAPES = [s for s in SHAPES if s[1] % 16 == 0] + [
    (1, 48, 64, 13, 3, 1, 1, 1), (3, 32, 40, 5, 1, 1, 0, 1), (2, 64, 48, 9, 1, 2, 0, 1), (2, 32, 48, (11, 8), 3, 2, 1, 1),
    (1, 16, 32, 20, 7, 2, 3, 1)]


@needs_amx
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=conv_shape_id)
@pytest.mark.parametrize("fused", ["none", "relu+bf16 residual", "clip+fp32 residual"])
def test_amx_convolution_matches_float64(shape, fused):
    n, cin, cout, size, k, stride, pad, dilation = shape
    x, weight, bias = conv_case(shape)
    x = x.to(torch.bfloat16)
    clamp = {"none": (-np.inf, np.inf), "relu+bf16 residual": (0.0, np.inf), "clip+fp32 residual": (-0.5, 0.75)}[fused]
    dilations = [dilation] * 2
    conv = native.AmxConvolution(weight, bias, [stride] * 2, [pad] * 2, dilations, clamp)
    shape_out = conv.output_shape(x)
    residual = None if fused == "none" else torch.randn(*shape_out).to(torch.bfloat16 if "bf16" in fused else torch.float32)
    # the reference sees what the kernel sees: bf16 inputs and weights, exact products, float64 sums
    rounded = torch.from_numpy(weight).to(torch.bfloat16).float().numpy()
    expected = float64_conv(x.float(), rounded, bias, stride, pad, dilations,
                            residual.float() if residual is not None else None, clamp)
    actual = conv(x, residual)
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    # fp32 sums, then one rounding to bf16: 2^-8 of each value, plus the sums' order (1e-5 of the output's scale)
    error = (actual.double() - expected).abs()
    assert (error <= 2 ** -8 * expected.abs() + 1e-5 * expected.abs().max()).all()


@needs_amx
def test_what_the_amx_convolution_does_not_take():
    assert native.AmxConvolution.takes(16, [1, 2], [1, 1]).startswith("needs one stride")
    assert native.AmxConvolution.takes(32, [2, 2], [2, 2]) == "takes a dilation only at stride 1"
    assert native.AmxConvolution.takes(3, [2, 2], [1, 1]) == "needs input channels a multiple of 16, got 3"
    assert native.AmxConvolution.takes(32, [1, 1], [2, 2]) == native.AmxConvolution.takes(48, [2, 2], [1, 1]) == ""
    with pytest.raises(ValueError, match="one stride"):
        native.AmxConvolution(np.ones((16, 16, 3, 3), np.float32), None, [1, 2], [1, 1], [1, 1], (-np.inf, np.inf))


@needs_amx
def test_amx_convolution_in_place_and_into_a_slice():
    weight = (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32)
    conv = native.AmxConvolution(weight, None, [1, 1], [1, 1], [1, 1], (0.0, np.inf))
    x = torch.randn(1, 32, 10, 10).to(torch.bfloat16)
    residual = torch.randn(1, 32, 10, 10).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    expected = conv(x, residual.clone())
    y = conv(x, residual, in_place=True)
    assert y.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    wide = torch.zeros(1, 48, 10, 10, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv(x, out=wide[:, 8:40])
    torch.testing.assert_close(wide[:, 8:40], conv(x), rtol=0, atol=0)
    assert not wide[:, :8].any() and not wide[:, 40:].any()
    with pytest.raises(ValueError, match="channel slice"):
        conv(x, out=torch.empty(1, 32, 10, 10).contiguous(memory_format=torch.channels_last))


# (input channels, output channels, kernel, stride, pad, dilation, size): SqueezeNet's 3x3/2 and ResNet's 7x7/2
# stems (cut small), output channels off the 16-channel block and past 4 blocks, one channel, a dilated kernel, a
# row shorter than a tile
STEMS = [(3, 64, 3, 2, 0, 1, 33), (3, 64, 7, 2, 3, 1, 30), (3, 72, 3, 1, 1, 1, 13), (1, 20, 5, 1, 2, 1, 9),
         (4, 8, 3, 1, 2, 2, 11), (15, 16, 3, 2, 1, 1, 7), (3, 16, 3, 1, 1, 1, 3)]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("stem", STEMS, ids=[f"{s[0]}-{s[1]}-k{s[2]}s{s[3]}p{s[4]}d{s[5]}-{s[6]}" for s in STEMS])
def test_stem_convolution_matches_float64(stem, dtype):
    cin, cout, k, stride, pad, dilation, size = stem
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, cin, size, size, generator=generator)
    w = torch.randn(cout, cin, k, k, generator=generator).numpy() * 0.3
    b = torch.randn(cout, generator=generator).numpy()
    conv = native.StemConvolution(w, b, [stride] * 2, [pad] * 2, [dilation] * 2, (0.0, np.inf), dtype)
    y = conv(x)
    # bf16 math (undilated bf16 stems) multiplies the bf16 roundings of x and w, exactly, and sums in fp32
    assert conv.bf16_math == (dtype == torch.bfloat16 and dilation == 1 and native.bf16_available())
    rounded = (lambda t: torch.as_tensor(t).bfloat16().float()) if conv.bf16_math else torch.as_tensor
    expected = float64_conv(rounded(x), rounded(w).numpy(), b, stride, pad, dilation, clamp=(0.0, np.inf))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert tuple(y.shape) == tuple(expected.shape) == conv.output_shape(x)
    # fp32 sums over at most 15 * 49 taps; bf16 adds its rounding of the result (2^-8 relative)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - expected).abs() <= tolerance * expected.abs() + 1e-5).all()
    # NHWC and bf16 inputs give the same result
    torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), y, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", [3, 7])
def test_stem_convolution_keeps_infinities_and_nans_where_they_belong(kernel, dtype):
    """The bf16 kernel reads one element past a window's row, next to the row's odd last element, and masks it: an
    infinity there must not turn the outputs whose windows miss it into NaN (0 * inf)."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 17, 17, generator=generator)
    x[0, 0, 5, 7], x[0, 2, 9, 4], x[1, 1, 3, 3] = math.inf, -math.inf, math.nan
    w = torch.randn(8, 3, kernel, kernel, generator=generator).numpy() * 0.3
    b = torch.randn(8, generator=generator).numpy()
    conv = native.StemConvolution(w, b, [2, 2], [kernel // 2] * 2, [1, 1], (-np.inf, np.inf), dtype)
    y = conv(x).double()
    expected = float64_conv(x, w, b, 2, kernel // 2, 1)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert torch.equal(y[expected.isinf()], expected[expected.isinf()])
    assert expected.isfinite().sum() > expected.numel() // 2


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
def test_native_convolutions_keep_a_nan_through_their_clamp(dtype):
    """ReLU(NaN) is NaN in torch and onnxruntime; the native kernels' clamp once made it 0."""
    from kiln.backends.cpu import winograd

    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(7))
    x[0, 3, 4, 4] = math.nan
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
    b = np.zeros(32, np.float32)
    expected = torch.relu(F.conv2d(x, torch.from_numpy(w), padding=1)).isnan()
    assert expected.sum() == 9 * 32
    kernels = [winograd.WinogradConvolution(w, b, [1] * 4, (0.0, math.inf), dtype)]
    if dtype == torch.float32:
        kernels.append(native.DirectConvolution(w, b, [1, 1], [1, 1], [1, 1], (0.0, math.inf)))
    for kernel in kernels:
        assert torch.equal(kernel(x).isnan(), expected), type(kernel).__name__


@needs_native
def test_stem_convolution_refuses_what_it_cannot_run():
    conv = native.StemConvolution(np.ones((8, 3, 3, 3), np.float32), None, [1, 1], [1, 1], [1, 1], (-np.inf, np.inf),
                                  torch.float32)
    with pytest.raises(ValueError, match="expected"):
        conv(torch.ones(1, 4, 5, 5))
    with pytest.raises(ValueError, match="residual"):
        conv(torch.ones(1, 3, 5, 5), torch.ones(1, 8, 5, 5))
    with pytest.raises(ValueError, match="at most"):
        native.StemConvolution(np.ones((8, 16, 3, 3), np.float32), None, [1, 1], [1, 1], [1, 1], (0.0, np.inf), torch.float32)
    assert conv(torch.ones(0, 3, 5, 5)).shape == (0, 8, 5, 5)


def conv_node_graph(cin=16, cout=24, activation="relu", group=1, residual=False, k=3):
    w = (rng.standard_normal((cout, cin // group, k, k)) * 0.2).astype(np.float32)
    inputs = ("x", "w", "b") + (("r",) if residual else ())
    node = Node("Conv", inputs, ("y",), {"dilations": [1, 1], "group": group, "kernel_shape": [k, k],
                                         "pads": [k // 2] * 4, "strides": [1, 1], "activation": activation,
                                         "activation_params": [-1.0, 1.0] if activation == "clip" else []},
                name="conv", domain="kiln")
    graph_inputs = [Value("x", DType.float32, (1, cin, 8, 8))] + ([Value("r", DType.float32, (1, cout, 8, 8))] if residual else [])
    return Graph([node], graph_inputs, [Value("y", DType.float32, (1, cout, 8, 8))],
                 initializers={"w": w, "b": rng.standard_normal(cout).astype(np.float32)}, opsets={"": 18, "kiln": 1})


@needs_native
def test_which_convolutions_take_the_native_kernel():
    for graph in (conv_node_graph(), conv_node_graph(activation=""), conv_node_graph(activation="clip"),
                  conv_node_graph(residual=True), conv_node_graph(k=1), conv_node_graph(cout=20)):
        assert fast.choose(graph.nodes[0], graph, bf16=False).name == "native-direct"
    # fp32 3x3s of stride 1 with channels in and out in 16s take the Winograd kernel
    for graph in (conv_node_graph(cout=32), conv_node_graph(cout=32, residual=True), conv_node_graph(cout=32, activation="clip")):
        assert fast.choose(graph.nodes[0], graph, bf16=False).name == "native-winograd"
    # the 3-channel stems take the stem kernel, in both precisions, unless they add a residual
    assert fast.choose(conv_node_graph(cin=3).nodes[0], conv_node_graph(cin=3), bf16=False).name == "native-stem"
    # oneDNN keeps grouped convolutions, activations other than a clamp, and residual stems (a residual that is a
    # graph input, which kiln's primitive would sum into: torch's call)
    for graph in (conv_node_graph(group=2), conv_node_graph(activation="sigmoid")):
        assert fast.choose(graph.nodes[0], graph, bf16=False).name == ONEDNN_CONV
    assert fast.choose(conv_node_graph(cin=3, residual=True).nodes[0], conv_node_graph(cin=3, residual=True),
                       bf16=False).name == "onednn-packed"
    if fast.bf16_supported():  # bf16: the AMX kernel where it runs
        assert fast.choose(conv_node_graph().nodes[0], conv_node_graph(), bf16=True).name == \
            ("native-amx" if native.amx_available() else ONEDNN_CONV)
        stem = conv_node_graph(cin=3)
        assert fast.choose(stem.nodes[0], stem, bf16=True).name == ("native-stem" if native.bf16_available() else "onednn-packed")
        for graph in (conv_node_graph(group=2), conv_node_graph(cin=24)):
            assert fast.choose(graph.nodes[0], graph, bf16=True).name == ONEDNN_CONV
        # a 1x1 of stride 1: the native product over pixels (gemm.py), where AMX does not take it
        pointwise = conv_node_graph(k=1)
        assert fast.choose(pointwise.nodes[0], pointwise, bf16=True).name == \
            ("native-amx" if native.amx_available() else "native-gemm" if native.bf16_available() else ONEDNN_CONV)
        # a 3x3 of stride 1 with channels in 16s: the Winograd kernel in bf16 too, where AMX does not take it
        winograd_graph = conv_node_graph(cout=32)
        assert fast.choose(winograd_graph.nodes[0], winograd_graph, bf16=True).name == \
            ("native-amx" if native.amx_available() else "native-winograd" if native.bf16_available() else ONEDNN_CONV)


@needs_native
def test_native_tactic_runs_the_fused_layer():
    graph = conv_node_graph(activation="clip", residual=True)
    feed = {"x": torch.randn(1, 16, 8, 8), "r": torch.randn(1, 24, 8, 8)}
    tactic = fast.choose(graph.nodes[0], graph, bf16=False)
    with torch.inference_mode():
        actual = tactic.run(feed["x"], None, None, feed["r"])
    w, b = graph.initializers["w"], graph.initializers["b"]
    expected = float64_conv(feed["x"], w, b, 1, 1, 1, feed["r"], (-1.0, 1.0))
    assert (actual.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.fixture
def fresh_library(monkeypatch):
    """kiln's compiled libraries (the native kernels, its own oneDNN) loaded again under the test's environment, and
    again after it."""
    native._load.cache_clear()
    onednn._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native._load.cache_clear()
    onednn._load.cache_clear()


def test_opting_out_keeps_onednn(fresh_library):
    fresh_library.setenv("KILN_NATIVE", "0")
    assert native.available() == (False, "KILN_NATIVE=0")
    graph = conv_node_graph()
    assert fast.choose(graph.nodes[0], graph, bf16=False).name == ONEDNN_CONV


def test_no_compiler_is_a_reason_not_a_failure(fresh_library):
    fresh_library.setattr(native, "_compiler", lambda: None)
    fresh_library.setattr(native, "cpu_features", lambda: frozenset({"avx512f"}))
    assert native.available() == (False, "no C++ compiler found (set CXX, or install g++)")
    native._load.cache_clear()
    fresh_library.setattr(native, "cpu_features", lambda: frozenset({"avx2"}))
    assert native.available() == (False, "this CPU lacks avx512f")


def test_a_failing_compile_falls_back_and_the_engine_still_runs(fresh_library, tmp_path):
    fresh_library.setenv("KILN_CACHE_DIR", str(tmp_path))
    fresh_library.setenv("CXX", "false")  # a "compiler" that exits 1
    ok, reason = native.available()
    if "lacks" in reason:
        pytest.skip(reason)
    assert not ok and "compiling native.cpp failed" in reason
    assert not list(tmp_path.rglob("*.so")), "no half-written library is left for a later load"
    from onnx import TensorProto, helper, numpy_helper

    w, b = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]), opset_imports=[helper.make_opsetid("", 18)])
    engine = kiln.build(model, kiln.BuilderConfig())
    assert {layer["tactic"] for layer in engine.plan.layers.values()} == {"onednn-packed"}
    x = torch.randn(1, 16, 8, 8)
    y = torch.as_tensor(np.asarray(engine.run({"x": x})["y"]))
    assert (y.double() - float64_conv(x, w, b, 1, 1, 1, clamp=(0.0, np.inf))).abs().max().item() < 1e-4



class LibraryWithout:
    """A stand-in for the compiled library that, like ctypes.CDLL, raises AttributeError for a symbol it lacks: one
    compiled for a CPU without AMX (or without AVX512-BF16) has no kiln_conv_amx (or no _bf16 kernels)."""

    def __init__(self, amx: bool, bf16: bool):
        self.kiln_native_amx, self.kiln_native_bf16 = (lambda: int(amx)), (lambda: int(bf16))
        self.declared = []

    def __getattr__(self, name):
        if (name in ("kiln_conv_amx", "kiln_prepare_phases") and not self.kiln_native_amx()) \
                or (name.endswith("_bf16") and not self.kiln_native_bf16()):
            raise AttributeError(f"undefined symbol: {name}")
        function = type("Function", (), {})()
        self.__dict__[name] = function
        self.declared.append(name)
        return function


@pytest.mark.parametrize("amx, bf16", [(False, True), (False, False), (True, True)], ids=["zen4", "avx512", "amx"])
def test_the_library_loads_without_the_kernels_its_cpu_lacks(amx, bf16):
    library = LibraryWithout(amx, bf16)
    native._declare(library)  # an AMD Zen 4 (AVX512-BF16, no AMX) once failed here on kiln_conv_amx
    assert ("kiln_conv_amx" in library.declared) == amx and ("kiln_max_pool_nhwc_bf16" in library.declared) == bf16
    assert library.kiln_conv_nhwc.restype is None and library.kiln_max_pool_nhwc.argtypes


# (channels, size, kernel, stride, pad, dilation, ceil_mode): ResNet's and SqueezeNet's pools, channels off the
# 16-channel block, a dilated window, ceil mode's last window, more blocks than the kernel takes side by side (4)
POOLS = [(64, 112, 3, 2, 1, 1, False), (64, 111, 3, 2, 0, 1, True), (20, 9, 2, 2, 0, 1, False),
         (33, 10, 3, 1, 1, 2, False), (8, 7, 3, 2, 1, 1, True), (84, 13, 3, 2, 1, 1, False), (128, 9, 3, 2, 0, 1, True)]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("pool", POOLS, ids=[f"c{p[0]}-{p[1]}-k{p[2]}s{p[3]}p{p[4]}d{p[5]}{'-ceil' if p[6] else ''}" for p in POOLS])
def test_max_pool_equals_torch(pool, dtype):
    c, size, k, stride, pad, dilation, ceil_mode = pool
    x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, 1, 3, 4] = float("nan")
    x[1, 0, :4, :4] = -float("inf")
    # the kernel re-reduces a window whose running sum is NaN: infinities of both signs, and sums that overflow,
    # must still give the maximum, not NaN
    x[1, 1, :3, :3] = float("inf")
    x[1, 1, 1, 1] = -float("inf")
    x[0, 2, :4, :4] = 3e38  # bf16 holds it too
    x[1, c - 1, 2, 2] = float("nan")  # in the last block, which may stand beside others in one window's pass
    expected = F.max_pool2d(x, k, stride, pad, dilation, ceil_mode=ceil_mode)
    actual = native.MaxPool([k, k], [stride] * 2, [pad] * 2, [dilation] * 2, ceil_mode)(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# (shape, channels-last): NHWC with channels off the 16-lane block and on it, NCHW planes off it, rank 2 and 3,
# a 1x1 image (both layouts at once), an empty batch
AFFINE_SHAPES = [((2, 37, 5, 7), True), ((1, 256, 14, 14), True), ((2, 37, 5, 7), False), ((3, 20), False),
                 ((2, 24, 19), False), ((1, 1024, 1, 1), True), ((0, 16, 3, 3), True)]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("clamp", [(0.0, np.inf), (-np.inf, np.inf), (-0.5, 0.5)], ids=["relu", "none", "clip"])
@pytest.mark.parametrize("case", AFFINE_SHAPES, ids=[f"{'x'.join(map(str, s))}-{'nhwc' if cl else 'nchw'}" for s, cl in AFFINE_SHAPES])
def test_channel_affine_matches_float64(case, clamp, dtype):
    shape, channels_last = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    actual = native.ChannelAffine(scale, shift, clamp)(x)
    along_axis_1 = [1, shape[1]] + [1] * (len(shape) - 2)
    expected = (x.double() * torch.from_numpy(scale).double().view(along_axis_1)
                + torch.from_numpy(shift).double().view(along_axis_1)).clamp(*clamp)
    assert actual.dtype == dtype and actual.shape == x.shape and actual.stride() == x.stride()
    # fp32: one fused multiply-add; bf16: the input is exact, the result rounded once (2^-8 of its magnitude)
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert ((actual.double() - expected).abs() <= tolerance * expected.abs() + 1e-7).all()


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
def test_channel_affine_reads_a_channel_slice_in_place(dtype):
    buffer = torch.randn(2, 48, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    view = buffer[:, :37]  # a concatenation's first channels (concat.py): pixels 48 elements apart
    assert native._pixel_stride(view) == native._pixel_stride(buffer[:1, 5:6, :1]) == 48
    assert native._pixel_stride(buffer[:, 5:6, :1, :1]) == 5 * 7 * 48  # one pixel per image: images apart
    scale, shift = np.full(37, 0.5, np.float32), np.full(37, -0.25, np.float32)
    actual = native.ChannelAffine(scale, shift, (0.0, np.inf))(view)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, torch.relu(view.float() * 0.5 - 0.25).to(dtype))


@needs_native
def test_channel_affine_reads_a_strided_view_as_a_copy():
    x = torch.randn(2, 8, 6, 6)[:, :, ::2]  # neither layout: made contiguous first
    scale, shift = np.full(8, 2, np.float32), np.ones(8, np.float32)
    torch.testing.assert_close(native.ChannelAffine(scale, shift, (0.0, np.inf))(x), torch.relu(x * 2 + 1))


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 1000, 13, 13), (1, 37, 7, 7), (3, 16, 1, 1), (2, 128, 3, 3), (2, 144, 2, 3)], ids=str)
def test_global_average_pool_matches_float64(shape, dtype):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype).contiguous(memory_format=torch.channels_last)
    actual = native.global_average_pool(x)
    expected = x.double().mean(dim=(2, 3), keepdim=True)
    assert actual.dtype == dtype and actual.shape == expected.shape
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8  # fp32 sums; in bf16 one rounding of the mean
    assert ((actual.double() - expected).abs() <= tolerance * expected.abs() + 1e-6).all()


def test_folding_a_chain_into_one_affine_map():
    channels = 3
    a, b = np.array([2.0, -1.0, 0.5]), np.array([1.0, 2.0, 3.0])
    # ((x * a + b) - b) / a ... then b - value, then Relu: scale -1, shift b
    scale, shift, clamp = fast.fold_channel_affine(["Mul", "Add", "Sub", "Div", "Sub", "Relu"], [1, 2, 2, 1, -2, 0],
                                                   {1: a, 2: b}, channels)
    np.testing.assert_allclose(scale, -np.ones(channels))
    np.testing.assert_allclose(shift, b)
    assert clamp == (0.0, np.inf)
    assert fast.fold_channel_affine(["Mul", "Add"], [1, 2], {1: a, 2: b}, channels)[2] == (-np.inf, np.inf)
    # not affine in the running value, or a constant that is not per channel: no fold
    for ops, operands in ((["Relu", "Add"], [0, 1]), (["Div"], [-1]), (["Mul", "Exp"], [1, 0]), (["Add"], [3]),
                          (["Pow"], [1])):
        assert fast.fold_channel_affine(ops, operands, {1: a, 2: b}, channels) is None
    assert fast.fold_channel_affine(["Div"], [1], {1: np.array([1.0, 0.0, 2.0])}, channels) is None


def batch_norm_relu_model(channels=40, size=9):
    """x -> Conv -> Relu -> BatchNormalization -> Relu -> MaxPool -> GlobalAveragePool: the pre-activation DenseNet
    applies to each concatenation, a BatchNormalization no convolution before it can absorb (in a bf16 engine it
    meets the convolution's bf16 output), then two pools (native too)."""
    from onnx import TensorProto, helper, numpy_helper

    stats = [numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32) if name == "var"
                                     else rng.standard_normal(channels).astype(np.float32), name)
             for name in ("gamma", "beta", "mean", "var")]
    w = numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["p"], ["y"])]
    shape = [2, channels, size, size]
    return helper.make_model(helper.make_graph(
        nodes, "bn_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, channels, 1, 1])], [w, *stats]),
        opset_imports=[helper.make_opsetid("", 18)])


@needs_native
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_native_bf16)], ids=["fp32", "bf16"])
def test_a_batch_normalization_and_relu_and_the_pools_run_native(bf16):
    import onnxruntime

    model = batch_norm_relu_model()
    engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
    assert [layer["tactic"] for layer in engine.plan.layers.values()][1:] == ["native-affine", "native-pool", "native-mean"]
    x = rng.standard_normal((2, 40, 9, 9)).astype(np.float32)
    expected = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    actual = np.asarray(engine.run({"x": x})["y"], dtype=np.float32)
    relative = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert relative < (1e-2 if bf16 else 1e-6)


@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (1, 70, 5, 9), (1, 1, 1, 300)], ids=str)
def test_nchw_to_channels_last_equals_torch(shape, dtype):
    x = torch.randn(shape).to(dtype)
    y = native.channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
    assert native.channels_last(y) is y  # already NHWC: itself
    strided = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2)[..., ::2]  # neither layout: torch copies it
    assert torch.equal(native.channels_last(strided), strided)


def float64_lrn(x, size, alpha, beta, bias):
    """ONNX's LRN in float64: each channel over the squares of channels [c - (size-1)//2, c + size-1 - (size-1)//2]."""
    x = x.double()
    channels, before = x.shape[1], (size - 1) // 2
    squares = torch.stack([(x[:, max(0, c - before):min(channels, c + size - before)] ** 2).sum(1) for c in range(channels)], 1)
    return x / (bias + alpha / size * squares) ** beta


# (channels, size, alpha, beta, bias, channels-last): GoogLeNet's two (cut small), channels off the 16-lane block,
# an even size, a window wider than the channels, a window of one, the three betas the kernel takes
LRNS = [(64, 5, 1e-4, 0.75, 1.0, True), (192, 5, 1e-4, 0.75, 1.0, False), (20, 4, 0.02, 0.5, 2.0, True),
        (3, 7, 0.1, 0.75, 1.0, True), (17, 1, 0.5, 1.0, 0.5, False), (40, 3, 1.0, 1.0, 1.0, True)]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LRNS, ids=[f"c{c[0]}-size{c[1]}-beta{c[3]}{'-nhwc' if c[5] else ''}" for c in LRNS])
def test_local_response_norm_matches_float64(case, dtype):
    channels, size, alpha, beta, bias, channels_last = case
    x = (torch.randn(2, channels, 5, 7, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = native.LocalResponseNorm(size, alpha, beta, bias)(x)
    expected = float64_lrn(x, size, alpha, beta, bias)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    # fp32: a few ulp from the refined reciprocal square roots; bf16: the output's rounding (2^-8)
    tolerance = 2e-6 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - expected).abs() <= tolerance * expected.abs() + 1e-30).all()


@needs_native
def test_local_response_norm_takes_three_betas_and_a_positive_base():
    assert native.LocalResponseNorm.takes(5, 1e-4, 0.75, 1.0) == ""
    assert "beta" in native.LocalResponseNorm.takes(5, 1e-4, 0.6, 1.0)
    assert "bias" in native.LocalResponseNorm.takes(5, -1e-4, 0.75, 1.0)
    assert "bias" in native.LocalResponseNorm.takes(5, 1e-4, 0.75, 0.0)
    with pytest.raises(ValueError, match="beta"):
        native.LocalResponseNorm(5, 1e-4, 2.0, 1.0)
    with pytest.raises(ValueError, match="4-D"):
        native.LocalResponseNorm(3, 1e-4, 0.75, 1.0)(torch.ones(2, 8, 5))
    assert native.LocalResponseNorm(3, 1e-4, 0.75, 1.0)(torch.ones(0, 8, 2, 2)).shape == (0, 8, 2, 2)


def lrn_model(beta):
    """x -> Conv -> Relu -> LRN (GoogLeNet's, with `beta`) -> MaxPool."""
    from helpers import make_model
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("LRN", ["r"], ["n"], size=5, alpha=1e-4, beta=beta, bias=1.0),
             helper.make_node("MaxPool", ["n"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
    x = rng.standard_normal((2, 16, 11, 11)).astype(np.float32)
    return make_model(nodes, {"x": x}, ["y"], {"w": (rng.standard_normal((24, 16, 3, 3)) * 0.3).astype(np.float32)}), x


@needs_native
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_native_bf16)], ids=["fp32", "bf16"])
def test_an_lrn_runs_native_and_matches_onnxruntime(bf16):
    import onnxruntime

    for beta, tactic in ((0.75, "native-lrn"), (0.6, "torch")):  # a beta the kernel does not take stays on torch
        model, x = lrn_model(beta)
        engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
        assert [layer["tactic"] for layer in engine.plan.layers.values() if layer["op"] == "LRN"] == [tactic]
        expected = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        actual = np.asarray(engine.run({"x": x})["y"], dtype=np.float32)
        assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < (1e-2 if bf16 else 1e-6)


@needs_native
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_native_bf16)], ids=["fp32", "bf16"])
def test_average_pools_run_native_and_match_onnxruntime(bf16):
    import onnxruntime
    from helpers import make_model
    from onnx import helper

    x = rng.standard_normal((2, 40, 7, 7)).astype(np.float32)
    # GoogLeNet's 7x7 average before its classifier takes the native mean
    # and other windows the native average pool
    for attrs, tactic in (({"kernel_shape": [7, 7], "strides": [1, 1]}, "native-mean"),
                          ({"kernel_shape": [7, 7], "pads": [0, 0, 1, 1]}, "native-pool"),
                          ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, "native-pool"),
                          ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, "native-pool")):
        model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("AveragePool", ["r"], ["y"], **attrs)],
                           {"x": x}, ["y"])
        engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
        assert [layer["tactic"] for layer in engine.plan.layers.values() if layer["op"] == "AveragePool"] == [tactic]
        expected = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        actual = np.asarray(engine.run({"x": x})["y"], dtype=np.float32)
        assert actual.shape == expected.shape
        assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < (1e-2 if bf16 else 1e-6)


# (channels, size, kernel, stride, pads [top, left, bottom, right], count_include_pad, ceil_mode): GoogLeNet's 7x7 with
# its one-sided pad, DenseNet's 2x2/2 transitions, Inception's 3x3/1 padded both ways, ceil mode's extra column
AVERAGE_POOLS = [(40, 7, 7, 1, [0, 0, 1, 1], 0, 0), (20, 8, 2, 2, [0, 0, 0, 0], 0, 0), (33, 9, 3, 1, [1, 1, 1, 1], 1, 0),
                 (33, 9, 3, 1, [1, 1, 1, 1], 0, 0), (16, 10, 3, 2, [1, 0, 1, 2], 1, 1), (5, 6, 3, 2, [0, 0, 0, 0], 0, 1)]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("pool", AVERAGE_POOLS, ids=[f"c{p[0]}-{p[1]}-k{p[2]}s{p[3]}p{''.join(map(str, p[4]))}-inc{p[5]}-ceil{p[6]}"
                                                    for p in AVERAGE_POOLS])
def test_average_pool_matches_the_reference_kernel(pool, dtype):
    from kiln.ops.nn import average_pool

    channels, size, k, stride, pads, include, ceil_mode = pool
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(6)).to(dtype)
    expected = average_pool(x.double(), kernel_shape=[k, k], strides=[stride] * 2, pads=pads, count_include_pad=include,
                            ceil_mode=ceil_mode)
    y = native.AveragePool([k, k], [stride] * 2, pads, bool(include))(x, tuple(expected.shape[2:]))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - expected).abs() <= tolerance * expected.abs() + 1e-6).all()


def fire_module(concat_inputs=("e1", "e3"), extra_outputs=(), pool_branch=False):
    """A SqueezeNet fire module: squeeze 1x1 (24 -> 16), expand 1x1 and 3x3 (16 -> 32 each), concatenated; with
    pool_branch, a max pool of the squeeze joins the concatenation too."""
    from helpers import make_model
    from onnx import helper

    weights = {"ws": rng.standard_normal((16, 24, 1, 1)), "w1": rng.standard_normal((32, 16, 1, 1)),
               "w3": rng.standard_normal((32, 16, 3, 3)), "b": rng.standard_normal(32)}
    weights = {k: (v * 0.2).astype(np.float32) for k, v in weights.items()}
    nodes = [helper.make_node("Conv", ["x", "ws"], ["s0"]), helper.make_node("Relu", ["s0"], ["s"]),
             helper.make_node("Conv", ["s", "w1", "b"], ["c1"]), helper.make_node("Relu", ["c1"], ["e1"]),
             helper.make_node("Conv", ["s", "w3", "b"], ["c3"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c3"], ["e3"])]
    if pool_branch:
        nodes.append(helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Concat", list(concat_inputs), ["y"], axis=1))
    x = rng.standard_normal((2, 24, 9, 9)).astype(np.float32)
    return make_model(nodes, {"x": x}, ["y", *extra_outputs], weights), x


@pytest.fixture
def native_wins(monkeypatch):
    """The build's race (select.py) won by the native kernel on every layer, whatever this machine times: the tests
    that use it check what the native layers do, not which tactic is faster here."""
    from kiln.backends.cpu import select

    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {name: select.NATIVE for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.NATIVE)


@needs_native
@pytest.mark.usefixtures("native_wins")
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_amx)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("concat_inputs", [("e1", "e3"), ("e3", "e1")])
def test_a_fire_modules_convolutions_fill_its_concatenation(concat_inputs, bf16):
    from helpers import run_onnxruntime

    model, x = fire_module(concat_inputs)
    engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
    layers = engine.plan.layers
    concat = next(name for name, layer in layers.items() if layer["op"] == "Concat")
    assert layers[concat]["tactic"] == "native-in-place"
    # the expand convolutions that write it (the squeeze's 24 input channels are no multiple of AMX's 16), in fp32 the
    # 3x3 on the Winograd kernel
    assert [layer["tactic"] for layer in layers.values() if layer["op"] == "kiln::Conv"][1:] == \
        (["native-amx"] * 2 if bf16 else ["native-direct", "native-winograd"])
    expected = run_onnxruntime(model, {"x": x})["y"]
    outputs = [np.asarray(engine.run({"x": x})["y"]) for _ in range(2)]  # a fresh buffer each run
    for y in outputs:
        relative = np.linalg.norm(y - expected) / np.linalg.norm(expected)
        assert relative < (1e-2 if bf16 else 1e-6)
    assert not np.shares_memory(outputs[0], outputs[1])


@needs_native
@pytest.mark.usefixtures("native_wins")
@pytest.mark.parametrize("case", ["input is a graph output", "a pool's output", "the same input twice"])
def test_concatenation_inputs_that_are_copied_into_the_buffer(case):
    from helpers import run_onnxruntime

    from kiln.backends.cpu.concat import concatenation_chains

    model, x = {"input is a graph output": lambda: fire_module(extra_outputs=("e1",)),
                "a pool's output": lambda: fire_module(("e1", "e3", "p"), pool_branch=True),
                "the same input twice": lambda: fire_module(("e1", "e3", "e1"))}[case]()
    engine = kiln.build(model, kiln.BuilderConfig())
    graph = engine.plan.graph
    [chain] = concatenation_chains(graph, writers_of(graph))
    # the expand convolutions write their slices, except an output of the graph and an input taken twice; the
    # pool's output is copied
    written = {graph.nodes[index].outputs[0] for index in chain.writers}
    assert written == ({"e1", "e3"} if case == "a pool's output" else {"e3"})
    assert next(layer for layer in engine.plan.layers.values() if layer["op"] == "Concat")["tactic"] == "native-in-place"
    expected = run_onnxruntime(model, {"x": x})
    actual = engine.run({"x": x})
    for name, want in expected.items():
        np.testing.assert_allclose(np.asarray(actual[name]), want, rtol=1e-5, atol=1e-5)


def writers_of(graph):
    """Every convolution of `graph` as a native one that could write into a concatenation (what
    concatenation_chains reads of it: its output type)."""
    class Direct:
        dtype = torch.float32

    return {node.name: Direct() for node in graph.nodes if node.op_key == "kiln::Conv"}


def dense_block(layers=3, growth=16, channels=32, size=8):
    """A DenseNet block: each layer BatchNormalization -> Relu -> Conv 1x1 -> Relu -> Conv 3x3 on the concatenation
    so far, its features concatenated after it: Concat(previous concatenation, new features)."""
    from helpers import make_model
    from onnx import helper

    nodes, weights, features, width = [helper.make_node("Conv", ["x", "w_stem"], ["f0"], pads=[1, 1, 1, 1])], {}, "f0", channels
    weights["w_stem"] = rng.standard_normal((channels, 3, 3, 3)) * 0.3
    for i in range(layers):
        for name, size_ in (("scale", width), ("bias", width), ("mean", width), ("var", width)):
            weights[f"{name}{i}"] = rng.uniform(0.5, 1.5, size_) if name in ("scale", "var") else rng.standard_normal(size_) * 0.1
        weights[f"wa{i}"] = rng.standard_normal((32, width, 1, 1)) / np.sqrt(width)
        weights[f"wb{i}"] = rng.standard_normal((growth, 32, 3, 3)) / np.sqrt(32 * 9)
        nodes += [helper.make_node("BatchNormalization", [features, f"scale{i}", f"bias{i}", f"mean{i}", f"var{i}"], [f"bn{i}"]),
                  helper.make_node("Relu", [f"bn{i}"], [f"r{i}"]),
                  helper.make_node("Conv", [f"r{i}", f"wa{i}"], [f"a{i}"]), helper.make_node("Relu", [f"a{i}"], [f"ra{i}"]),
                  helper.make_node("Conv", [f"ra{i}", f"wb{i}"], [f"n{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Concat", [features, f"n{i}"], [f"c{i}"], axis=1)]
        features, width = f"c{i}", width + growth
    nodes.append(helper.make_node("Relu", [features], ["y"]))
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    return make_model(nodes, {"x": x}, ["y"], {k: np.asarray(v, np.float32) for k, v in weights.items()}), x


@needs_native
@pytest.mark.usefixtures("native_wins")
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_amx)], ids=["fp32", "bf16"])
def test_a_dense_blocks_concatenations_share_one_buffer(bf16):
    from helpers import run_onnxruntime

    from kiln.backends.cpu.concat import concatenation_chains

    model, x = dense_block()
    engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
    graph = engine.plan.graph
    [chain] = concatenation_chains(graph, writers_of(graph))
    assert len(chain.concats) == 3 and chain.widths == [48, 64, 80]
    assert sorted(chain.writers.values()) == [32, 48, 64]  # each layer's 3x3 writes its 16 channels after the rest
    layers = engine.plan.layers
    assert [layer["tactic"] for layer in layers.values() if layer["op"] == "Concat"] == ["native-in-place"] * 3
    expected = run_onnxruntime(model, {"x": x})["y"]
    outputs = [np.asarray(engine.run({"x": x})["y"], dtype=np.float32) for _ in range(2)]
    for y in outputs:
        assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < (1e-2 if bf16 else 1e-6)
    assert not np.shares_memory(outputs[0], outputs[1])


@needs_native
@pytest.mark.usefixtures("native_wins")
def test_concurrent_runs_of_one_engine_keep_their_own_buffers():
    from concurrent.futures import ThreadPoolExecutor

    from helpers import run_onnxruntime

    model, _ = fire_module()
    engine = kiln.build(model, kiln.BuilderConfig())
    assert "native-in-place" in {layer["tactic"] for layer in engine.plan.layers.values()}
    feeds = [rng.standard_normal((2, 24, 9, 9)).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: np.asarray(engine.run({"x": x})["y"]), feeds * 3))
    for x, y in zip(feeds * 3, results):
        np.testing.assert_allclose(y, run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


@needs_native
def test_the_build_times_both_tactics_and_a_loaded_engine_follows_its_choice(monkeypatch, tmp_path):
    """Each native-eligible convolution is timed both ways inside the engine; the faster is recorded in the plan, and
    loading the engine lowers it the same way without timing again."""
    from helpers import run_onnxruntime

    from kiln.backends.cpu import select

    model, x = fire_module()
    graph_nodes = kiln.build(model, kiln.BuilderConfig()).plan.graph.nodes  # the fused layers' names
    three_by_three = next(n.name for n in graph_nodes if n.op_key == "kiln::Conv" and n.attrs["kernel_shape"] == [3, 3])
    calls = []
    fastest = select.fastest
    # rig the race: the 3x3 goes to oneDNN, the rest to the native kernel
    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: calls.append(layers) or {
        name: select.ONEDNN if name == three_by_three else select.NATIVE for name in fastest(programs, feed, layers)})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: sorted(programs) == sorted(
        [select.NATIVE, select.ONEDNN, select.MIXED]) and select.MIXED)
    engine = kiln.build(model, kiln.BuilderConfig())
    assert len(calls) == 1 and three_by_three in calls[0] and len(calls[0]) == 3
    layers = engine.plan.layers
    assert layers[three_by_three]["tactic"] == ONEDNN_CONV
    assert sorted(layer["tactic"] for layer in layers.values() if layer["op"] == "kiln::Conv") == \
        ["native-direct", "native-direct", ONEDNN_CONV]
    # one producer is oneDNN's: its output is copied into the concatenation's buffer, the other writes there
    assert next(layer for layer in layers.values() if layer["op"] == "Concat")["tactic"] == "native-in-place"
    engine.save(tmp_path / "fire.kiln")
    loaded = kiln.load(tmp_path / "fire.kiln")
    np.testing.assert_allclose(np.asarray(loaded.run({"x": x})["y"]), run_onnxruntime(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    assert len(calls) == 1, "the loaded engine did not time again"
    assert loaded.program.layer_info[three_by_three]["tactic"] == ONEDNN_CONV


@needs_native
def test_the_whole_engine_race_times_each_engine_with_its_concatenation_in_place(monkeypatch):
    """The whole-engine race times each candidate as it will be built: with their convolutions writing into the
    concatenation's buffer where their kernels can, and all three computing what the built engine computes."""
    from kiln.backends.cpu import select

    model, x = fire_module()
    graph_nodes = kiln.build(model, kiln.BuilderConfig()).plan.graph.nodes
    three_by_three = next(n.name for n in graph_nodes if n.op_key == "kiln::Conv" and n.attrs["kernel_shape"] == [3, 3])
    concat = next(n.name for n in graph_nodes if n.op_key == "Concat")
    fastest = select.fastest
    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: {
        name: select.ONEDNN if name == three_by_three else select.NATIVE for name in fastest(programs, feed, layers)})
    raced = {}

    def record(programs, feed):
        raced.update(programs)
        return select.NATIVE

    monkeypatch.setattr(select, "fastest_engine", record)
    engine = kiln.build(model, kiln.BuilderConfig())
    assert sorted(raced) == sorted([select.NATIVE, select.ONEDNN, select.MIXED])
    feed = {"x": torch.from_numpy(x)}
    expected = np.asarray(engine.run(feed)["y"])
    for key, program in raced.items():
        step = next(step for step in program.steps if step.name == concat)
        # the chain's Concat takes the run's buffer (it wants the run's environment); a plain Concat copies. kiln's
        # own oneDNN primitives write into the buffer too; torch's oneDNN calls cannot
        assert step.wants_env == (key != select.ONEDNN or onednn.available()[0]), key
        with torch.inference_mode():
            np.testing.assert_allclose(np.asarray(program.execute(dict(feed))["y"]), expected, rtol=1e-5, atol=1e-5)
    # the engine built from the race keeps its own steps: the copies timed there were not the program's
    assert engine.plan.layers[concat]["tactic"] == "native-in-place"


def test_timing_needs_float_inputs_of_known_shape():
    from kiln.backends.cpu import select

    image = Graph([], [Value("x", DType.float32, ("N", 3, 4, 4))], [], opsets={"": 18})
    feed = select.timing_feed(image, {"N": 2})
    assert feed["x"].shape == (2, 3, 4, 4) and feed["x"].dtype == torch.float32 and feed["x"].std() > 0.5
    assert select.timing_feed(image, {}) is None, "a batch with no opt size"
    ids = Graph([], [Value("ids", DType.int64, (1, 8))], [], opsets={"": 18})
    assert select.timing_feed(ids, {}) is None, "token ids: a random feed could index out of range"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeProgram:
    """A program whose run takes `seconds` on the fake clock."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds = clock, seconds

    def execute(self, feed):
        self.clock.now += self.seconds


@pytest.mark.parametrize("native_s, mixed_s, winner", [(0.99, None, "onednn"), (0.97, None, "native"),
                                                       (0.90, 0.80, "mixed"), (1.20, 0.99, "onednn"),
                                                       (0.90, 0.91, "mixed"), (0.88, 0.91, "native"),
                                                       (0.90, 0.99, "native")])
def test_the_whole_engine_must_run_the_margin_faster_to_keep_native_kernels(monkeypatch, native_s, mixed_s, winner):
    from kiln.backends.cpu import select

    clock = FakeClock()
    monkeypatch.setattr(select, "clock", clock)
    monkeypatch.setattr(select, "SETTLE_S", 0)
    programs = {select.NATIVE: FakeProgram(clock, native_s), select.ONEDNN: FakeProgram(clock, 1.0)}
    if mixed_s is not None:
        programs[select.MIXED] = FakeProgram(clock, mixed_s)
    assert select.ENGINE_MARGIN == 0.02  # the cases above straddle it
    assert select.fastest_engine(programs, {}) == winner
    # each round (an untimed and a timed run of each) takes longer than the budget: only the minimum rounds run
    assert clock.now == pytest.approx(2 * sum(p.seconds for p in programs.values()) * select.MIN_ROUNDS)
