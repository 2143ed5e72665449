"""Patches whose key was not seen in training: vectors composed from their seen sub-patches.

fastText builds a vector for an unknown word from its character n-grams; here an unseen
patch gets the mean of the learned vectors of its strictly smaller sub-patches (same
position mode and view) that have their own row. A patch none of whose parts were seen
has no vector ("unmatched").

How unseen patches enter a prediction (the ``unseen`` parameter, ``--unseen``):

* ``drop``: left out, as in training (the bag holds seen patches only).
* ``compose``: the composed vector joins the bag as one more patch.
* ``nearest``: the composed vector is replaced by its nearest learned pattern (FAISS), whose
  row joins the bag.

The default is ``drop``, what training does; ``benchmarks/query.py`` compares the three (docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.errors import ParameterError
from pipeline.extraction.hashing import KeyPlan
from pipeline.table.pooling import pool_bags

RULES = ("drop", "compose", "nearest")
DEFAULT = "drop"


def check(unseen: str) -> str:
    """``unseen`` when it is one of :data:`RULES`."""
    if unseen not in RULES:
        raise ParameterError("unseen", f"{unseen!r} is not one of {', '.join(RULES)}")
    return unseen


@lru_cache(maxsize=8)
def _sub_slot_csr(plan: KeyPlan) -> tuple[np.ndarray, np.ndarray]:
    """(indptr K+1, indices): the sub-slots of every slot, as :meth:`KeyPlan.sub_slots` gives them."""
    subs = [plan.sub_slots(s) for s in range(plan.keys_per_image)]
    indptr = np.zeros(len(subs) + 1, np.int64)
    np.cumsum([len(s) for s in subs], out=indptr[1:])
    indices = np.concatenate(subs).astype(np.int64) if indptr[-1] else np.zeros(0, np.int64)
    return indptr, indices


@dataclass
class Unseen:
    """The unseen patches of a batch of images and the seen rows their vectors are composed of."""

    image: np.ndarray  # U: which image (row of the batch)
    slot: np.ndarray  # U: which slot
    parts: np.ndarray  # rows of the seen sub-patches, all patches concatenated
    offsets: np.ndarray  # U + 1 into ``parts``
    own: np.ndarray  # N x K bool: the key has its own row

    @property
    def has(self) -> np.ndarray:
        """U bool: at least one seen sub-patch (a vector can be composed)."""
        return np.diff(self.offsets) > 0

    def means(self, values: np.ndarray) -> np.ndarray:
        """U: the mean of a per-row value over each unseen patch's parts (0 where there is none),
        what :meth:`vectors` gives for a one-column table, without building the vectors."""
        per = np.diff(self.offsets)
        sums = np.bincount(np.repeat(np.arange(len(per)), per), weights=values[self.parts], minlength=len(per))
        return sums / np.maximum(per, 1)

    def vectors(self, table: np.ndarray) -> np.ndarray:
        """U x d composed vectors (mean of the parts; NaN where there is none)."""
        d = table.shape[1]
        out = np.full((len(self.image), d), np.nan, np.float32)
        has = self.has
        if has.any():
            per = np.diff(self.offsets)
            weights = np.repeat(1.0 / np.maximum(per, 1), per).astype(np.float32)
            out[has] = pool_bags(table, self.parts, self.offsets, weights)[has]
        return out


def find(plan: KeyPlan, rows: np.ndarray, own_rows: int) -> Unseen:
    """The unseen patches of images whose keys map to ``rows`` (N x K, from ``Vocabulary.rows_of``).

    A key has its own row when ``0 <= row < own_rows`` (shared buckets do not count as seen).
    """
    own = (rows >= 0) & (rows < own_rows)
    image, slot = np.nonzero(~own)
    indptr, indices = _sub_slot_csr(plan)
    n_sub = indptr[slot + 1] - indptr[slot]
    pair = np.repeat(np.arange(len(slot)), n_sub)
    start = np.repeat(indptr[slot] - np.concatenate(([0], np.cumsum(n_sub)[:-1])), n_sub)
    sub = indices[start + np.arange(len(pair))] if len(pair) else np.zeros(0, np.int64)
    img = image[pair]
    ok = own[img, sub]
    parts = rows[img[ok], sub[ok]]
    offsets = np.zeros(len(slot) + 1, np.int64)
    np.cumsum(np.bincount(pair[ok], minlength=len(slot)), out=offsets[1:])
    return Unseen(image, slot, parts, offsets, own)


def composed_sums(u: Unseen, table: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (sum of its composed vectors N x d, how many it has N)."""
    has = u.has
    per = np.diff(u.offsets)
    count = np.bincount(u.image[has], minlength=n_images).astype(np.float32)
    if not has.any():
        return np.zeros((n_images, table.shape[1]), np.float32), count
    # one weighted bag per image: each part weighs 1 / (parts of its patch)
    pair_image = np.repeat(u.image, per)
    order = np.argsort(pair_image, kind="stable")
    weights = np.repeat(1.0 / np.maximum(per, 1), per).astype(np.float32)[order]
    offsets = np.zeros(n_images + 1, np.int64)
    np.cumsum(np.bincount(pair_image, minlength=n_images), out=offsets[1:])
    return pool_bags(table, u.parts[order], offsets, weights), count
