"""Pooled image vectors and the head, in numpy: what a query computes, without torch.

A bag is CSR (rows, offsets, weights) as :meth:`pipeline.table.vocab.Vocabulary.bags`
gives it; pooling is the training step's own compiled kernel
(:func:`pipeline.table.pooling.pool`), and the head's layers are the run's
weights (``model.safetensors``), so a query needs neither torch nor its import time.
"""
from __future__ import annotations

import numpy as np

from pipeline.table import pooling as table_pooling


def pool(table: np.ndarray, rows: np.ndarray, offsets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[i] = sum_j weights[j] * table[rows[j]]`` over bag i's entries (N x d float32)."""
    out = np.empty((len(offsets) - 1, table.shape[1]), np.float32)
    return table_pooling.pool(table, np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(offsets, np.int64),
                              np.ascontiguousarray(weights, np.float32), out)


def bag_totals(weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per bag: the sum of its weights (how many patches the image has in the table)."""
    sizes = np.diff(offsets)
    return np.bincount(np.repeat(np.arange(len(sizes)), sizes), weights=weights, minlength=len(sizes)).astype(np.float32)


def divisor(totals: np.ndarray, bag: str) -> np.ndarray:
    """What a bag's sum is divided by (``--bag``): its patch count (mean), its square root (sqrt), 1 (sum)."""
    if bag == "sum":
        return np.ones_like(totals)
    per = np.maximum(totals, 1.0)
    return np.sqrt(per) if bag == "sqrt" else per


def head(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Logits of pooled vectors through the head's linear layers (weight, bias), ReLU between them."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def class_direction(layers: list[tuple[np.ndarray, np.ndarray]], c: int) -> np.ndarray:
    """How much a unit of pooled vector along each dimension adds to class ``c``'s logit: the head's
    row for a linear head; for one hidden ReLU layer its gradient at the zero vector
    (``W2[c] * [b1 > 0] @ W1``)."""
    if len(layers) == 1:
        return np.asarray(layers[0][0][c], np.float32)
    (w1, b1), (w2, _) = layers
    return ((w2[c] * (b1 > 0)) @ w1).astype(np.float32)
