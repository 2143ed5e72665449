"""Classifying pooled patterns: an image's keys pooled into one vector through the run's table
(each unseen-patch rule), then the trained head (its layers in numpy: no torch at query time) or a
vote of the nearest training images.

:class:`pipeline.query.run.Run` holds one as ``run.classifier``.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import ParameterError
from pipeline.extraction.hashing import KeyPlan
from pipeline.query import unseen_patches
from pipeline.table import pooling
from pipeline.query.training_images import TrainingImages
from pipeline.table.loaded import PatternTable

CLASSIFIERS = ("head", "knn")


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
        self.unseen = unseen_patches.check(unseen)

    def nearest_keys(self, keys: np.ndarray) -> tuple[np.ndarray, unseen_patches.Unseen]:
        """``keys`` with each unseen patch's key replaced by its nearest learned pattern's key.

        The unseen patch's composed vector is searched in the pattern index; patches with no
        seen part keep their (unseen) key and so stay out of the bag.
        """
        vocab = self.table.vocab
        u = unseen_patches.find(self.plan, vocab.rows_of(keys), vocab.size)
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
        their weights (None = all 1); ``unseen`` says what unseen patches do (default :attr:`unseen`)."""
        unseen = unseen_patches.check(unseen or self.unseen)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if unseen == "nearest":
            keys, _ = self.nearest_keys(keys)
        vocab, vectors = self.table.vocab, self.table.vectors
        rows, offsets, counts = vocab.bags(keys, weights)
        sums = pooling.pool_bags(vectors, rows, offsets, counts)
        n = pooling.bag_totals(counts, offsets)
        if unseen == "compose":
            u = unseen_patches.find(self.plan, vocab.rows_of(keys), vocab.size)
            extra, m = unseen_patches.composed_sums(u, vectors, len(keys))
            sums, n = sums + extra, n + m
        return sums / pooling.divisor(n, self.bag)[:, None]

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
