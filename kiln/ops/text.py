"""Text operators over token ids: TfIdfVectorizer (n-gram counts with skips, TF / IDF / TFIDF weighting)."""
from __future__ import annotations

import torch

from .registry import register


def _pool(ngram_counts, pool, ngram_indexes):
    """{n-gram tuple: output column} from ONNX's flat pool, grouped by n-gram length."""
    columns, ordinal = {}, 0
    bounds = list(ngram_counts) + [len(pool)]
    for n in range(1, len(ngram_counts) + 1):
        start, end = bounds[n - 1], bounds[n]
        for at in range(start, end, n):
            columns[tuple(pool[at:at + n])] = ngram_indexes[ordinal]
            ordinal += 1
    return columns


@register("TfIdfVectorizer", since=9)
def tf_idf_vectorizer(x, *, max_gram_length, max_skip_count, min_gram_length, mode, ngram_counts, ngram_indexes,
                      pool_int64s=None, pool_strings=None, weights=None):
    pool = list(pool_int64s if pool_int64s is not None else pool_strings)
    columns = _pool(list(ngram_counts), pool, list(ngram_indexes))
    width = max(ngram_indexes) + 1
    rows = x.reshape(1, -1) if x.dim() == 1 else x
    counts = torch.zeros(rows.shape[0], width, dtype=torch.float32)
    for r, tokens in enumerate(rows.tolist()):
        for n in range(min_gram_length, max_gram_length + 1):
            for skip in range(0, (max_skip_count if n > 1 else 0) + 1):  # a unigram has no gaps to skip
                step = skip + 1
                for start in range(len(tokens) - (n - 1) * step):
                    gram = tuple(tokens[start + k * step] for k in range(n))
                    if gram in columns:
                        counts[r, columns[gram]] += 1
    scale = torch.tensor(list(weights), dtype=torch.float32) if weights is not None else torch.ones(width)
    if mode == "IDF":
        counts = (counts > 0).float() * scale
    elif mode == "TFIDF":
        counts = counts * scale
    return counts.reshape(width) if x.dim() == 1 else counts
