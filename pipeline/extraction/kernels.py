"""Compiled inner loops (numba) of extraction: the keys of every patch.

* :func:`content_keys` turns quantized images into one position-free key per
  patch, in the canonical patch order: per image, one prefix-sum table of the
  pixels' pseudo-random values, then four look-ups, two multiplications and a
  64-bit finalizer per patch. The whole image's table (at most a few KiB for
  CIFAR) stays in the L1 cache, which is what numpy's whole-array passes could
  not do (docs/extract.md).
* :func:`expand_keys` derives the position keys of :mod:`pipeline.extraction.hashing`
  from the stored content keys (``fmix64`` is a bijection, so its inverse
  recovers the content hash and the grid cell's tag can be mixed in).

All arithmetic is on uint64 and wraps modulo 2**64, exactly as in the
pure-Python reference :func:`pipeline.extraction.hashing.reference_key`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from pipeline.fmix import fmix_inv_nb as _fmix_inv
from pipeline.fmix import fmix_nb as _fmix

_U = np.uint64


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
