"""Compiled (numba) key -> value tables: key counts while the vocabulary is built, then key -> table row.

One open-addressing table (linear probing) of ``slots``, a (size, 2) uint64 array:
``slots[i, 0]`` = key, ``slots[i, 1]`` = value + 1 (0 = empty slot). Key and value sit side
by side so that a look-up touches one cache line, not one per array. Keys are uniform
64-bit hashes, so their low bits are the bucket. A counting table stores the count itself
(a counted key has count >= 1, so it is never 0).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _probe(slots, key):
    """Slot of ``key``: where it is, or the empty slot it would take."""
    mask = slots.shape[0] - 1
    i = np.int64(key & np.uint64(mask))
    while slots[i, 1] != 0 and slots[i, 0] != key:
        i = (i + 1) & mask
    return i


@njit(inline="always")
def _row(slots, n_vocab, buckets, key):
    """Row of one key: its own row if in the vocabulary, else ``n_vocab + key % buckets``, else -1."""
    i = _probe(slots, key)
    v = slots[i, 1]
    if v != 0:
        return np.int64(v) - 1
    if buckets > 0:
        return n_vocab + np.int64(key % np.uint64(buckets))
    return np.int64(-1)


@njit(cache=True, nogil=True)
def count_keys(keys, slots, part_mask, part):
    """Add the keys of ``keys`` (any shape, uint64) with ``key & part_mask == part`` to a counting
    table (``part_mask = 0``: every key); returns how many keys were new.

    The caller keeps the table at most half full.
    """
    flat = keys.ravel()
    new = 0
    for j in range(flat.shape[0]):
        k = flat[j]
        if (k & part_mask) != part:
            continue
        i = _probe(slots, k)
        if slots[i, 1] == 0:
            slots[i, 0] = k
            new += 1
        slots[i, 1] += np.uint64(1)
    return new


@njit(cache=True)
def add_counts(keys, counts, slots):
    """Add ``counts[i]`` (>= 1) occurrences of ``keys[i]`` to a counting table (used when it grows)."""
    for j in range(keys.shape[0]):
        i = _probe(slots, keys[j])
        slots[i, 0] = keys[j]
        slots[i, 1] += np.uint64(counts[j])


@njit(cache=True)
def fill_table(keys, rows, slots):
    """Insert ``keys[i] -> rows[i]`` into an empty table."""
    for j in range(keys.shape[0]):
        i = _probe(slots, keys[j])
        slots[i, 0] = keys[j]
        slots[i, 1] = np.uint64(rows[j] + 1)


@njit(cache=True, nogil=True)
def lookup_rows(keys, slots, n_vocab, buckets, out):
    """Row of every key: its own row if in the vocabulary, else ``n_vocab + key % buckets``, else -1."""
    flat = keys.ravel()
    o = out.ravel()
    for j in range(flat.shape[0]):
        o[j] = _row(slots, n_vocab, buckets, flat[j])
    return out


@njit(cache=True, nogil=True)
def bag_rows(keys, weights, slots, n_vocab, buckets, local, stamp, where):
    """Each image's keys (N x K) as a bag of distinct rows with counts, in CSR form.

    ``weights`` (N x K, or 0 x 0 for all ones) is what each key adds to its row's count.

    Returns (rows, offsets N+1, counts); keys with no row (-1) are left out. Each image's
    keys are first counted in ``local``, a small table (at least 2K slots, all zero on
    entry and exit) that stays in cache, so the vocabulary's large table is probed once
    per distinct key rather than once per patch. With ``buckets`` two keys can share a
    row; ``stamp`` (all -1 on entry and exit) and ``where``, of the table's row count,
    merge them.
    """
    n, k = keys.shape
    rows = np.empty(n * k, np.int64)
    counts = np.empty(n * k, np.float32)
    offsets = np.zeros(n + 1, np.int64)
    dkeys = np.empty(k, np.uint64)
    dslot = np.empty(k, np.int64)
    dcount = np.zeros(k, np.float32)
    weighted = weights.shape[0] > 0
    m = 0
    for a in range(n):
        nd = 0
        for j in range(k):
            key = keys[a, j]
            wj = weights[a, j] if weighted else np.float32(1.0)
            i = _probe(local, key)
            if local[i, 1] == 0:
                local[i, 0] = key
                local[i, 1] = np.uint64(nd + 1)
                dkeys[nd] = key
                dslot[nd] = i
                dcount[nd] = wj
                nd += 1
            else:
                dcount[np.int64(local[i, 1]) - 1] += wj
        start = m
        for d in range(nd):
            local[dslot[d], 1] = 0
            r = _row(slots, n_vocab, buckets, dkeys[d])
            if r < 0:
                continue
            if buckets > 0 and stamp[r] == a:
                counts[where[r]] += dcount[d]
                continue
            if buckets > 0:
                stamp[r] = a
                where[r] = m
            rows[m] = r
            counts[m] = dcount[d]
            m += 1
        offsets[a + 1] = m
        if buckets > 0:
            for q in range(start, m):
                stamp[rows[q]] = -1
    return rows[:m].copy(), offsets, counts[:m].copy()


@njit(cache=True, nogil=True)
def pattern_stats(keys, labels, image_ids, slots, class_counts, first_image, first_slot, variant_stride):
    """Per vocabulary row: occurrences per class, and the first (image, slot) where it occurs: in an
    original image where it occurs in one, else in an augmented copy (``image_ids >= variant_stride``),
    so the slot, and with it the shape, view and cell, is always one where the key really occurs."""
    n, k = keys.shape
    for a in range(n):
        lab = labels[a]
        original = image_ids[a] < variant_stride
        for j in range(k):
            v = slots[_probe(slots, keys[a, j]), 1]
            if v == 0:
                continue
            r = np.int64(v) - 1
            if lab >= 0:
                class_counts[r, lab] += 1
            if first_image[r] < 0 or (original and first_image[r] >= variant_stride):
                first_image[r] = image_ids[a]
                first_slot[r] = j
