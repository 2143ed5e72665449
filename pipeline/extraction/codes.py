"""The code view: patches assigned to their nearest atoms of a learned dictionary, with a weight each.

For every code shape (h x w) a patch of ``h*w*C`` pixel values ``p`` (0..255) is

1. scaled: ``n = p / 255`` (``--code-norm none``, pixels on [0, 1]) or normalised for brightness
   and contrast: ``n = (p - mean(p)) / sqrt(var(p) + CONTRAST)`` (``--code-norm contrast``);
2. whitened: ``z = (n - mu) @ W`` with ``W`` the ZCA matrix ``V diag(1 / sqrt(lambda + eps)) V^T``
   of the scaled patches' covariance (``eps`` = ``--whiten``; 0 turns whitening off);
3. compared with the shape's K atoms ``c_j`` (FAISS k-means on whitened sample patches):
   ``d_j = ||z - c_j||``. The patch keeps its ``k`` nearest atoms, nearest first, with weight
   ``max(0, mean_j d_j - d_a)`` (``triangle``, the soft code of Coates, Lee & Ng 2011, kept
   to the k nearest) or 1 (``hard``).

A :class:`Dictionary` holds the scaling and, per shape, ``mu``, ``W`` and the atoms; it is saved as a plain
``.npz`` (no pickle) whose SHA-256 is recorded in the extract config, so shards, runs and
queries coded with another dictionary are refused. The distances are one matrix product
per block of patches (BLAS through numpy); choosing the k nearest is a compiled loop.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from numba import njit, prange
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import ThreadpoolController

from pipeline import layout
from pipeline.config import CODE_NORMS as NORMS  # how a patch is scaled before whitening (the module's first step)
from pipeline.config import is_large_code
from pipeline.errors import ParameterError, PipelineError

MAX_ATOMS = 65535  # atoms per shape: a code holds an atom id in 16 bits
MAX_DICTIONARY_BYTES = 1 << 32  # a dictionary file larger than this is not one

CONTRAST = 10.0  # added to each patch's variance (pixel values 0..255) before dividing by its square root
BLOCK_DISTANCES = 1 << 21  # distances per matrix product (8 MiB): one worker's block per core stays in the shared cache until read back


def block_rows(atoms: int) -> int:
    """Patches per matrix product with ``atoms`` atoms: :data:`BLOCK_DISTANCES` distances, at least one patch."""
    return max(1, BLOCK_DISTANCES // atoms)

FIT_PATCHES_PER_IMAGE = 20  # the fit's sample takes about this many patches from each image it reads
FIT_MIN_IMAGES = 1000  # ... from at least this many images (all, when the source has fewer)
DICTIONARY_FORMAT = "patchhash-dictionary-v1"


def brightness_contrast(patch: np.ndarray) -> tuple[float, float]:
    """A patch's brightness and contrast as ``contrast`` scaling measures them: the mean and the
    standard deviation of its pixel values (0..255, every channel)."""
    p = np.asarray(patch, np.float64)
    return float(p.mean()), float(p.std())


def auto_shapes(height: int, width: int) -> list[tuple[int, int, int]]:
    """The code view's shapes (h, w, scale) for ``--code-shapes auto``: one square of side
    ``s = min(6, min(height, width) // 2)`` (4x4 on 8x8 images, 6x6 from 12x12 up), and the same
    square on the image averaged over 2 x 2 blocks (``6x6/2``, covering 12 x 12 pixels) where that
    half-size image is at least two squares wide (from 24 x 24 up): patterns twice as large, at a
    sixth of the cost. None for images smaller than 4 pixels on a side."""
    side = min(height, width)
    if side < 4:
        return []
    s = min(6, side // 2)
    return [(s, s, 1)] + ([(s, s, 2)] if side // 2 >= 2 * s else [])


def binned(images: np.ndarray, scale: int) -> np.ndarray:
    """N x H x W x C images averaged over ``scale`` x ``scale`` pixel blocks: N x H//scale x
    W//scale x C float32 (the blocks start at the top left; a remainder of rows or columns is left
    out). The block sums are exact integers, each divided once, so the values do not depend on how
    the work is split. ``scale`` 1 returns the images as they are."""
    if scale == 1:
        return images
    n, height, width, c = images.shape
    hb, wb = height // scale, width // scale
    blocks = images[:, : hb * scale, : wb * scale].reshape(n, hb, scale, wb, scale, c)
    return blocks.sum((2, 4), dtype=np.int64).astype(np.float32) / np.float32(scale * scale)


def auto_atoms(shapes: list[tuple[int, int, int]], channels: int) -> int:
    """The dictionary size for ``--atoms auto``: 4096 atoms on a large code
    (:func:`~pipeline.config.is_large_code`: a shape of more than 64 values, 6x6 on RGB images),
    else 1024 (4x4 or 6x6 on gray ones). A patch of more values spreads over more directions, and
    more atoms cover them; the patch papers' dictionaries for 6x6 RGB patches hold 1,600 to 4,000
    atoms and more."""
    return 4096 if is_large_code(shapes, channels) else 1024


def patch_matrix(images: np.ndarray, h: int, w: int, stride: int) -> tuple[np.ndarray, int, int]:
    """Every h x w patch of N x H x W x C uint8 images as float32 rows (N * ny * nx x h*w*C, row-major HWC),
    locations in row-major order with steps of ``stride``; returns (patches, ny, nx)."""
    view = sliding_window_view(images, (h, w), axis=(1, 2))[:, ::stride, ::stride]  # N x ny x nx x C x h x w
    n, ny, nx = view.shape[:3]
    return np.ascontiguousarray(view.transpose(0, 1, 2, 4, 5, 3), dtype=np.float32).reshape(n * ny * nx, -1), ny, nx


def normalise(patches: np.ndarray, norm: str = "contrast") -> np.ndarray:
    """Each row of 0..255 pixel values scaled to [0, 1] (``none``) or normalised for brightness and
    contrast (``contrast``), in place; returns it."""
    if norm == "none":
        patches *= np.float32(1 / 255)
        return patches
    patches -= patches.mean(1, keepdims=True)
    patches /= np.sqrt(patches.var(1, keepdims=True) + CONTRAST)
    return patches


def zca(sample: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, ZCA matrix) of normalised sample rows; ``eps`` regularises the eigenvalues, 0 = identity."""
    mu = sample.mean(0)
    if eps == 0:
        return mu.astype(np.float32), np.eye(sample.shape[1], dtype=np.float32)
    cov = np.cov(sample - mu, rowvar=False).astype(np.float64)
    lam, vec = np.linalg.eigh(cov)
    w = (vec / np.sqrt(np.maximum(lam, 0) + eps)) @ vec.T
    return mu.astype(np.float32), w.astype(np.float32)


