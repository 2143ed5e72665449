"""The pooling kernel, one for training and queries: an image's bag of rows with weights -> one vector.

``out[i] = sum_j w[j] * table[rows[j]]`` over image i's rows (CSR: rows, offsets, weights),
images split across threads, each output element computed by one thread in a fixed order, so
the result does not depend on the number of threads.
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
