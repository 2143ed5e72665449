"""Looking up learned patterns: the nearest learned patterns of an image's patches (with what each
patch contributed to the prediction), the patterns a class relies on, and a pattern's pixels.

:class:`pipeline.query.run.Run` holds one as ``run.lookup``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.extraction.codes import Dictionary
from pipeline.extraction.hashing import KeyPlan
from pipeline.errors import PipelineError
from pipeline.query.classify import Classifier, find_unseen
from pipeline.table.loaded import PatternTable


@dataclass
class PatchLookup:
    """Nearest learned patterns for the patches (slots) of one image; every array is parallel to ``slots``."""

    slots: np.ndarray  # S slot numbers of the canonical order, most decisive first when ``patches`` was given
    distances: np.ndarray  # S x k squared L2; inf where no vector
    ids: np.ndarray  # S x k pattern ids; -1 where no vector
    seen: np.ndarray  # S bool: the patch's key is in the vocabulary (seen in training, own row)
    composed: np.ndarray  # S bool: unseen, vector composed from seen sub-patches
    location: dict[str, np.ndarray]  # per slot: y, x, h, w, cell
    keys: np.ndarray  # S uint64
    contribution: np.ndarray  # S float: the patch's share of the predicted class's logit
    counts: dict[str, int]  # over all patches of the image: total, seen, composed, unmatched
    probabilities: np.ndarray  # C: the image's class probabilities (what ``predict`` gives)
    occurrences: np.ndarray  # S: how many slots of the image hold the same pattern (key); 1 for every slot without ``patches``
    pending: tuple | None = None  # made with search=False: what PatternLookup.search_lookups searches for


NEAR_CACHE = 1 << 18  # learned patterns whose nearest patterns a loaded run remembers (a few tens of MB at most)


def distinct_top(keys: np.ndarray, contribution: np.ndarray, patches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``patches`` distinct patterns (keys) of one image with the largest summed contribution:
    (the first slot of each, most decisive first; its pattern's total contribution; its number of slots)."""
    uniq, first, inverse, n = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    total = np.zeros(len(uniq), np.float64)
    np.add.at(total, inverse.reshape(-1), contribution)
    order = np.lexsort((first, -total))[:patches]  # ties: the pattern met first in slot order
    return first[order], total[order], n[order]