@njit(cache=True, nogil=True)
def _ordered_sum(x):
    """The sum of a float32 vector in one fixed order (eight running sums, then combined):
    with reassociation allowed the compiler's order would follow the array's address
    alignment, so the same patch could get weights an ulp apart in two processes."""
    acc = np.zeros(8, np.float32)
    n8 = x.size - x.size % 8
    for j in range(0, n8, 8):
        for q in range(8):
            acc[q] += x[j + q]
    for j in range(n8, x.size):
        acc[0] += x[j]
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


CHUNK = 16  # atoms per group: a group whose smallest distance is past the bound below is never scanned
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # no nnan/ninf: inf marks empty places

# The K distances of a patch are read as a CHUNK x G matrix (G = K // CHUNK groups, row-major):
# group q holds atoms q, q + G, ..., q + (CHUNK - 1) G, and atoms from CHUNK * G on are in no
# group. Every per-group quantity is then a column-wise operation over whole rows, which the
# compiler turns into vector instructions.


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _distances(zc_row, zr, c2, dist, lows, groups, two):
    """A patch's distance to every atom, ``sqrt(max(0, |z|^2 + |c|^2 - two z.c))``, into ``dist``, and
    each group's smallest distance into ``lows[:groups]``; ``two`` is 2, or -2 for the distances
    of the patch's negative -z."""
    for q in range(groups):
        d = np.sqrt(max(zr + c2[q] - two * zc_row[q], np.float32(0.0)))
        dist[q] = d
        lows[q] = d
    for i in range(1, CHUNK):
        o = i * groups
        for q in range(groups):
            d = np.sqrt(max(zr + c2[o + q] - two * zc_row[o + q], np.float32(0.0)))
            dist[o + q] = d
            lows[q] = min(lows[q], d)
    for j in range(groups * CHUNK, dist.size):
        dist[j] = np.sqrt(max(zr + c2[j] - two * zc_row[j], np.float32(0.0)))


