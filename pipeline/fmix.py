"""MurmurHash3's 64-bit finalizer ``fmix64``: the one mixing function of every key (docs/hashing.md).

Three forms of the same bijection on 64-bit values: :func:`fmix64_int` on Python ints (the
reference), :func:`fmix64` in place on numpy uint64 arrays, and :func:`fmix_nb` /
:func:`fmix_inv_nb` for numba-compiled loops (the inverse undoes the multiplications with their
modular inverses; ``x ^= x >> 33`` is its own inverse on 64 bits).
"""
from __future__ import annotations

import numpy as np
from numba import njit

MASK = (1 << 64) - 1
FMIX_C1 = 0xFF51AFD7ED558CCD
FMIX_C2 = 0xC4CEB9FE1A85EC53

_U = np.uint64
_S33 = np.uint64(33)
_C1 = np.uint64(FMIX_C1)
_C2 = np.uint64(FMIX_C2)
_C1_INV = np.uint64(pow(FMIX_C1, -1, 1 << 64))
_C2_INV = np.uint64(pow(FMIX_C2, -1, 1 << 64))


def fmix64_int(k: int) -> int:
    """``fmix64`` on a Python int."""
    k &= MASK
    k ^= k >> 33
    k = (k * FMIX_C1) & MASK
    k ^= k >> 33
    k = (k * FMIX_C2) & MASK
    k ^= k >> 33
    return k


def fmix64(a: np.ndarray) -> np.ndarray:
    """``fmix64`` in place on a uint64 array (wrapping arithmetic); returns ``a``."""
    tmp = np.empty_like(a)
    for mult in (FMIX_C1, FMIX_C2):
        np.right_shift(a, _U(33), out=tmp)
        a ^= tmp
        a *= _U(mult)
    np.right_shift(a, _U(33), out=tmp)
    a ^= tmp
    return a


@njit(inline="always")
def fmix_nb(k):
    """``fmix64`` of one uint64 inside a compiled loop."""
    k ^= k >> _S33
    k *= _C1
    k ^= k >> _S33
    k *= _C2
    k ^= k >> _S33
    return k


@njit(inline="always")
def fmix_inv_nb(k):
    """The inverse of :func:`fmix_nb`."""
    k ^= k >> _S33
    k *= _C2_INV
    k ^= k >> _S33
    k *= _C1_INV
    k ^= k >> _S33
    return k
