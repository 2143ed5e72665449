"""The pooling kernel, one for training and queries: an image's bag of rows with weights -> one vector.

``out[i] = sum_j w[j] * table[rows[j]]`` over image i's rows (CSR: rows, offsets, weights),
images split across threads, each output element computed by one thread in a fixed order, so
the result does not depend on the number of threads. Training's compiled step calls :func:`pool`;
queries and lessons call :func:`pool_bags` (numpy in, numpy out) and divide by :func:`divisor`
of the bag's :func:`bag_totals`, as the model's bag reduction does.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def pool(table, rows, offsets, w, out):
    n = offsets.size - 1
    d = table.shape[1]
    for i in prange(n):
        acc = np.zeros(d, np.float32)
        for j in range(offsets[i], offsets[i + 1]):
            r = rows[j]
            wj = w[j]
            for k in range(d):
                acc[k] += wj * table[r, k]
        for k in range(d):
            out[i, k] = acc[k]
    return out


def pool_bags(table: np.ndarray, rows: np.ndarray, offsets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[i] = sum_j weights[j] * table[rows[j]]`` over bag i's entries (N x d float32), a bag
    as :meth:`pipeline.table.vocab.Vocabulary.bags` gives it."""
    out = np.empty((len(offsets) - 1, table.shape[1]), np.float32)
    return pool(table, np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(offsets, np.int64),
                np.ascontiguousarray(weights, np.float32), out)


def bag_totals(weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per bag: the sum of its weights (how many patches the image has in the table)."""
    sizes = np.diff(offsets)
    return np.bincount(np.repeat(np.arange(len(sizes)), sizes), weights=weights, minlength=len(sizes)).astype(np.float32)


def divisor(totals: np.ndarray, bag: str) -> np.ndarray:
    """What a bag's sum is divided by (``bag``): its patch count (mean), its square root (sqrt), 1 (sum)."""
    if bag == "sum":
        return np.ones_like(totals)
    per = np.maximum(totals, 1.0)
    return np.sqrt(per) if bag == "sqrt" else per