@njit(cache=True, nogil=True)
def _total(dist, groups, sums):
    """The sum of a patch's distances in one fixed order: each group's running sum (column by
    column of the matrix above, exact IEEE additions, so the order never depends on the
    thread count or the array's alignment), those sums by :func:`_ordered_sum`, then the
    atoms in no group."""
    sums[:groups] = 0
    for i in range(CHUNK):
        o = i * groups
        for q in range(groups):
            sums[q] += dist[o + q]
    s = _ordered_sum(sums[:groups])
    for j in range(groups * CHUNK, dist.size):
        s += dist[j]
    return s


@njit(cache=True, nogil=True)
def _nearest(dist, k, lows, groups, cand, best_d, best_i):
    """The k smallest of ``dist`` (nearest first, ties to the lower index) into ``best_d`` / ``best_i``.

    Each group's smallest distance is some atom's distance, so the k-th smallest of the groups'
    minima bounds the k-th smallest distance from above: only the groups whose minimum is within
    that bound are looked at, and only their distances within it (and those of atoms in no group)
    enter the ordered list, compared by (distance, index): the choice is exactly that of a scan of
    every distance."""
    n = dist.size
    bound = np.inf
    if groups >= k:
        best_d[:] = np.inf  # here: the k smallest group minima
        for q in range(groups):
            v = lows[q]
            if v < best_d[k - 1]:
                p = k - 1
                while p > 0 and best_d[p - 1] > v:
                    best_d[p] = best_d[p - 1]
                    p -= 1
                best_d[p] = v
        bound = best_d[k - 1]
    m = 0
    for q in range(groups):
        if lows[q] > bound:
            continue
        for i in range(CHUNK):
            j = i * groups + q
            cand[m] = j
            m += dist[j] <= bound
    for j in range(groups * CHUNK, n):
        cand[m] = j
        m += dist[j] <= bound
    best_d[:] = np.inf
    best_i[:] = n
    for t in range(m):
        j = cand[t]
        d = dist[j]
        if d < best_d[k - 1] or (d == best_d[k - 1] and j < best_i[k - 1]):
            p = k - 1
            while p > 0 and (best_d[p - 1] > d or (best_d[p - 1] == d and best_i[p - 1] > j)):
                best_d[p] = best_d[p - 1]
                best_i[p] = best_i[p - 1]
                p -= 1
            best_d[p] = d
            best_i[p] = j


@njit(cache=True, nogil=True)
def _scratch(n, k):
    """One thread's buffers for :func:`_distances`, :func:`_total` and :func:`_nearest` over n atoms, k kept:
    (groups, dist, lows, sums, cand, best_d, best_i)."""
    groups = n // CHUNK
    return (groups, np.empty(n, np.float32), np.empty(groups, np.float32), np.empty(groups, np.float32),
            np.empty(n, np.int64), np.empty(k, np.float32), np.empty(k, np.int64))


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _weight(mean, d, hard):
    """A kept atom's weight: 1 (hard), or the mean distance minus its own, at least 0 (triangle)."""
    if hard:
        return np.float32(1.0)
    wv = mean - d
    return wv if wv > 0 else np.float32(0.0)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _sign_distances(zc_r, z2_r, c2, sg, dist, lows, groups, sums):
    """One patch's distances to every atom into ``dist`` (``sg`` 0), or its negative's (``sg`` 1),
    from its row of the product; returns their mean (what a triangle weight is measured from)."""
    _distances(zc_r, z2_r, c2, dist, lows, groups, np.float32(2.0) if sg == 0 else np.float32(-2.0))
    return _total(dist, groups, sums) / zc_r.size


@njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _select(zc, z2, c2, k, hard, signs, atoms, weights, row0):
    """For each patch r of a block, from ``zc = z @ atoms.T`` (B x K) and the squared norms of the
    patches (``z2``) and atoms (``c2``): the k nearest atoms (nearest first, ties to the lower id)
    and their weights, written to rows row0.. of ``atoms`` / ``weights``; with ``signs`` 2, then
    the k atoms nearest to the patch's negative, as ids K + atom. Rows run in parallel."""
    b, n = zc.shape
    for r in prange(b):
        groups, dist, lows, sums, cand, best_d, best_i = _scratch(n, k)
        for sg in range(signs):
            mean = _sign_distances(zc[r], z2[r], c2, sg, dist, lows, groups, sums)
            _nearest(dist, k, lows, groups, cand, best_d, best_i)
            for j in range(k):
                atoms[row0 + r, sg * k + j] = best_i[j] + sg * n
                weights[row0 + r, sg * k + j] = _weight(mean, best_d[j], hard)


@njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _pool(zc, z2, c2, k, hard, signs, cells, out, image0):
    """The codes of a block of whole images' patches summed per cell: for image i of the block
    (rows ``i * L .. (i + 1) * L`` of ``zc``, L = ``len(cells)`` locations), ``out[image0 + i, c, a]``
    gains the weight of atom a in every patch whose location lies in cell c (``cells``), and with
    ``signs`` 2 ``out[image0 + i, c, K + a]`` that of atom a for the patch's negative. With k equal
    to the number of atoms every atom is kept (its triangle weight, at least 0). Images run in
    parallel, each one's patches in order, so the sums do not depend on the thread count."""
    locations = cells.size
    images = zc.shape[0] // locations
    n = zc.shape[1]
    for i in prange(images):
        groups, dist, lows, sums, cand, best_d, best_i = _scratch(n, k)
        img = out[image0 + i]
        for loc in range(locations):
            r = i * locations + loc
            acc = img[cells[loc]]
            for sg in range(signs):
                mean = _sign_distances(zc[r], z2[r], c2, sg, dist, lows, groups, sums)
                if k == n:
                    for j in range(n):
                        acc[sg * n + j] += _weight(mean, dist[j], hard)
                    continue
                _nearest(dist, k, lows, groups, cand, best_d, best_i)
                for j in range(k):
                    acc[sg * n + best_i[j]] += _weight(mean, best_d[j], hard)


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The process's thread-pool controller, found once (finding the loaded libraries costs a
    millisecond, a query's coding less)."""
    return ThreadpoolController()


