"""A BERT-style encoder built from real torch layers, exported with torch.onnx.export, run by kiln against onnxruntime."""
import numpy as np
import pytest
import torch
from helpers import assert_close, run_onnxruntime

import kiln


class EncoderLayer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.ff1 = torch.nn.Linear(hidden, 4 * hidden)
        self.ff2 = torch.nn.Linear(4 * hidden, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden)

    def forward(self, x, additive_mask):
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=-1)
        split = lambda t: t.reshape(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / (hidden // self.heads) ** 0.5 + additive_mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class TinyBert(torch.nn.Module):
    def __init__(self, vocab=100, hidden=64, heads=4, layers=2, max_len=32):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, hidden)
        self.positions = torch.nn.Embedding(max_len, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.layers = torch.nn.ModuleList(EncoderLayer(hidden, heads) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive)
        return x


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory):
    torch.manual_seed(0)
    module = TinyBert().eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 12:] = 0
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamo=True, verbose=False)
    return path, module


def test_bert_encoder_matches_onnxruntime(bert_model):
    path, _ = bert_model
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    feed["attention_mask"][0, 10:] = 0
    expected = run_onnxruntime(str(path), feed)["hidden"]
    engine = kiln.build(str(path))
    actual = engine.run(feed)["hidden"]
    assert_close(actual, expected, rtol=1e-3, atol=1e-5, what="encoder output")


def test_bert_encoder_survives_save_and_load(bert_model, tmp_path):
    path, module = bert_model
    kiln.build(str(path)).save(tmp_path / "bert.kiln")
    engine = kiln.load(tmp_path / "bert.kiln")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 16, dtype=torch.int64)
    result = engine.run({"input_ids": ids, "attention_mask": mask})["hidden"]
    assert isinstance(result, torch.Tensor), "torch inputs give torch outputs"
    with torch.no_grad():
        expected = module(ids, mask)
    assert_close(result.numpy(), expected.numpy(), rtol=1e-3, atol=1e-5, what="against torch itself")
