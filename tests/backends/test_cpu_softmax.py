"""Attention's scaled, masked softmax in one native pass (kiln/backends/cpu/softmax.py) against float64 torch: masks
that broadcast along every axis, rows off the 16-lane width, fp32 and bf16, and the rows torch makes NaN."""
import pytest
import torch

from kiln.backends.cpu import native, softmax

needs_native = pytest.mark.skipif(not native.available()[0], reason=f"native kernels unavailable: {native.available()[1]}")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not native.available()[0] or not native.bf16_available(), reason="no bf16 kernels here"))]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, mask_shape", [((2, 12, 16, 128), (2, 1, 1, 128)), ((1, 4, 16, 16), (1, 1, 16, 16)),
                                               ((2, 3, 5, 37), (3, 1, 37)), ((4, 20), None), ((2, 3, 5, 37), (1,)),
                                               ((3, 7, 33), (3, 7, 1)), ((2, 3, 4, 40), (2, 3, 4, 40))],
                         ids=lambda v: "x".join(map(str, v)) if v else "none")
def test_masked_softmax_matches_float64(dtype, shape, mask_shape):
    generator = torch.Generator().manual_seed(4)
    scores = (torch.randn(shape, generator=generator) * 3).to(dtype)
    mask = None if mask_shape is None else torch.where(torch.rand(mask_shape, generator=generator) > 0.2,
                                                      torch.randn(mask_shape, generator=generator), torch.tensor(-1e4))
    # the scaled, masked scores in fp32 as the kernel forms them (a row shifted by -1e4 keeps fp32's rounding there)
    logits = scores.float() * 0.3 + (mask if mask is not None else 0)
    expected = torch.softmax(logits.double(), -1)
    assert softmax.takes(scores, mask)
    actual = softmax.masked_softmax_(scores, mask, 0.3)
    assert actual.data_ptr() == scores.data_ptr() and actual.dtype == dtype
    # fp32: a few roundings of each probability; bf16: the scores' own rounding, then the output's (2^-9 relative)
    tolerance = 1e-6 if dtype == torch.float32 else 4e-3
    assert (actual.double() - expected).abs().max().item() < tolerance


@needs_native
def test_rows_torch_makes_nan_stay_nan():
    scores = torch.full((3, 20), -torch.inf)
    scores[0, 5] = 1.0
    scores[2] = torch.arange(20.0)
    scores[2, 7] = torch.nan
    actual = softmax.masked_softmax_(scores, None, 1.0)
    assert actual[0, 5] == 1.0 and (actual[0, :5] == 0).all()
    assert actual[1].isnan().all() and actual[2].isnan().all()  # every score masked; a NaN score


def test_what_it_takes():
    scores = torch.zeros(2, 3, 4, 8)
    if not native.available()[0]:
        assert not softmax.takes(scores, None)
        return
    assert softmax.takes(scores, torch.zeros(2, 1, 1, 8)) and softmax.takes(scores, None)
    assert not softmax.takes(scores, torch.zeros(2, 3, 4, 8, dtype=torch.bool))  # boolean: torch's masked fill
    assert not softmax.takes(scores, torch.zeros(5, 2, 3, 4, 8))  # a mask that widens the scores
    assert not softmax.takes(scores.transpose(-1, -2), None)  # not contiguous
    assert not softmax.takes(torch.zeros(2, 3, 4, 5, 8), None)  # rank 5
    assert not softmax.takes(scores.double(), None)


@needs_native
def test_a_scalar_mask_shifts_every_score():
    scores = torch.randn(2, 3, 20)
    expected = torch.softmax(scores.double() * 0.5 - 1.0, -1)
    actual = softmax.masked_softmax_(scores.clone(), torch.tensor(-1.0), 0.5)
    assert (actual.double() - expected).abs().max().item() < 1e-6
