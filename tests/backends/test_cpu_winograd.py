"""The Winograd F(2x2, 3x3) convolution (kiln/backends/cpu/winograd.py) against float64 torch: sizes with odd and
even edges, padding of every kind, bias, residual (also summed in place), clamps, slices of a wider buffer, and the
layers it refuses; in fp32 and bf16."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.backends.cpu import native, winograd

needs_native = pytest.mark.skipif(not native.available()[0], reason=f"native kernels unavailable: {native.available()[1]}")
rng = np.random.default_rng(0)

# (batch, in, out, height, width, pads [top, left, bottom, right])
SHAPES = [(1, 16, 16, 8, 8, (1, 1, 1, 1)), (2, 32, 48, 7, 9, (1, 1, 1, 1)), (1, 16, 64, 5, 5, (0, 0, 0, 0)),
          (1, 48, 16, 11, 6, (0, 1, 2, 1)), (3, 64, 32, 3, 4, (2, 2, 2, 2)), (1, 16, 32, 1, 1, (1, 1, 1, 1)),
          (1, 512, 16, 7, 7, (1, 1, 1, 1))]


def case(shape):
    n, cin, cout, h, w, pads = shape
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(2))
    weight = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    return x, weight, rng.standard_normal(cout).astype(np.float32)


def float64_conv(x, weight, bias, pads):
    top, left, bottom, right = pads
    padded = F.pad(x.double(), (left, right, top, bottom))
    return F.conv2d(padded, torch.from_numpy(weight).double(), torch.from_numpy(bias).double())


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s[:5])) + "-p" + "".join(map(str, s[5])))
@pytest.mark.parametrize("fused", ["none", "relu+residual", "clip", "residual in place"])
def test_winograd_matches_float64(shape, fused):
    x, weight, bias = case(shape)
    clamp = {"none": (-np.inf, np.inf), "clip": (-0.5, 0.75)}.get(fused, (0.0, np.inf))
    conv = winograd.WinogradConvolution(weight, bias, shape[5], clamp)
    sums = float64_conv(x, weight, bias, shape[5])
    residual = torch.randn(sums.shape).contiguous(memory_format=torch.channels_last) if "residual" in fused else None
    expected = (sums + (residual.double() if residual is not None else 0)).clamp(*clamp)
    given = residual.clone(memory_format=torch.channels_last) if residual is not None else None
    actual = conv(x, given, in_place=fused == "residual in place")
    assert actual.shape == expected.shape == conv.output_shape(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    if given is not None:
        assert (actual.data_ptr() == given.data_ptr()) == (fused == "residual in place")
    # the transforms' additions and fp32 sums in another order than float64's: 1e-5 of the sums' scale
    scale = sums.abs().max().item() + (residual.abs().max().item() if residual is not None else 0)
    assert (actual.double() - expected).abs().max().item() <= 1e-5 * scale


@needs_native
def test_winograd_writes_into_a_slice_of_a_wider_buffer():
    x, weight, bias = case((2, 16, 32, 6, 7, (1, 1, 1, 1)))
    conv = winograd.WinogradConvolution(weight, bias, [1, 1, 1, 1], (0.0, np.inf))
    buffer = torch.full((2, 64, 6, 7), -7.0).contiguous(memory_format=torch.channels_last)
    y = conv(x, out=buffer[:, 16:48])
    assert y.data_ptr() == buffer[:, 16:48].data_ptr()
    expected = F.relu(float64_conv(x, weight, bias, (1, 1, 1, 1)))
    assert (buffer[:, 16:48].double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (buffer[:, :16] == -7).all() and (buffer[:, 48:] == -7).all()


@needs_native
def test_an_empty_output_and_a_wrong_input():
    x, weight, bias = case((1, 16, 16, 2, 2, (0, 0, 0, 0)))
    conv = winograd.WinogradConvolution(weight, bias, [0, 0, 0, 0], (-np.inf, np.inf))
    assert conv(x).shape == (1, 16, 0, 0)
    with pytest.raises(ValueError, match="expected 16 float channels"):
        conv(torch.ones(1, 8, 5, 5))
    with pytest.raises(ValueError, match="residual"):
        conv(torch.ones(1, 16, 5, 5), torch.ones(1, 16, 5, 5))


needs_bf16 = pytest.mark.skipif(not native.available()[0] or not native.bf16_available(),
                                reason="no AVX512-BF16 kernels in the native library here")


@needs_bf16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s[:5])) + "-p" + "".join(map(str, s[5])))
@pytest.mark.parametrize("fused", ["relu", "residual in place"])
def test_bf16_winograd_is_within_bf16_rounding(shape, fused):
    """bf16 activations, the transformed patches and weights rounded to bf16, fp32 sums: per layer about 1.5x the
    relative error of oneDNN's bf16 direct convolution (3.0-3.3e-3 against 2.0e-3 on ResNet-50's 3x3s)."""
    x, weight, bias = case(shape)
    x = x.to(torch.bfloat16)
    conv = winograd.WinogradConvolution(weight, bias, shape[5], (0.0, np.inf), torch.bfloat16)
    sums = float64_conv(x, weight, bias, shape[5])
    residual = torch.randn(sums.shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last) \
        if "residual" in fused else None
    expected = (sums + (residual.double() if residual is not None else 0)).clamp(min=0)
    given = residual.clone(memory_format=torch.channels_last) if residual is not None else None
    actual = conv(x, given, in_place=given is not None)
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    if given is not None:
        assert actual.data_ptr() == given.data_ptr()
    if expected.numel():
        assert ((actual.double() - expected).norm() / expected.norm()).item() < 8e-3
        scale = sums.abs().max().item() + (residual.abs().max().item() if residual is not None else 0)
        assert (actual.double() - expected).abs().max().item() <= 3e-2 * scale


@needs_bf16
def test_bf16_winograd_writes_into_a_slice_of_a_wider_buffer():
    x, weight, bias = case((2, 16, 32, 6, 7, (1, 1, 1, 1)))
    conv = winograd.WinogradConvolution(weight, bias, [1, 1, 1, 1], (0.0, np.inf), torch.bfloat16)
    buffer = torch.full((2, 64, 6, 7), -7.0, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv(x, out=buffer[:, 16:48])
    expected = F.relu(float64_conv(x.to(torch.bfloat16), weight, bias, (1, 1, 1, 1)))
    assert ((buffer[:, 16:48].double() - expected).norm() / expected.norm()).item() < 8e-3
    assert (buffer[:, :16] == -7).all() and (buffer[:, 48:] == -7).all()


def test_which_layers_it_takes():
    assert winograd.takes((32, 16, 3, 3), [1, 1], [1, 1], 1)
    for shape, strides, dilations, groups in [((32, 16, 3, 3), [2, 2], [1, 1], 1), ((32, 16, 3, 3), [1, 1], [2, 2], 1),
                                              ((32, 16, 3, 3), [1, 1], [1, 1], 2), ((32, 16, 1, 1), [1, 1], [1, 1], 1),
                                              ((32, 24, 3, 3), [1, 1], [1, 1], 1), ((20, 16, 3, 3), [1, 1], [1, 1], 1),
                                              ((32, 16, 5, 5), [1, 1], [1, 1], 1)]:
        assert not winograd.takes(shape, strides, dilations, groups)


def test_the_weight_transform_is_g_g_gt():
    weight = rng.standard_normal((16, 2, 3, 3))
    u = winograd.transformed_weights(weight)  # [16][out/16][in][16]
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    for out, inp in [(0, 0), (5, 1), (15, 1)]:
        expected = g @ weight[out, inp] @ g.T
        np.testing.assert_allclose(u[:, 0, inp, out].reshape(4, 4), expected, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_bf16)], ids=["fp32", "bf16"])
def test_an_engine_keeps_its_winograd_layer_when_loaded(bf16, monkeypatch, tmp_path):
    """A fire module whose 3x3 expand (16 -> 32) won the race on the Winograd kernel: the engine matches onnxruntime,
    writes the concatenation in place, and a loaded engine runs the same tactic without timing again."""
    from backends.test_cpu_native import fire_module
    from helpers import run_onnxruntime

    import kiln
    from kiln.backends.cpu import select

    calls = []
    monkeypatch.setattr(select, "fastest", lambda programs, feed, layers: calls.append(layers) or
                        {name: select.NATIVE for name in layers})
    monkeypatch.setattr(select, "fastest_engine", lambda programs, feed: select.NATIVE)
    model, x = fire_module()
    engine = kiln.build(model, kiln.BuilderConfig(bf16=bf16))
    tactics = {name: layer["tactic"] for name, layer in engine.plan.layers.items()}
    assert "native-winograd" in tactics.values()
    assert next(t for name, t in tactics.items() if engine.plan.layers[name]["op"] == "Concat") == "native-in-place"
    expected = run_onnxruntime(model, {"x": x})["y"]
    engine.save(tmp_path / "fire.kiln")
    loaded = kiln.load(tmp_path / "fire.kiln")
    for runner in (engine, loaded, loaded):  # the loaded engine's recorded run, then its replay
        y = np.asarray(runner.run({"x": x})["y"], np.float64)
        assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < (1e-2 if bf16 else 1e-6)
    assert len(calls) == 1, "the loaded engine timed again"
    assert {name: info["tactic"] for name, info in loaded.program.layer_info.items()} == tactics
