"""Output-length prediction from a prompt's token ids: hashed n-grams and a linear model (numpy only).

The scheduler sees token ids, not text, so the model reads ids: every unigram, bigram and
trigram of the prompt is hashed into one of `dim` buckets (counts scaled by 1/sqrt(n-grams)),
beside one-hot bins of log2(prompt length) and a bias. A ridge regression on log(output
tokens) gives the prediction; `sigma` is the spread of its log error on held-out
conversations (what the predicted Gittins policy centres its distribution with). A model is
tied to its tokenizer: the ids mean nothing to another vocabulary.

Trained by bench/length_predictor.py; predicting costs one hashing pass and a gather over
the prompt's ids (tens of microseconds for a 1 000-token prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ORDERS = (1, 2, 3)
LENGTH_BINS = 12  # log2(prompt length) one-hots: 1, 2-3, 4-7, ... 2048+
MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)  # one odd constant per position of an n-gram
MAX_PREDICTION = 1 << 16


def features(ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse features of one prompt: (column indices, values); columns [dim, dim + LENGTH_BINS] are
    the length bins and the bias follows them."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    cols = []
    for order in ORDERS:
        if n < order:
            break
        h = np.full(n - order + 1, order, dtype=np.int64)
        for k in range(order):
            h = (h * 0x100000001B3) ^ (ids[k : n - order + 1 + k] * MULTIPLIERS[k])
        cols.append(h % dim)
    grams = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(grams, return_counts=True)
    values = counts / math.sqrt(max(len(grams), 1))
    length_bin = dim + min(int(math.log2(max(n, 1))), LENGTH_BINS - 1)
    bias = dim + LENGTH_BINS
    return (
        np.concatenate([uniq, [length_bin, bias]]).astype(np.int64),
        np.concatenate([values, [1.0, 1.0]]),
    )


def width(dim: int) -> int:
    """Columns of the model: hashed buckets, length bins, bias."""
    return dim + LENGTH_BINS + 1


@dataclass
class LengthPredictor:
    """A trained model: `weights` over `width(dim)` columns; predicts exp(x . w) tokens."""

    weights: np.ndarray
    dim: int
    sigma: float  # std of log(true / predicted) on held-out prompts
    tokenizer: str  # which ids it reads (bench/sharegpt.py's names)

    def log_predict(self, ids) -> float:
        cols, values = features(np.asarray(ids), self.dim)
        return float(values @ self.weights[cols])

    def predict(self, ids) -> int:
        """Predicted output tokens (at least 1)."""
        return max(1, min(MAX_PREDICTION, round(math.exp(self.log_predict(ids)))))

    def save(self, path: str) -> None:
        np.savez_compressed(
            path,
            weights=self.weights.astype(np.float16),
            dim=self.dim,
            sigma=self.sigma,
            tokenizer=self.tokenizer,
        )

    @classmethod
    def load(cls, path: str) -> LengthPredictor:
        with np.load(path) as f:
            return cls(
                weights=f["weights"].astype(np.float32),
                dim=int(f["dim"]),
                sigma=float(f["sigma"]),
                tokenizer=str(f["tokenizer"]),
            )