@dataclass
class ShapeCode:
    """One shape's dictionary: whitening and atoms."""

    h: int
    w: int
    mean: np.ndarray  # d float32: mean of the scaled sample patches
    whiten: np.ndarray  # d x d float32
    atoms: np.ndarray  # K x d float32, whitened space
    norm: str = "contrast"  # one of NORMS
    scale: int = 1  # patches of the image averaged over scale x scale blocks (:func:`binned`): each covers h*scale x w*scale pixels

    def code(self, patches: np.ndarray, k: int, hard: bool, signs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Scaled-and-whitened codes of raw patch rows (P x d float32, changed in place):
        (atoms P x k*signs int64, weights P x k*signs float32); with ``signs`` 2 the last k are the
        negative's atoms, ids K..2K-1."""
        atoms = np.empty((len(patches), k * signs), np.int64)
        weights = np.empty((len(patches), k * signs), np.float32)
        c2 = (self.atoms**2).sum(1)
        for s, zc, z2 in self._products(patches, block_rows(len(self.atoms))):
            _select(zc, z2, c2, k, hard, signs, atoms, weights, s)
        return atoms, weights

    def _products(self, patches: np.ndarray, rows: int):
        """For each block of ``rows`` raw patch rows (changed in place): (first row, the block's
        products with the atoms ``z @ atoms.T``, its squared norms ``|z|^2``), z the scaled and
        whitened rows. On one BLAS thread: a multi-threaded product may split its sums differently
        with the thread count, and the codes must not depend on it (in-process, worker processes,
        Ray tasks)."""
        with _blas().limit(limits=1, user_api="blas"):
            for s in range(0, len(patches), rows):
                block = normalise(patches[s : s + rows], self.norm)  # row by row: the same values as all rows at once
                z = (block - self.mean) @ self.whiten
                yield s, z @ self.atoms.T, (z * z).sum(1)

    def pool(self, patches: np.ndarray, k: int, hard: bool, cells: np.ndarray, n_cells: int, signs: int = 1) -> np.ndarray:
        """The codes of whole images' raw patch rows (N * L x d float32, image by image, changed in
        place; L = ``len(cells)`` locations, ``cells`` the cell of each) summed per cell:
        N x n_cells x K*signs float32 (atom a's weights over the patches of cell c; K + a: the negatives')."""
        locations = len(cells)
        n = len(patches) // locations
        out = np.zeros((n, n_cells, len(self.atoms) * signs), np.float32)
        c2 = (self.atoms**2).sum(1)
        cells = np.ascontiguousarray(cells, np.int64)
        rows = max(1, block_rows(len(self.atoms)) // locations) * locations  # whole images per product
        for s, zc, z2 in self._products(patches, rows):
            _pool(zc, z2, c2, k, hard, signs, cells, out, s // locations)
        return out

    @cached_property
    def unwhitened(self) -> np.ndarray:
        """Every atom un-whitened back to a scaled patch (2K x d float64): atom a at row a, the
        negative of atom a (what ``--code-signs both`` keys as atom K + a) at row K + a."""
        signed = np.concatenate([self.atoms, -self.atoms]).astype(np.float64)
        return signed @ np.linalg.pinv(self.whiten.astype(np.float64)) + self.mean

    def pixels_like(self, atoms: np.ndarray, brightness: float, contrast: float, channels: int) -> np.ndarray:
        """Atoms ``atoms`` drawn as pixels (len x h x w x C uint8) a person can compare with a patch of
        that ``brightness`` and ``contrast`` (:func:`brightness_contrast`): with ``contrast``
        scaling, its inverse applied with the patch's own values; with ``none``, in the atoms'
        own colours."""
        x = self.unwhitened[np.asarray(atoms, np.int64)]
        if self.norm == "contrast":
            x = x * np.sqrt(contrast**2 + CONTRAST) + brightness
        else:
            x = x * 255
        return self._covering(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(len(x), self.h, self.w, channels))

    def pixels(self, channels: int) -> np.ndarray:
        """Every atom shown as pixels (2K x h x w x C uint8, the negatives after the atoms: :attr:`unwhitened`): un-whitened back to a scaled patch, then
        with ``none`` scaled back by 255 (its own colours), with ``contrast`` (which lost the
        patch's brightness and contrast) stretched linearly to 0..255. Drawn over the pixels a
        patch covers (each value repeated over its ``scale`` x ``scale`` block)."""
        x = self.unwhitened
        if self.norm == "none":
            return self._covering(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(len(x), self.h, self.w, channels))
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        x = (x - lo) * (255.0 / np.maximum(hi - lo, 1e-9))
        return self._covering(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(len(x), self.h, self.w, channels))

    def _covering(self, drawn: np.ndarray) -> np.ndarray:
        """Atoms drawn at the patch's size (n x h x w x C) spread over the pixels it covers:
        each value repeated over its ``scale`` x ``scale`` block."""
        if self.scale == 1:
            return drawn
        return np.repeat(np.repeat(drawn, self.scale, axis=1), self.scale, axis=2)


@dataclass
class Dictionary:
    """The code view's dictionaries, one per code shape, in the config's shape order."""

    shapes: list[ShapeCode]
    channels: int

    @property
    def norm(self) -> str:
        return self.shapes[0].norm

    def code(
        self, images: np.ndarray, stride: int, k: int, weighting: str, cells: list[np.ndarray] | None = None, n_cells: int = 0,
        signs: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Codes of N x H x W x C uint8 images: (atoms N x S uint16, weights N x S float32) over the
        code slots, for each shape then each rank (nearest first; with ``signs`` 2, ranks k..2k-1 are
        the negative's nearest, ids K + atom) then each location (row-major).

        With ``cells`` (per shape, the cell of each location, row-major, below ``n_cells``) the
        weights are summed per cell before anything is returned: the slots are, for each shape,
        each atom (rank r holds atom r), each cell, and ``k`` equal to the number of atoms keeps
        every atom of every patch."""
        n = len(images)
        atoms, weights = [], []
        for i, s in enumerate(self.shapes):
            p, ny, nx = patch_matrix(binned(images, s.scale), s.h, s.w, stride)
            if cells is not None:
                pooled = s.pool(p, k, weighting == "hard", cells[i], n_cells, signs)  # N x cells x K*signs
                ids = len(s.atoms) * signs
                weights.append(pooled.transpose(0, 2, 1).reshape(n, -1))
                atoms.append(np.broadcast_to(np.repeat(np.arange(ids), n_cells), (n, ids * n_cells)))
                continue
            a, wt = s.code(p, k, weighting == "hard", signs)
            atoms.append(a.reshape(n, ny * nx, k * signs).transpose(0, 2, 1).reshape(n, -1))
            weights.append(wt.reshape(n, ny * nx, k * signs).transpose(0, 2, 1).reshape(n, -1))
        return np.concatenate(atoms, 1).astype(np.uint16), np.ascontiguousarray(np.concatenate(weights, 1))

    @cached_property
    def mirrors(self) -> np.ndarray | None:
        """The atom ids' mirror map (:func:`mirror_pairs`) when every shape's dictionary is closed
        under left-right mirroring, bit for bit (mean, whitening and atoms, as :func:`fit` with
        ``mirror`` makes them), else None."""
        pairs = mirror_pairs(len(self.shapes[0].atoms))
        for s in self.shapes:
            order = mirror_order(s.h, s.w, self.channels)
            if not (np.array_equal(s.mean[order], s.mean) and np.array_equal(s.whiten[np.ix_(order, order)], s.whiten)
                    and np.array_equal(s.atoms[:, order], s.atoms[pairs])):
                return None
        return pairs

    def can_mirror(self, width: int, stride: int) -> bool:
        """Whether :meth:`mirrored` applies to images ``width`` pixels wide coded with ``stride``: a
        mirror-closed dictionary, and every shape's patch locations mirrored onto each other."""
        return self.mirrors is not None and all(width % s.scale == 0 and (width // s.scale - s.w) % stride == 0 for s in self.shapes)

    def mirrored(self, atoms: np.ndarray, weights: np.ndarray, height: int, width: int, stride: int, k: int, signs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The codes (:meth:`code`'s layout, not pooled) of the left-right mirrors of images whose own
        codes are ``atoms`` / ``weights``: a mirrored patch's nearest atoms are the mirrors of its
        original's at the same distances, so each location takes the mirrored location's atoms
        through :attr:`mirrors` and its weights as they are. Needs :meth:`can_mirror`; equal to coding
        the mirrored images up to float rounding (near-ties may swap)."""
        if not self.can_mirror(width, stride):
            raise ValueError(f"this dictionary does not code mirrored {width}-pixel-wide images from their originals")
        pairs = self.mirrors
        ids = np.concatenate([pairs, pairs + len(pairs)]) if signs == 2 else pairs
        n, col, out_a, out_w = len(atoms), 0, [], []
        for s in self.shapes:
            grid = (k * signs, (height // s.scale - s.h) // stride + 1, (width // s.scale - s.w) // stride + 1)
            size = int(np.prod(grid))
            out_a.append(ids[atoms[:, col : col + size].reshape(n, *grid)[..., ::-1].astype(np.int64)].reshape(n, size))
            out_w.append(weights[:, col : col + size].reshape(n, *grid)[..., ::-1].reshape(n, size))
            col += size
        return np.concatenate(out_a, 1).astype(atoms.dtype), np.ascontiguousarray(np.concatenate(out_w, 1))

    def to_bytes(self) -> bytes:
        arrays = {"format": np.array(DICTIONARY_FORMAT), "channels": np.int64(self.channels),
                  "shapes": np.array([[s.h, s.w] + ([s.scale] if self.scaled else []) for s in self.shapes], np.int64)}
        if self.norm != "contrast":  # files without it were all written with contrast normalisation
            arrays["norm"] = np.array(self.norm)
        for i, s in enumerate(self.shapes):
            arrays[f"mean_{i}"], arrays[f"whiten_{i}"], arrays[f"atoms_{i}"] = s.mean, s.whiten, s.atoms
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @property
    def scaled(self) -> bool:
        """True when a shape codes the image averaged over blocks (a scale above 1); only then does
        the saved form record the scales, so a dictionary without one saves as it always has."""
        return any(s.scale > 1 for s in self.shapes)

    def digest(self) -> str:
        """SHA-256 of the saved form (what the extract config records)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: Path) -> str:
        """Write the dictionary atomically; returns its digest."""
        data = self.to_bytes()
        with layout.atomic(path) as tmp:
            tmp.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: Path | str, expected: str | None = None) -> "Dictionary":
        """Read a dictionary; ``expected`` (a digest) refuses any other dictionary in one line."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise PipelineError(f"dictionary {path} is missing; extract again (or pass `dictionary` with the training shards' {layout.DICTIONARY})")
        layout.regular_file(path, "use the dictionary.npz of the training shards, or extract again", MAX_DICTIONARY_BYTES)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            raise PipelineError(
                f"dictionary {path} ({digest[:12]}) is not the one these keys were made with ({expected[:12]}); "
                "use the dictionary of the training shards, or extract again"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if str(z["format"]) != DICTIONARY_FORMAT:
                    raise ValueError(f"format {z['format']}")
                norm = str(z["norm"]) if "norm" in z.files else "contrast"
                if norm not in NORMS:
                    raise ValueError(f"scaling {norm!r}")
                listed = z["shapes"]
                if listed.ndim != 2 or listed.shape[1] not in (2, 3):
                    raise ValueError(f"shapes of shape {listed.shape}")
                shapes = [
                    ShapeCode(int(row[0]), int(row[1]), z[f"mean_{i}"], z[f"whiten_{i}"], z[f"atoms_{i}"], norm, int(row[2]) if len(row) == 3 else 1)
                    for i, row in enumerate(listed)
                ]
                d = cls(shapes, int(z["channels"]))
            d.check()
            return d
        except (ValueError, KeyError, OSError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise PipelineError(f"{path} is not a patchhash dictionary ({e}); extract again") from None

    def check(self) -> None:
        """Raise ValueError unless every shape's arrays have the shapes its patch size makes, are
        finite, and every shape has the same number of atoms, which a code key can hold."""
        if self.channels not in (1, 3) or not self.shapes:
            raise ValueError(f"{len(self.shapes)} shapes on {self.channels} channels")
        if len({s.norm for s in self.shapes}) != 1 or self.norm not in NORMS:
            raise ValueError(f"scalings {sorted({s.norm for s in self.shapes})}; every shape needs the same one of {', '.join(NORMS)}")
        counts = set()
        for s in self.shapes:
            d = s.h * s.w * self.channels
            if not 1 <= s.scale <= 64:
                raise ValueError(f"the {s.h}x{s.w} shape has scale {s.scale}, not 1 to 64")
            if not (s.h >= 1 and s.w >= 1 and s.mean.shape == (d,) and s.whiten.shape == (d, d) and s.atoms.ndim == 2 and s.atoms.shape[1] == d):
                raise ValueError(f"the {s.h}x{s.w} arrays have shapes {s.mean.shape}, {s.whiten.shape}, {s.atoms.shape}, not ({d},), ({d}, {d}), (K, {d})")
            for name in ("mean", "whiten", "atoms"):
                a = getattr(s, name)
                if a.dtype.kind != "f" or not np.isfinite(a).all():
                    raise ValueError(f"the {s.h}x{s.w} {name} holds {a.dtype} values that are not all finite numbers")
            counts.add(len(s.atoms))
        if len(counts) != 1 or not 1 <= min(counts) <= MAX_ATOMS:
            raise ValueError(f"atoms per shape {sorted(counts)}; every shape needs the same number, 1 to {MAX_ATOMS}")


def mirror_order(h: int, w: int, channels: int) -> np.ndarray:
    """The permutation of a patch row (row-major HWC, ``h*w*channels`` values) that mirrors the patch
    left to right: ``row[mirror_order(...)]`` is the row of the mirrored patch."""
    return np.arange(h * w * channels).reshape(h, w, channels)[:, ::-1].ravel()


def mirror_pairs(atoms: int) -> np.ndarray:
    """The atom ids' mirror map of a mirror-closed dictionary of ``atoms`` atoms: the first
    ``atoms // 2`` atoms and the next ``atoms // 2`` are each other's mirrors, and with an odd count
    the last atom is its own."""
    half = atoms // 2
    return np.concatenate([np.arange(half, 2 * half), np.arange(half), np.arange(2 * half, atoms)])


def _mirror_close(centroids: np.ndarray, atoms: int, order: np.ndarray) -> np.ndarray:
    """Atoms closed under mirroring (:func:`mirror_pairs`): ``centroids[:atoms // 2]``, their mirrors,
    and with an odd count one more centroid averaged with its own mirror (a sum of two floats does
    not depend on their order, so its mirror is itself, bit for bit)."""
    half = atoms // 2
    parts = [centroids[:half], centroids[:half][:, order]]
    if atoms % 2:
        c = centroids[half : half + 1]
        parts.append((c + c[:, order]) / np.float32(2))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def fit(
    images: Iterable[np.ndarray],
    shapes: list[tuple[int, int, int]],
    atoms: int,
    eps: float,
    sample: int,
    seed: int,
    channels: int,
    norm: str = "contrast",
    mirror: bool = False,
) -> Dictionary:
    """Fit each shape's ((h, w, scale), or (h, w) at scale 1) whitening and atoms on patches sampled from ``images`` (batches of
    N x H x W x C uint8; a shape of scale above 1 samples the images averaged over blocks,
    :func:`binned`), scaled by ``norm``: up to ``sample`` patches per shape, drawn uniformly
    from every image with a seeded generator, then ``faiss.Kmeans`` (seeded) in the whitened space.

    With ``mirror`` the dictionary is closed under left-right mirroring (:attr:`Dictionary.mirrors`):
    the whitening is fitted on the sample and its mirror, k-means finds ``atoms - atoms // 2``
    centroids, and the atoms are half of them and their mirrors. A mirrored patch is then coded by
    the mirrors of its original's atoms, so a mirrored image's code is its original's, mirrored."""
    import faiss

    rng = np.random.default_rng(seed)
    batches = list(images)
    n_images = sum(len(b) for b in batches)
    if n_images == 0:
        raise PipelineError("no images to fit the code dictionary on")
    out = []
    for h, w, scale in (tuple(shape) + (1,) * (3 - len(shape)) for shape in shapes):  # (h, w) is scale 1
        per = max(1, -(-sample // n_images))
        rows = []
        for b in batches:
            p, ny, nx = patch_matrix(binned(b, scale), h, w, 1)
            pick = rng.integers(0, ny * nx, size=(len(b), per)) + (np.arange(len(b)) * ny * nx)[:, None]
            rows.append(p[pick.ravel()])
        x = normalise(np.concatenate(rows)[:sample], norm)
        if len(x) < atoms:
            raise ParameterError(
                "atoms", f"{atoms} is more than the {len(x)} {h}x{w} patches sampled to fit them; use fewer atoms or more images"
            )
        order = mirror_order(h, w, channels)
        mu, wz = zca(np.concatenate([x, x[:, order]]) if mirror else x, eps)
        if mirror:  # averaged with their mirrors: exactly symmetric, bit for bit, as above
            mu, wz = (mu + mu[order]) / np.float32(2), (wz + wz[np.ix_(order, order)]) / np.float32(2)
        z = np.ascontiguousarray((x - mu) @ wz, dtype=np.float32)
        fitted = atoms - atoms // 2 if mirror else atoms
        km = faiss.Kmeans(z.shape[1], fitted, niter=20, seed=seed + 1, max_points_per_centroid=max(256, len(z) // fitted + 1))
        km.train(z)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        if mirror:
            centroids = _mirror_close(centroids, atoms, order)
        out.append(ShapeCode(h, w, mu, wz, centroids, norm, scale))
    return Dictionary(out, channels)


def brute_force(images: np.ndarray, d: Dictionary, stride: int, k: int, weighting: str, signs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Dictionary.code` written directly in float64 numpy (for tests): same layout and ties;
    with ``signs`` 2 the k atoms nearest to -z follow each patch's k nearest to z, as ids K + atom."""
    n = len(images)
    atoms, weights = [], []
    for s in d.shapes:
        sized = images.astype(np.float64)
        if s.scale > 1:  # the mean of each scale x scale block
            hb, wb = images.shape[1] // s.scale, images.shape[2] // s.scale
            sized = sized[:, : hb * s.scale, : wb * s.scale].reshape(n, hb, s.scale, wb, s.scale, -1).mean((2, 4))
        view = sliding_window_view(sized, (s.h, s.w), axis=(1, 2))[:, ::stride, ::stride]
        ny, nx = view.shape[1:3]
        p = view.transpose(0, 1, 2, 4, 5, 3).reshape(n * ny * nx, -1)
        if s.norm == "none":
            p = p / 255.0
        else:
            p = (p - p.mean(1, keepdims=True)) / np.sqrt(p.var(1, keepdims=True) + CONTRAST)
        z = (p - s.mean) @ s.whiten.astype(np.float64)
        orders, wts = [], []
        for sign in (1, -1)[:signs]:
            dist = np.sqrt(((sign * z[:, None, :] - s.atoms[None].astype(np.float64)) ** 2).sum(-1))
            order = np.argsort(dist, axis=1, kind="stable")[:, :k]
            near = np.take_along_axis(dist, order, 1)
            orders.append(order + (0 if sign == 1 else len(s.atoms)))
            wts.append(np.ones_like(near) if weighting == "hard" else np.maximum(0, dist.mean(1, keepdims=True) - near))
        order, wt = np.concatenate(orders, 1), np.concatenate(wts, 1)
        atoms.append(order.reshape(n, ny * nx, k * signs).transpose(0, 2, 1).reshape(n, -1))
        weights.append(wt.reshape(n, ny * nx, k * signs).transpose(0, 2, 1).reshape(n, -1))
    return np.concatenate(atoms, 1), np.concatenate(weights, 1)
