"""bf16 attention in one native pass a head (kiln/backends/cpu/attention.py) against float64 torch: heads as strided
views of one projection (as a BERT-like encoder splits them), masks that broadcast, rows that torch makes NaN, the
shapes it refuses, and an encoder built in bf16 that runs it."""
import numpy as np
import pytest
import torch

from kiln.backends.cpu import attention, native

needs_kernel = pytest.mark.skipif(not native.available()[0] or not native.bf16_available(),
                                  reason="no native bf16 kernels here")


def heads(batch, seq, heads_, size, generator):
    """q, k, v as views of one [batch, seq, 3 * heads * size] projection, [batch, heads, seq, size] each."""
    width = heads_ * size
    qkv = torch.randn(batch, seq, 3 * width, generator=generator).to(torch.bfloat16)
    return [qkv[..., i * width:(i + 1) * width].view(batch, seq, heads_, size).transpose(1, 2) for i in range(3)]


def float64_attention(q, k, v, mask, scale):
    scores = q.double() @ k.double().transpose(-1, -2) * scale + (mask.double() if mask is not None else 0)
    return torch.softmax(scores, -1) @ v.double()


@needs_kernel
@pytest.mark.parametrize("batch, seq, heads_, size, mask_shape", [
    (1, 128, 12, 64, (1, 1, 1, 128)), (2, 32, 4, 16, (2, 1, 32, 32)), (2, 48, 3, 32, (48,)), (3, 16, 2, 64, None),
    (2, 48, 2, 16, (2, 2, 48, 1)), (1, 64, 2, 48, (1, 1, 64, 64))],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_native_attention_matches_float64(batch, seq, heads_, size, mask_shape):
    generator = torch.Generator().manual_seed(7)
    q, k, v = heads(batch, seq, heads_, size, generator)
    mask = None
    if mask_shape is not None:
        keep = torch.rand(mask_shape, generator=generator) > 0.2
        if mask_shape[-1] != 1:
            keep[..., 0] = True  # no row fully masked
        mask = torch.where(keep, torch.randn(mask_shape, generator=generator), torch.tensor(-1e4))
    assert attention.takes(q, k, v, mask)
    actual = attention.attention(q, k, v, mask, 0.3)
    expected = float64_attention(q, k, v, mask, 0.3)
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape and actual.is_contiguous()
    # bf16 inputs as given; the probabilities and the output rounded to bf16 once each, the scores kept in fp32
    assert ((actual.double() - expected).norm() / expected.norm()).item() < 5e-3


@needs_kernel
def test_a_row_with_every_key_masked_is_nan_as_in_torch():
    generator = torch.Generator().manual_seed(8)
    q, k, v = heads(1, 16, 1, 16, generator)
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 3] = -torch.inf
    actual = attention.attention(q, k, v, mask, 1.0)
    assert actual[0, 0, 3].isnan().all() and not actual[0, 0, [0, 1, 2, 4]].isnan().any()


@needs_kernel
def test_what_it_takes():
    generator = torch.Generator().manual_seed(9)
    q, k, v = heads(2, 32, 2, 16, generator)
    assert attention.takes(q, k, v, None) and attention.takes(q, k, v, torch.zeros(2, 1, 1, 32))
    assert not attention.takes(q.float(), k.float(), v.float(), None)  # fp32: the products and softmax.py
    assert not attention.takes(q, k, v, torch.zeros(2, 1, 1, 32, dtype=torch.bool))
    assert not attention.takes(q, k, v, torch.zeros(3, 2, 2, 32, 32))  # a mask that widens the scores
    q20, k20, v20 = heads(2, 20, 2, 16, generator)
    assert not attention.takes(q20, k20, v20, None)  # keys not a multiple of 16
    q8, k8, v8 = heads(2, 32, 2, 8, generator)
    assert not attention.takes(q8, k8, v8, None)  # head size not a multiple of 16


@needs_kernel
def test_a_bf16_encoder_runs_it_and_matches_onnxruntime(tmp_path):
    import kiln
    from models.test_bert_encoder import TinyBert

    torch.manual_seed(0)
    module = TinyBert(vocab=100, hidden=64, heads=4, layers=2, max_len=32).eval()
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 32, dtype=torch.int64)
    mask[0, 20:] = 0
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=True, verbose=False)
    engine = kiln.build(str(path), kiln.BuilderConfig(bf16=True))
    assert {layer["tactic"] for layer in engine.plan.layers.values() if layer["op"] == "kiln::Attention"} == \
        {"native-attention"}
    from helpers import run_onnxruntime
    import onnx

    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    expected = run_onnxruntime(onnx.load(str(path)), feed)["hidden"]
    actual = np.asarray(engine.run(feed)["hidden"], np.float64)
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-2