class PatternLookup:
    """Look-ups in ``table`` (the learned patterns) of patches placed by ``plan``, explained by
    ``classifier``'s head; ``dictionary`` (None without a code view) draws a code pattern's atom
    in ``channels`` channels."""

    def __init__(self, table: PatternTable, plan: KeyPlan, classifier: Classifier, dictionary: Dictionary | None, channels: int):
        self.table = table
        self.plan = plan
        self.classifier = classifier
        self.dictionary = dictionary
        self.channels = channels
        self.near_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # learned key -> its nearest patterns
        self._pushes: dict[int, np.ndarray] = {}  # class -> every table row's push on its logit

    def forget(self) -> None:
        """Drop what was remembered from the table and head as they were (after a tune or a lesson)."""
        self.near_cache.clear()
        self._pushes.clear()

    def patch_vectors(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectors for the K slots of one image's keys: (vectors K x d, seen, composed).

        A key in the vocabulary uses its learned vector; any other key its composed vector
        (:mod:`pipeline.query.classify`), or NaN when none of its parts was seen.
        """
        table = self.table.vectors
        rows = self.table.vocab.rows_of(keys[None])
        u = find_unseen(self.plan, rows, self.table.size)
        seen = u.own[0]
        vectors = np.full((len(keys), table.shape[1]), np.nan, np.float32)
        vectors[seen] = table[rows[0][seen]]
        vectors[u.slot] = u.vectors(table)
        composed = np.zeros(len(keys), bool)
        composed[u.slot[u.has]] = True
        return vectors, seen, composed

    def of_keys(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each len x k, of the patterns nearest each seen key's learned vector
        (a 1-D uint64 array); rows of unseen keys are inf / -1 (without the patch's place no parts
        can be composed)."""
        pid = self.table.vocab.own_ids(keys)
        d = np.full((len(keys), k), np.inf, np.float32)
        ids = np.full((len(keys), k), -1, np.int64)
        ok = pid >= 0
        d[ok], ids[ok] = self.table.search(self.table.vectors[pid[ok]], k)
        return d, ids

    def lookup_keys(self, keys: np.ndarray, probs: np.ndarray, k: int, patches: int | None, weights: np.ndarray | None = None,
                    search: bool = True) -> PatchLookup:
        """The k nearest learned patterns of one image's patches (keys K, their weights) whose class
        probabilities are ``probs``: every patch (``patches`` None) or the ``patches`` distinct patterns
        contributing most to the predicted class's logit, most decisive first. ``search`` False leaves
        the distances and ids to :meth:`search_lookups`, which searches for many images' patches at once."""
        table = self.table.vectors
        rows = self.table.vocab.rows_of(keys[None])
        u = find_unseen(self.plan, rows, self.table.size)
        seen = u.own[0]
        made = u.has
        composed = np.zeros(len(keys), bool)
        composed[u.slot[made]] = True
        has = seen | composed
        w = np.ones(len(keys), np.float32) if weights is None else weights
        share = w / max(float(w.sum()), 1e-12)
        # a patch's push is its vector along the class direction; a composed vector is a mean of parts,
        # so its push is the mean of theirs: the table is projected once per class, no vector built to rank
        push = self._class_push(int(probs.argmax()))
        contribution = np.zeros(len(keys), np.float64)
        contribution[seen] = push[rows[0][seen]]
        contribution[u.slot[made]] = u.means(push)[made]
        contribution *= share
        occurrences = np.ones(len(keys), np.int64)
        if patches is None:
            slots = np.arange(len(keys))
        else:
            slots, contribution, occurrences = distinct_top(keys, contribution, patches)
        sel = np.flatnonzero(has[slots])
        vectors = np.empty((len(keys), table.shape[1]), np.float32)  # filled only where searched
        want = slots[sel]
        own = want[seen[want]]
        vectors[own] = table[rows[0][own]]
        if made.any():
            vectors[u.slot[made]] = u.vectors(table)[made]
        counts = {"total": len(keys), "seen": int(seen.sum()), "composed": int(composed.sum()), "unmatched": int((~has).sum())}
        lookup = PatchLookup(
            slots, np.full((len(slots), k), np.inf, np.float32), np.full((len(slots), k), -1, np.int64), seen[slots], composed[slots],
            self.plan.locate(slots), keys[slots], contribution, counts, probs, occurrences,
        )
        lookup.pending = (sel, keys[slots[sel]], vectors[slots[sel]], seen[slots[sel]])
        if search:
            self.search_lookups([lookup], k)
        return lookup

    def search_lookups(self, lookups: list[PatchLookup], k: int) -> None:
        """Fill in the nearest patterns of lookups made with ``search=False``, in one search."""
        todo = [lk for lk in lookups if lk.pending is not None]
        if not todo:
            return
        keys, vectors, seen = (np.concatenate([lk.pending[i] for lk in todo]) for i in (1, 2, 3))
        d, ids = self._search(keys, vectors, seen, k)
        at = 0
        for lk in todo:
            sel = lk.pending[0]
            lk.distances[sel], lk.ids[sel] = d[at : at + len(sel)], ids[at : at + len(sel)]
            at += len(sel)
            lk.pending = None

    def _search(self, keys: np.ndarray, vectors: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest patterns of each query vector (its key, whether the key is a learned
        pattern): one search per distinct key (a pattern met at many places is one question), and
        none for a learned pattern answered before in this process (:data:`NEAR_CACHE` of them
        kept; an unseen key's composed vector depends on its place, so only learned ones)."""
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        d = np.empty((len(uniq), k), np.float32)
        ids = np.empty((len(uniq), k), np.int64)
        cache = self.near_cache
        todo = []
        for j, key in enumerate(uniq.tolist()):
            hit = cache.get(key)
            if hit is not None and hit[0].shape[0] >= k:
                d[j], ids[j] = hit[0][:k], hit[1][:k]
            else:
                todo.append(j)
        if todo:
            todo = np.asarray(todo)
            d[todo], ids[todo] = self.table.search(vectors[first[todo]], k)
            learned = todo[seen[first[todo]]]
            if len(cache) + len(learned) > NEAR_CACHE:
                cache.clear()
            for j, key in zip(learned.tolist(), uniq[learned].tolist()):
                cache[key] = (d[j].copy(), ids[j].copy())
        return d[inverse.reshape(-1)], ids[inverse.reshape(-1)]

    def pattern_pixels(self, ids: np.ndarray, like: tuple[float, float] | None = None) -> list[np.ndarray | None]:
        """Example pixels (h x w x C uint8) of patterns ``ids`` as first seen in training; None where
        unknown. A code pattern's pixels are its atom: drawn with ``like`` = (brightness, contrast)
        of a patch (:func:`pipeline.extraction.codes.brightness_contrast`, e.g. of the query patch
        it is compared with) where given, else stretched to the full range (docs/query.md)."""
        ids = np.asarray(ids, np.int64)
        out = self.table.pixels(ids, self.channels)
        if like is None or self.dictionary is None or not len(ids):
            return out
        meta = self.table.metadata_of(ids)
        shapes = {(s.h * s.scale, s.w * s.scale): s for s in self.dictionary.shapes}  # by the pixels a patch covers
        for i, (atom, h, w) in enumerate(zip(meta["atom"], meta["h"], meta["w"])):
            shape = shapes.get((int(h), int(w))) if atom >= 0 else None
            if shape is not None:
                out[i] = shape.pixels_like([int(atom)], like[0], like[1], self.channels)[0]
        return out

    def class_patterns(self, c: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` patterns class ``c`` relies on most: (pattern ids, scores), best first.

        A pattern's score is how much its vector moves class ``c``'s logit above the mean
        of the classes' logits, times how often it occurred in class ``c``'s training
        images: its total push towards ``c`` over the training set.
        """
        classes = len(self.classifier.head_layers[-1][1])
        if not 0 <= c < classes:
            raise PipelineError(f"class {c} is not one of the run's {classes} classes")
        direction = self.classifier.class_direction(c) - np.mean([self.classifier.class_direction(j) for j in range(classes)], axis=0)
        push = self.table.vectors[: self.table.size] @ direction
        score = push * self.table.metadata["class_counts"][:, c]
        best = np.argsort(-score, kind="stable")[:n]
        return best, score[best]

    def _class_push(self, c: int) -> np.ndarray:
        """Every table row's push on class ``c``'s logit (float32), projected once per class, a block
        of rows at a time (no copy of the table)."""
        if c not in self._pushes:
            direction = self.classifier.class_direction(c).astype(np.float32)
            table = self.table.vectors
            push = np.empty(len(table), np.float32)
            for s in range(0, len(push), 1 << 16):
                push[s : s + (1 << 16)] = table[s : s + (1 << 16)] @ direction
            self._pushes[c] = push
        return self._pushes[c]
