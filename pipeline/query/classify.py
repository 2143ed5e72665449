"""Classifying with a loaded run: pooled image vectors under each unseen-patch rule, the trained
head or the nearest-training-images vote, and evaluation over a source or shards.

A mixin of :class:`pipeline.query.run.Run`, which holds what it reads: the plan, vocabulary,
model and indexes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from pipeline.config import check_resize
from pipeline.data.augment import is_original
from pipeline.data.sources import Source
from pipeline.data.split import is_validation
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.shards import KeyBatch, Shards
from pipeline.query import pooling, unseen
from pipeline.query.files import read_image


class Classify:
    """Predictions and evaluation of a run (see :class:`pipeline.query.run.Run`)."""

    def nearest_keys(self, keys: np.ndarray) -> tuple[np.ndarray, unseen.Unseen]:
        """``keys`` with each unseen patch's key replaced by its nearest learned pattern's key.

        The unseen patch's composed vector is searched in the pattern index; patches with no
        seen part keep their (unseen) key and so stay out of the bag.
        """
        u = unseen.find(self.plan, self.vocab.rows_of(keys), self.vocab.size)
        vec = u.vectors(self.table)
        has = u.has
        out = np.array(keys, dtype=np.uint64, copy=True)
        if has.any():
            _, ids = self.search_patterns(vec[has], 1)
            ok = ids[:, 0] >= 0
            out[u.image[has][ok], u.slot[has][ok]] = self.vocab.keys[ids[ok, 0]]
        return out, u

    def pooled_keys(self, keys: np.ndarray, rule: str | None = None, weights: np.ndarray | None = None) -> np.ndarray:
        """Pooled image vectors (N x d float32, the model's bag reduction) for key arrays (N x K) with
        their weights (from :meth:`encode`; None = all 1).

        ``rule`` says what unseen patches do (:mod:`pipeline.query.unseen`); default: the run's
        :attr:`unseen_rule`.
        """
        rule = unseen.check_rule(rule or self.unseen_rule)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if rule == "nearest":
            keys, _ = self.nearest_keys(keys)
        rows, offsets, counts = self.vocab.bags(keys, weights)
        sums = pooling.pool(self.table, rows, offsets, counts)
        n = pooling.bag_totals(counts, offsets)
        if rule == "compose":
            u = unseen.find(self.plan, self.vocab.rows_of(keys), self.vocab.size)
            extra, m = unseen.composed_sums(u, self.table, len(keys))
            sums, n = sums + extra, n + m
        return sums / pooling.divisor(n, self.train_config.bag)[:, None]

    def predict_keys(
        self, keys: np.ndarray, rule: str | None = None, classifier: str = "head", k: int = 10, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities (N x C) for key arrays (N x K) and their weights (None = all 1).

        ``classifier`` = ``head`` (the trained linear head) or ``knn`` (a vote of the ``k``
        nearest training images by pooled vector; probabilities are vote shares).
        """
        return self.classify_pooled(self.pooled_keys(keys, rule, weights), classifier, k)

    def classify_pooled(self, pooled: np.ndarray, classifier: str = "head", k: int = 10) -> np.ndarray:
        """Class probabilities (N x C) of pooled vectors (see :meth:`predict_keys`)."""
        if classifier == "knn":
            return self._vote(np.asarray(pooled), k)
        if classifier != "head":
            raise ParameterError("classifier", f"{classifier!r} is not one of head, knn")
        return pooling.softmax(pooling.head(self.head_layers, np.asarray(pooled, np.float32)))

    def _vote(self, pooled: np.ndarray, k: int) -> np.ndarray:
        labels = self.neighbours(pooled, k).labels
        probs = np.zeros((len(pooled), len(self.class_names)), np.float64)
        for j in range(labels.shape[1]):
            ok = labels[:, j] >= 0
            # nearer neighbours break ties: weights 1, 1 - 1e-6, 1 - 2e-6, ...
            np.add.at(probs, (np.flatnonzero(ok), labels[ok, j]), 1.0 - 1e-6 * j)
        return (probs / np.maximum(probs.sum(1, keepdims=True), 1e-12)).astype(np.float32)

    def predict(self, images: np.ndarray, rule: str | None = None, classifier: str = "head") -> tuple[np.ndarray, np.ndarray]:
        """(labels N, probabilities N x C) for uint8 images."""
        keys, weights = self.encode(images)
        probs = self.predict_keys(keys, rule, classifier, weights=weights)
        return probs.argmax(1), probs

    def predict_files(self, paths, resize: tuple[int, int] | None = None, rule: str | None = None, classifier: str = "head") -> list[dict]:
        """One answer per image file: ``{"file", "prediction"`` (the class name), ``"probabilities"``
        ({class name: p}), ``"familiarity"`` (docs/query.md), ``"notes"`` (how the file was
        converted or fitted to the run's size)}``. Files are read as ``pipe query`` reads them."""
        out = []
        for path in paths:
            notes: list[str] = []
            img = read_image(self, path, resize, notes)
            keys, weights = self.encode(img)
            pooled = self.pooled_keys(keys, rule, weights)
            probs = self.classify_pooled(pooled, classifier)[0]
            fam = self.familiarity_keys(keys, weights, pooled, rule=rule)
            out.append({"file": str(path), "prediction": self.class_names[int(probs.argmax())],
                        "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
                        "familiarity": None if fam is None else float(fam[0]), "notes": notes})
        return out

    def _label_map(self, class_names: list[str], where: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in class_names if c not in index]
        if missing:
            raise PipelineError(f"{where} has classes the run does not know: {', '.join(missing[:5])}; evaluate on the same classes")
        return np.asarray([index[c] for c in class_names] + [-1], dtype=np.int64)  # last entry maps label -1

    def key_batches(
        self, data: Source | Shards, batch_size: int = 256, progress: Callable[[int], None] | None = None, resize: tuple[int, int] | None = None,
    ) -> Iterator[KeyBatch]:
        """Keys of every image of ``data`` (a source, hashed the run's way, or shards extracted with
        the run's config) in batches, labels mapped to the run's classes (-1 when unknown). A
        source's images are resized to ``resize`` (default: the run's own ``--resize``; without one, an
        image of another size than the run's is fitted to it, :func:`pipeline.data.images.fit_array`). Of shards,
        only the original images: the augmented copies an extract wrote for training are left out."""
        if resize is not None and isinstance(data, Shards):
            raise ParameterError("resize", "changes images of a source; shards hold keys already made, so leave it out")
        if resize is not None:
            check_resize(resize)
        if isinstance(data, Shards):
            data.check_fingerprint(self.fingerprint, f"run {self.root}")
            mapping = self._label_map(data.class_names, str(data.root))
            for b in data.iter_batches(names=True):
                keep = np.flatnonzero(is_original(b.image_ids))
                for i in range(0, len(keep), batch_size):
                    sl = keep[i : i + batch_size]
                    if progress:
                        progress(len(sl))
                    w = None if b.weights is None else b.weights[sl]
                    yield KeyBatch(b.image_ids[sl], mapping[b.labels[sl]], b.keys[sl], [b.names[j] for j in sl], w)
            return
        mapping = self._label_map(data.class_names, data.path)
        for b in data.batches(batch_size, self.extract_config.channels, resize or self.extract_config.resize, fit=(self.height, self.width)):
            if progress:
                progress(len(b.labels))
            keys, weights = self.encode(b.images)
            yield KeyBatch(b.ids, mapping[b.labels], keys, b.names, weights)

    def evaluate(
        self,
        data: Source | Shards,
        progress: Callable[[int], None] | None = None,
        rule: str | None = None,
        classifier: str = "head",
        k: int = 10,
        validation: bool = False,
        resize: tuple[int, int] | None = None,
    ) -> dict:
        """Accuracy and loss (mean negative log probability) of the run on ``data`` (see
        :meth:`key_batches`), per-class accuracy and the confusion matrix (``confusion[i][j]``:
        images of class i predicted as j). ``validation`` keeps only the images the run's
        training held out (original images of shards, chosen as training chose them)."""
        if validation and self.manifest.get("refit"):
            raise PipelineError(
                f"{self.root} trained again on every image once its held-out part had chosen the epoch count (refit), so no image is "
                f"held out any more; its held-out accuracy before that, {self.manifest['final']['val_accuracy']:.4f}, is in run.json "
                "(train with `refit` off to keep a held-out part)")
        c = len(self.class_names)
        confusion = np.zeros((c, c), np.int64)
        loss_sum = 0.0
        for b in self.key_batches(data, progress=progress, resize=resize):
            ok = b.labels >= 0
            if validation:
                ok &= is_validation(b.image_ids, self.train_config.val_fraction) & is_original(b.image_ids)
            if not ok.any():
                continue
            probs = self.predict_keys(b.keys[ok], rule, classifier, k, None if b.weights is None else b.weights[ok])
            y = b.labels[ok]
            loss_sum += float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).sum())
            np.add.at(confusion, (y, probs.argmax(1)), 1)
        n = int(confusion.sum())
        per_class = {name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None) for i, name in enumerate(self.class_names)}
        fitted = getattr(data, "fitted", 0)
        return {"accuracy": float(np.trace(confusion)) / max(n, 1), "loss": loss_sum / max(n, 1), "n": n,
                "per_class": per_class, "confusion": confusion.tolist(), **({"fitted": fitted} if fitted else {})}

    def validation_shards(self) -> Shards:
        """The shards this run was trained on (for scoring its held-out part)."""
        where = self.manifest.get("shards")
        try:
            return Shards(where)
        except PipelineError as e:
            raise PipelineError(f"the run's training shards ({where}) cannot be read, so its held-out part cannot be scored: {e}") from None
