"""Compiled inner loops (numba) for the two per-patch computations of the pipeline.

* :func:`content_keys` turns quantized images into one position-free key per
  patch, in the canonical patch order: per image, one prefix-sum table of the
  pixels' pseudo-random values, then four look-ups, two multiplications and a
  64-bit finalizer per patch. The whole image's table (at most a few KiB for
  CIFAR) stays in the L1 cache, which is what numpy's whole-array passes could
  not do: see docs/extract.md for the measurement that chose numba.
* :func:`expand_keys` derives the position keys of :mod:`pipeline.hashing`
  from the stored content keys (``fmix64`` is a bijection, so its inverse
  recovers the content hash and the grid cell's tag can be mixed in).

All arithmetic is on uint64 and wraps modulo 2**64, exactly as in the
pure-Python reference :func:`pipeline.hashing.reference_key`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_U = np.uint64
_S33 = np.uint64(33)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_C1_INV = np.uint64(pow(0xFF51AFD7ED558CCD, -1, 1 << 64))
_C2_INV = np.uint64(pow(0xC4CEB9FE1A85EC53, -1, 1 << 64))


@njit(inline="always")
def _fmix(k):
    k ^= k >> _S33
    k *= _C1
    k ^= k >> _S33
    k *= _C2
    k ^= k >> _S33
    return k


@njit(inline="always")
def _fmix_inv(k):
    # x ^= x >> 33 is its own inverse on 64 bits; the multiplications undo with modular inverses
    k ^= k >> _S33
    k *= _C2_INV
    k ^= k >> _S33
    k *= _C1_INV
    k ^= k >> _S33
    return k


@njit(cache=True, nogil=True)
def content_keys(syms, pixel_salt, pow_a, pow_b, inv_a, inv_b, shape_h, shape_w, offsets, tag_mix, stride, out):
    """Fill ``out`` (N x patches) with the position-free key of every patch of every image.

    ``syms`` is N x H x W uint64; ``shape_h/shape_w/offsets/tag_mix`` describe each shape
    (its first column in ``out`` and ``fmix64(tag + salt)`` of its position-free tag).
    """
    n_img, height, width = syms.shape
    table = np.zeros((height + 1, width + 1), dtype=np.uint64)
    for n in range(n_img):
        for i in range(height):
            row = _U(0)
            pa = pow_a[i]
            for j in range(width):
                row += _fmix(syms[n, i, j] + pixel_salt) * pa * pow_b[j]
                table[i + 1, j + 1] = table[i, j + 1] + row
        for s in range(shape_h.shape[0]):
            h = shape_h[s]
            w = shape_w[s]
            ny = (height - h) // stride + 1
            nx = (width - w) // stride + 1
            mix = tag_mix[s]
            o = offsets[s]
            for iy in range(ny):
                y = iy * stride
                top = table[y]
                bottom = table[y + h]
                ia = inv_a[y]
                for ix in range(nx):
                    x = ix * stride
                    c = bottom[x + w] - top[x + w] - bottom[x] + top[x]
                    c *= ia * inv_b[x]
                    out[n, o + iy * nx + ix] = _fmix(c ^ mix)
    return out


@njit(cache=True, nogil=True)
def expand_keys(content, source, delta, out):
    """Fill ``out`` (N x keys) from ``content`` (N x patches): key slot s takes patch ``source[s]``.

    ``delta[s] == 0`` copies the content key (position-free slot); otherwise the key is
    ``fmix64(fmix64_inv(content) ^ delta[s])`` with ``delta = mix(no cell) ^ mix(cell)``.
    """
    for n in range(content.shape[0]):
        for s in range(source.shape[0]):
            k = content[n, source[s]]
            d = delta[s]
            if d != 0:
                k = _fmix(_fmix_inv(k) ^ d)
            out[n, s] = k
    return out


# ------------------------------------------------------------------ key -> value tables (counts, vocabulary rows)
#
# One open-addressing table (linear probing) of ``slots``, a (size, 2) uint64 array:
# slots[i, 0] = key, slots[i, 1] = value + 1 (0 = empty slot). Key and value share a
# cache line, so a look-up costs one cache miss, not one per array (measured: the
# bag-building pass over CIFAR shards 2.1x faster than with separate key, used and
# row arrays). Keys are uniform 64-bit hashes, so their low bits are the bucket.
# Counting tables store count + 1 - 1 = the count itself (a counted key has count >= 1).

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
    """Per vocabulary row: occurrences per class, and the first (image, slot) where it occurs."""
    n, k = keys.shape
    for a in range(n):
        lab = labels[a]
        for j in range(k):
            v = slots[_probe(slots, keys[a, j]), 1]
            if v == 0:
                continue
            r = np.int64(v) - 1
            if lab >= 0:
                class_counts[r, lab] += 1
            if first_image[r] < 0 and image_ids[a] < variant_stride:  # examples from original images only
                first_image[r] = image_ids[a]
                first_slot[r] = j
