"""Looking things up in a loaded run: the nearest learned patterns of an image's patches (with
what each patch contributed to the prediction), the nearest training images, and the pixels
of a pattern.

A mixin of :class:`pipeline.query.run.Run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline import familiarity
from pipeline.table import index as pattern_index
from pipeline import layout
from pipeline.table import patterns
from pipeline.errors import ParameterError, PipelineError
from pipeline.query import pooling, unseen


@dataclass
class PatchLookup:
    """Nearest learned patterns for the patches (slots) of one image; every array is parallel to ``slots``."""

    slots: np.ndarray  # S slot numbers of the canonical order, most decisive first when ``top`` was given
    distances: np.ndarray  # S x k squared L2; inf where no vector
    ids: np.ndarray  # S x k pattern ids; -1 where no vector
    seen: np.ndarray  # S bool: the patch's key is in the vocabulary (seen in training, own row)
    composed: np.ndarray  # S bool: unseen, vector composed from seen sub-patches
    location: dict[str, np.ndarray]  # per slot: y, x, h, w, cell
    keys: np.ndarray  # S uint64
    contribution: np.ndarray  # S float: the patch's share of the predicted class's logit
    counts: dict[str, int]  # over all patches of the image: total, seen, composed, unmatched
    probabilities: np.ndarray  # C: the image's class probabilities (what ``predict`` gives)
    occurrences: np.ndarray  # S: how many slots of the image hold the same pattern (key); 1 for every slot without ``top``
    pending: tuple | None = None  # made with search=False: what Run.search_lookups searches for


@dataclass
class ImageLookup:
    """Nearest training images of query images; every array is N x k."""

    distances: np.ndarray  # squared L2 between pooled vectors
    ids: np.ndarray  # rows of the image index (-1 where fewer than k)
    image_ids: np.ndarray  # the training images' ids in their shards / source order
    labels: np.ndarray  # their class indices
    names: np.ndarray  # their file names in the training source (None where unknown)


NEAR_CACHE = 1 << 18  # learned patterns whose nearest patterns a loaded run remembers (a few tens of MB at most)


def distinct_top(keys: np.ndarray, contribution: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``top`` distinct patterns (keys) of one image by their summed contribution: (the first
    slot of each, most decisive first; its pattern's total contribution; its number of slots)."""
    uniq, first, inverse, n = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    total = np.zeros(len(uniq), np.float64)
    np.add.at(total, inverse.reshape(-1), contribution)
    order = np.lexsort((first, -total))[:top]  # ties: the pattern met first in slot order
    return first[order], total[order], n[order]


MOVED_SLACK = 64  # more index answers asked per query when rows moved, to make up for the dropped ones


