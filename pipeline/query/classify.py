"""Classifying pooled patterns: an image's keys pooled into one vector through the run's table,
then the trained head (its layers in numpy: no torch at query time) or a vote of the nearest
training images.

Patches whose key was not seen in training get a vector composed from their seen sub-patches:
fastText builds a vector for an unknown word from its character n-grams; here an unseen patch
gets the mean of the learned vectors of its strictly smaller sub-patches (same position mode and
view) that have their own row. A patch none of whose parts were seen has no vector
("unmatched"). How unseen patches enter a prediction (the ``unseen`` parameter, ``--unseen``):

* ``drop``: left out, as in training (the bag holds seen patches only).
* ``compose``: the composed vector joins the bag as one more patch.
* ``nearest``: the composed vector is replaced by its nearest learned pattern (FAISS), whose
  row joins the bag.

The default is ``drop``, what training does; ``benchmarks/query.py`` compares the three (docs/results.md).

:class:`pipeline.query.run.Run` holds a :class:`Classifier` as ``run.classifier``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.errors import ParameterError
from pipeline.extraction.hashing import KeyPlan
from pipeline.query.training_images import TrainingImages
from pipeline.table import pooling
from pipeline.table.loaded import PatternTable

CLASSIFIERS = ("head", "knn")
UNSEEN_RULES = ("drop", "compose", "nearest")
DEFAULT_UNSEEN = "drop"


# ---------------------------------------------------------------- unseen patches

def check_unseen(unseen: str) -> str:
    """``unseen`` when it is one of :data:`UNSEEN_RULES`."""
    if unseen not in UNSEEN_RULES:
        raise ParameterError("unseen", f"{unseen!r} is not one of {', '.join(UNSEEN_RULES)}")
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
            out[has] = pooling.pool_bags(table, self.parts, self.offsets, weights)[has]
        return out


def find_unseen(plan: KeyPlan, rows: np.ndarray, own_rows: int) -> Unseen:
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
    return pooling.pool_bags(table, u.parts[order], offsets, weights), count


# ---------------------------------------------------------------- the head and the classifier

def head(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Logits of pooled vectors through the head's linear layers (weight, bias), ReLU between them."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def class_direction(layers: list[tuple[np.ndarray, np.ndarray]], c: int) -> np.ndarray:
    """How much a unit of pooled vector along each dimension adds to class ``c``'s logit: the head's
    row for a linear head; for one hidden ReLU layer its gradient at the zero vector
    (``W2[c] * [b1 > 0] @ W1``)."""
    if len(layers) == 1:
        return np.asarray(layers[0][0][c], np.float32)
    (w1, b1), (w2, _) = layers
    return ((w2[c] * (b1 > 0)) @ w1).astype(np.float32)


class Classifier:
    """Pooling and classifying with ``table`` (the learned patterns), ``plan`` (the slots, for
    composing unseen patches), ``head_layers`` (the head's (weight, bias) layers), ``bag`` (the
    training's bag reduction), ``training_images`` (for the ``knn`` vote) and ``unseen`` (the
    default unseen-patch rule)."""

    def __init__(self, table: PatternTable, plan: KeyPlan, head_layers: list[tuple[np.ndarray, np.ndarray]], bag: str,
                 training_images: TrainingImages, unseen: str):
        self.table = table
        self.plan = plan
        self.head_layers = head_layers
        self.bag = bag
        self.training_images = training_images
        self.unseen = check_unseen(unseen)

    def nearest_keys(self, keys: np.ndarray) -> tuple[np.ndarray, Unseen]:
        """``keys`` with each unseen patch's key replaced by its nearest learned pattern's key.

        The unseen patch's composed vector is searched in the pattern index; patches with no
        seen part keep their (unseen) key and so stay out of the bag.
        """
        vocab = self.table.vocab
        u = find_unseen(self.plan, vocab.rows_of(keys), vocab.size)
        vec = u.vectors(self.table.vectors)
        has = u.has
        out = np.array(keys, dtype=np.uint64, copy=True)
        if has.any():
            _, ids = self.table.search(vec[has], 1)
            ok = ids[:, 0] >= 0
            out[u.image[has][ok], u.slot[has][ok]] = vocab.keys[ids[ok, 0]]
        return out, u

    def pooled(self, keys: np.ndarray, unseen: str | None = None, weights: np.ndarray | None = None) -> np.ndarray:
        """Pooled image vectors (N x d float32, the model's bag reduction) for key arrays (N x K) with
        their weights (None = all 1); ``unseen`` says what unseen patches do (default :attr:`unseen`).
        Keys N x mK (an image's keys followed by those of m - 1 copies, e.g. its mirror's,
        :meth:`pipeline.query.run.Run.scoring_keys`) pool each image and its copies as one bag."""
        return self.pooled_own_and_all(keys, unseen, weights)[1]

    def pooled_own_and_all(self, keys: np.ndarray, unseen: str | None = None, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(:meth:`pooled` of each image's own keys, the first K of each row; :meth:`pooled` of all
        its keys), each key pooled once: what an image is (its look-ups, nearest images, familiarity)
        and what it is predicted from (with its copies). The same array twice for N x K keys."""
        unseen = check_unseen(unseen or self.unseen)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        k = self.plan.keys_per_image
        if keys.ndim != 2 or keys.shape[1] % k:
            raise ValueError(f"keys of shape {keys.shape} are not N x a multiple of the run's {k} keys per image")
        parts = [self._sums(keys[:, c : c + k], None if weights is None else weights[:, c : c + k], unseen) for c in range(0, keys.shape[1], k)]
        own = parts[0][0] / pooling.divisor(parts[0][1], self.bag)[:, None]
        if len(parts) == 1:
            return own, own
        sums, n = sum(s for s, _ in parts), sum(m for _, m in parts)
        return own, sums / pooling.divisor(n, self.bag)[:, None]

    def _sums(self, keys: np.ndarray, weights: np.ndarray | None, unseen: str) -> tuple[np.ndarray, np.ndarray]:
        """(summed weighted vectors, total weights) of each image's N x K keys."""
        keys = np.ascontiguousarray(keys)
        weights = None if weights is None else np.ascontiguousarray(weights)
        if unseen == "nearest":
            keys, _ = self.nearest_keys(keys)
        vocab, vectors = self.table.vocab, self.table.vectors
        rows, offsets, counts = vocab.bags(keys, weights)
        sums = pooling.pool_bags(vectors, rows, offsets, counts)
        n = pooling.bag_totals(counts, offsets)
        if unseen == "compose":
            u = find_unseen(self.plan, vocab.rows_of(keys), vocab.size)
            extra, m = composed_sums(u, vectors, len(keys))
            sums, n = sums + extra, n + m
        return sums, n

    def probabilities(self, pooled: np.ndarray, classifier: str = "head", k: int = 10) -> np.ndarray:
        """Class probabilities (N x C) of pooled vectors: ``classifier`` = ``head`` (the trained head)
        or ``knn`` (a vote of the ``k`` nearest training images; probabilities are vote shares)."""
        if classifier == "knn":
            return self._vote(np.asarray(pooled), k)
        if classifier != "head":
            raise ParameterError("classifier", f"{classifier!r} is not one of {', '.join(CLASSIFIERS)}")
        return softmax(head(self.head_layers, np.asarray(pooled, np.float32)))

    def predict_keys(self, keys: np.ndarray, unseen: str | None = None, classifier: str = "head", k: int = 10,
                     weights: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities (N x C) for key arrays (N x K) and their weights (None = all 1)."""
        return self.probabilities(self.pooled(keys, unseen, weights), classifier, k)

    def class_direction(self, c: int) -> np.ndarray:
        """How much a unit of pooled vector along each dimension adds to class ``c``'s logit
        (:func:`class_direction`)."""
        return class_direction(self.head_layers, c)

    def _vote(self, pooled: np.ndarray, k: int) -> np.ndarray:
        labels = self.training_images.nearest(pooled, k).labels
        probs = np.zeros((len(pooled), self.head_layers[-1][1].shape[0]), np.float64)
        for j in range(labels.shape[1]):
            ok = labels[:, j] >= 0
            # nearer neighbours break ties: weights 1, 1 - 1e-6, 1 - 2e-6, ...
            np.add.at(probs, (np.flatnonzero(ok), labels[ok, j]), 1.0 - 1e-6 * j)
        return (probs / np.maximum(probs.sum(1, keepdims=True), 1e-12)).astype(np.float32)