class LookUp:
    """Nearest patterns and images of a run (see :class:`pipeline.query.run.Run`)."""

    def seen_ids(self, keys: np.ndarray) -> np.ndarray:
        """Pattern id of each key (its vocabulary row), -1 for keys outside the vocabulary."""
        return self.vocab.own_ids(keys)

    def patch_vectors(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectors for the K slots of one image's keys: (vectors K x d, seen, composed).

        A key in the vocabulary uses its learned vector; any other key its composed vector
        (:mod:`pipeline.query.unseen`), or NaN when none of its parts was seen.
        """
        rows = self.vocab.rows_of(keys[None])
        u = unseen.find(self.plan, rows, self.vocab.size)
        seen = u.own[0]
        vectors = np.full((len(keys), self.train_config.dim), np.nan, np.float32)
        vectors[seen] = self.table[rows[0][seen]]
        vectors[u.slot] = u.vectors(self.table)
        composed = np.zeros(len(keys), bool)
        composed[u.slot[u.has]] = True
        return vectors, seen, composed

    @cached_property
    def familiarity_reference(self) -> familiarity.Reference | None:
        """The held-out images' familiarity signs (:mod:`pipeline.familiarity`); None for a run trained
        before they were measured."""
        try:
            return familiarity.Reference.load(self.root / layout.FAMILIARITY)
        except ValueError as e:
            raise PipelineError(f"{e}; train the run again") from None

    def familiarity_keys(self, keys: np.ndarray, weights: np.ndarray | None = None, pooled: np.ndarray | None = None,
                         near: ImageLookup | None = None, rule: str | None = None) -> np.ndarray | None:
        """How much each image (keys N x K, their weights) is like the training images, in [0, 1]
        (:mod:`pipeline.familiarity`); None when the run has no reference. ``pooled`` and ``near``:
        the images' pooled vectors and nearest training images where already computed, with unseen
        rule ``rule`` (default: the run's); reused when that rule drops unseen patches, as the
        familiarity's vectors do."""
        ref = self.familiarity_reference
        if ref is None:
            return None
        if (rule or self.unseen_rule) != "drop":
            pooled = near = None
        if near is not None and near.distances.shape[1] >= familiarity.NEIGHBOURS:
            d = near.distances[:, : familiarity.NEIGHBOURS]
        else:
            if pooled is None:
                pooled = self.pooled_keys(keys, "drop", weights)
            d, _ = pattern_index.search(self.image_index, pooled, familiarity.NEIGHBOURS)
        return ref.score(familiarity.signs(self.seen_ids(keys), d))

    def familiarity(self, images: np.ndarray) -> np.ndarray | None:
        """:meth:`familiarity_keys` of uint8 images."""
        keys, weights = self.encode(images)
        return self.familiarity_keys(keys, weights)

    def nearest_images(self, images: np.ndarray, k: int = 5, rule: str | None = None) -> ImageLookup:
        """The k nearest training images of each image by pooled vector."""
        if k < 1:
            raise ParameterError("k", f"{k} must be at least 1")
        keys, weights = self.encode(images)
        return self.neighbours(self.pooled_keys(keys, rule, weights), k)

    def neighbours(self, pooled: np.ndarray, k: int) -> ImageLookup:
        """The k nearest training images of pooled vectors (N x d, from :meth:`pooled_keys`)."""
        d, ids = pattern_index.search(self.image_index, pooled, k)
        safe = np.maximum(ids, 0)
        im = self.images
        return ImageLookup(
            d, ids, np.where(ids >= 0, im["image_id"][safe], -1), np.where(ids >= 0, im["label"][safe], -1),
            np.where(ids >= 0, im["name"][safe], None),
        )

    def nearest_patterns(self, patches_or_image: np.ndarray, k: int = 5, top: int | None = None) -> PatchLookup | tuple[np.ndarray, np.ndarray]:
        """The k nearest learned patterns.

        Given one image (H x W [x C] uint8): a :class:`PatchLookup` of its patches. ``top`` =
        None looks up every patch; ``top`` = N only the N patches contributing most to the
        predicted class's logit, in that order (the search is the costly part).

        Given patch keys (a 1-D uint64 array, e.g. from :meth:`images_to_keys`): ``(distances,
        ids)``, each len x k, from each seen key's learned vector; rows of unseen keys are
        inf / -1 (without the patch's place no parts can be composed).
        """
        if k < 1:
            raise ParameterError("k", f"{k} must be at least 1")
        arr = np.asarray(patches_or_image)
        if arr.ndim == 1 and arr.dtype == np.uint64:
            pid = self.seen_ids(arr)
            d = np.full((len(arr), k), np.inf, np.float32)
            ids = np.full((len(arr), k), -1, np.int64)
            ok = pid >= 0
            d[ok], ids[ok] = self.search_patterns(self.table[pid[ok]], k)
            return d, ids
        keys, weights = self.encode(arr)
        if len(keys) != 1:
            raise PipelineError("nearest_patterns takes one image; call it once per image")
        w = None if weights is None else weights[0]
        return self.lookup_keys(keys[0], self.predict_keys(keys, weights=weights)[0], k, top, w)

    def lookup_keys(self, keys: np.ndarray, probs: np.ndarray, k: int, top: int | None, weights: np.ndarray | None = None,
                    search: bool = True) -> PatchLookup:
        """:meth:`nearest_patterns` for one image's keys (K) and weights whose class probabilities are
        known. ``search`` False leaves the distances and ids to :meth:`search_lookups`, which
        searches for many images' patches at once."""
        rows = self.vocab.rows_of(keys[None])
        u = unseen.find(self.plan, rows, self.vocab.size)
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
        if top is None:
            slots = np.arange(len(keys))
        else:
            slots, contribution, occurrences = distinct_top(keys, contribution, top)
        sel = np.flatnonzero(has[slots])
        vectors = np.empty((len(keys), self.table.shape[1]), np.float32)  # filled only where searched
        want = slots[sel]
        own = want[seen[want]]
        vectors[own] = self.table[rows[0][own]]
        if made.any():
            vectors[u.slot[made]] = u.vectors(self.table)[made]
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
        d, ids = self._search_patterns(keys, vectors, seen, k)
        at = 0
        for lk in todo:
            sel = lk.pending[0]
            lk.distances[sel], lk.ids[sel] = d[at : at + len(sel)], ids[at : at + len(sel)]
            at += len(sel)
            lk.pending = None

    def _search_patterns(self, keys: np.ndarray, vectors: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest patterns of each query vector (its key, whether the key is a learned
        pattern): one search per distinct key (a pattern met at many places is one question), and
        none for a learned pattern answered before in this process (:data:`NEAR_CACHE` of them
        kept; an unseen key's composed vector depends on its place, so only learned ones)."""
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        d = np.empty((len(uniq), k), np.float32)
        ids = np.empty((len(uniq), k), np.int64)
        cache = self._near_cache
        todo = []
        for j, key in enumerate(uniq.tolist()):
            hit = cache.get(key)
            if hit is not None and hit[0].shape[0] >= k:
                d[j], ids[j] = hit[0][:k], hit[1][:k]
            else:
                todo.append(j)
        if todo:
            todo = np.asarray(todo)
            d[todo], ids[todo] = self.search_patterns(vectors[first[todo]], k)
            learned = todo[seen[first[todo]]]
            if len(cache) + len(learned) > NEAR_CACHE:
                cache.clear()
            for j, key in zip(learned.tolist(), uniq[learned].tolist()):
                cache[key] = (d[j].copy(), ids[j].copy())
        return d[inverse.reshape(-1)], ids[inverse.reshape(-1)]

    def search_patterns(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, pattern ids), each Q x k, of the learned patterns nearest ``vectors``.

        Rows changed in memory since loading (:attr:`moved`, by learning) are still at their old
        place in the index: the index is asked for more, its answers for moved rows are dropped,
        and the moved rows are searched exactly at their new place; the two lists are merged."""
        moved = self.moved
        if not len(moved):
            return pattern_index.search(self.index, vectors, k)
        q = np.ascontiguousarray(vectors, np.float32)
        extra = min(len(moved), MOVED_SLACK)
        d, ids = pattern_index.search(self.index, q, k + extra)
        stale = np.isin(ids, moved) | (ids < 0)
        d = np.where(stale, np.inf, d)
        at = self.table[moved]
        norms = (at * at).sum(1)
        out_d, out_ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for s in range(0, len(q), 1024):  # a block of queries at a time: Q x moved distances stay small
            qs = q[s : s + 1024]
            dm = np.maximum((qs * qs).sum(1)[:, None] - 2 * qs @ at.T + norms[None], 0).astype(np.float32)
            all_d = np.concatenate([d[s : s + 1024], dm], 1)
            all_ids = np.concatenate([ids[s : s + 1024], np.broadcast_to(moved, dm.shape)], 1)
            best = np.argsort(all_d, 1, kind="stable")[:, :k]
            out_d[s : s + 1024], out_ids[s : s + 1024] = np.take_along_axis(all_d, best, 1), np.take_along_axis(all_ids, best, 1)
        return out_d, np.where(np.isfinite(out_d), out_ids, -1)

    def pattern_pixels(self, ids: np.ndarray, like: tuple[float, float] | None = None) -> list[np.ndarray | None]:
        """Example pixels (h x w x C uint8) of patterns ``ids`` as first seen in training; None where
        unknown. A code pattern's pixels are its atom: drawn with ``like`` = (brightness, contrast)
        of a patch (:func:`pipeline.extraction.codes.brightness_contrast`, e.g. of the query patch
        it is compared with) where given, else stretched to the full range (docs/query.md)."""
        ids = np.asarray(ids, np.int64)
        out = patterns.pixels(self.pattern_file, ids, self.extract_config.channels)
        if like is None or self.dictionary is None or not len(ids):
            return out
        meta = self.pattern_rows(ids)
        shapes = {(s.h, s.w): s for s in self.dictionary.shapes}
        for i, (atom, h, w) in enumerate(zip(meta["atom"], meta["h"], meta["w"])):
            shape = shapes.get((int(h), int(w))) if atom >= 0 else None
            if shape is not None:
                out[i] = shape.pixels_like([int(atom)], like[0], like[1], self.extract_config.channels)[0]
        return out

    def class_patterns(self, c: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` patterns class ``c`` relies on most: (pattern ids, scores), best first.

        A pattern's score is how much its vector moves class ``c``'s logit above the mean
        of the classes' logits, times how often it occurred in class ``c``'s training
        images: its total push towards ``c`` over the training set.
        """
        if not 0 <= c < len(self.class_names):
            raise PipelineError(f"class {c} is not one of the run's {len(self.class_names)} classes")
        direction = self._class_direction(c) - np.mean([self._class_direction(j) for j in range(len(self.class_names))], axis=0)
        push = self.table[: self.vocab.size] @ direction
        score = push * self.patterns["class_counts"][:, c]
        best = np.argsort(-score, kind="stable")[:n]
        return best, score[best]

    def _class_push(self, c: int) -> np.ndarray:
        """Every table row's push on class ``c``'s logit (float32), projected once per class, a block
        of rows at a time (no copy of the table)."""
        if c not in self._pushes:
            direction = self._class_direction(c).astype(np.float32)
            push = np.empty(len(self.table), np.float32)
            for s in range(0, len(push), 1 << 16):
                push[s : s + (1 << 16)] = self.table[s : s + (1 << 16)] @ direction
            self._pushes[c] = push
        return self._pushes[c]

    def _class_direction(self, c: int) -> np.ndarray:
        """How much a unit of pooled vector along each dimension adds to class ``c``'s logit
        (:func:`pipeline.query.pooling.class_direction`)."""
        return pooling.class_direction(self.head_layers, c)
