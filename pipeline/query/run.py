"""Stage 3: a trained run, loaded from its directory alone, answering predictions and pattern look-ups.

``run = pipeline.load("artifacts/run")`` then ``run.predict(images)``,
``run.nearest_patterns(image, k)`` and ``run.evaluate(source)``. Nothing is
unpickled: the model loads with ``torch.load(weights_only=True)``, the rest is
JSON, Parquet and a FAISS index.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import index as pattern_index
from pipeline import layout, patterns
from pipeline.query import unseen
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.extraction.codes import Dictionary
from pipeline.extraction.hashing import KeyPlan
from pipeline.data.pixels import as_nhwc, to_channels
from pipeline.extraction.shards import KeyBatch, Shards
from pipeline.data.sources import Source
from pipeline.training.bags import to_bags
from pipeline.layout import RUN_FORMAT
from pipeline.model import bag_divisor, bag_totals, build_model
from pipeline import torchfiles
from pipeline.training.vocab import Vocabulary


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


@dataclass
class ImageLookup:
    """Nearest training images of query images; every array is N x k."""

    distances: np.ndarray  # squared L2 between pooled vectors
    ids: np.ndarray  # rows of the image index (-1 where fewer than k)
    image_ids: np.ndarray  # the training images' ids in their shards / source order
    labels: np.ndarray  # their class indices


class Run:
    """A trained run directory."""

    def __init__(self, root: Path | str, unseen_rule: str | None = None):
        self.root = Path(root)
        mpath = self.root / layout.RUN_MANIFEST
        if not mpath.exists():
            raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
        try:
            self.manifest = layout.read_json(mpath)
        except (ValueError, OSError) as e:
            raise PipelineError(f"{mpath} is not valid JSON ({e}); train the run again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != RUN_FORMAT:
            got = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise PipelineError(f"{root} is in format {got!r}, expected {RUN_FORMAT!r}; train again")
        try:
            self.extract_config = ExtractConfig.from_dict(self.manifest["extract_config"])
            self.train_config = TrainConfig.from_dict(self.manifest["train_config"])
            self.fingerprint: str = str(self.manifest["extract_fingerprint"])
            self.height: int = int(self.manifest["height"])
            self.width: int = int(self.manifest["width"])
            self.class_names: list[str] = [str(c) for c in self.manifest["class_names"]]
            self.index_info = pattern_index.IndexInfo.from_dict(self.manifest["index"])
            self.image_index_info = pattern_index.IndexInfo.from_dict(self.manifest["image_index"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PipelineError(f"{mpath} is damaged ({e.__class__.__name__}: {e}); train the run again") from None
        if self.extract_config.fingerprint() != self.fingerprint:
            raise PipelineError(f"{mpath} is inconsistent (extract config does not match its fingerprint); train again")
        self.dictionary = (
            Dictionary.load(self.root / layout.DICTIONARY, self.extract_config.dictionary) if self.extract_config.has_code else None
        )
        self.plan = KeyPlan(self.extract_config, self.height, self.width, self.dictionary)
        self.vocab = Vocabulary.load(self.root / layout.VOCAB, self.manifest.get("vocabulary"))
        if self.index_info.vectors != self.vocab.size:
            raise PipelineError(f"{mpath} records {self.index_info.vectors:,} indexed patterns but the vocabulary has {self.vocab.size:,}; train the run again")
        self.model = build_model(self.train_config, self.vocab.rows, len(self.class_names))
        state = torchfiles.load(self.root / layout.MODEL, "train the run again")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[-1].strip()
            raise PipelineError(f"{self.root / layout.MODEL} does not fit this run's vocabulary and settings ({first}); train the run again") from None
        self.model.eval()
        self.unseen_rule = unseen.check_rule(unseen_rule or unseen.DEFAULT_RULE)

    # ------------------------------------------------------------ lazily loaded parts

    @cached_property
    def patterns(self) -> dict[str, np.ndarray]:
        """Pattern metadata as numpy columns, row i = pattern id i."""
        return patterns.read(self.root / layout.PATTERNS)

    @cached_property
    def index(self):
        """The pattern index (memory-mapped); ``nprobe`` / ``ef_search`` as recorded, see :meth:`tune`."""
        return pattern_index.load(self.root / layout.PATTERN_INDEX, self.index_info, check=True)

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the pattern index's query-time knobs (recall against speed) for this session."""
        pattern_index.apply_params(self.index, nprobe, ef_search)

    @cached_property
    def image_index(self):
        idx = pattern_index.load(self.root / layout.IMAGE_INDEX, self.image_index_info, check=True)
        if idx.ntotal != len(self.images["image_id"]):
            raise PipelineError(f"{self.root / layout.IMAGE_INDEX} holds {idx.ntotal:,} images but {layout.IMAGES} lists {len(self.images['image_id']):,}; train the run again")
        return idx

    @cached_property
    def images(self) -> dict[str, np.ndarray]:
        """The training images of the image index: ``image_id`` and ``label``, row i = index id i."""
        path = self.root / layout.IMAGES
        if not path.exists():
            raise PipelineError(f"{path} is missing; the run is incomplete or from an older version: train it again")
        t = pq.read_table(path)
        return {c: t.column(c).to_numpy() for c in t.column_names}

    def view_name(self, view: int) -> str:
        """The name of view ``view`` of a slot (``locate()``'s ``view``): an exact view of ``--views``, or ``code``."""
        views = [] if self.extract_config.views == "none" else self.extract_config.views.split(",")
        return views[view] if view < len(views) else "code"

    @property
    def table(self) -> np.ndarray:
        return self.model.table.weight.detach().numpy()

    # ------------------------------------------------------------ keys and predictions

    def images_to_keys(self, images: np.ndarray) -> np.ndarray:
        """Keys (N x K) of uint8 images (N x H x W [x C], or one H x W x C image) hashed the run's way."""
        return self.encode(images)[0]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Keys (N x K) of uint8 images hashed the run's way, and their weights (N x K float32; None
        when every key weighs 1, i.e. the run has no code view)."""
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[:2] == (self.height, self.width):
            arr = arr[None]
        arr = as_nhwc(arr)
        if arr.shape[1:3] != (self.height, self.width):
            raise PipelineError(
                f"images are {arr.shape[1]}x{arr.shape[2]} but the run was trained on "
                f"{self.height}x{self.width}; resize them to {self.height}x{self.width}"
            )
        return self.plan.encode(to_channels(arr, self.extract_config.channels))

    def nearest_keys(self, keys: np.ndarray) -> tuple[np.ndarray, unseen.Unseen]:
        """``keys`` with each unseen patch's key replaced by its nearest learned pattern's key.

        The unseen patch's composed vector is searched in the pattern index; patches with no
        seen part keep their (unseen) key and so stay out of the bag.
        """
        u = unseen.find(self.plan, self.vocab.rows_of(keys), self.vocab.size)
        vec = u.vectors(self.model.table.weight.detach())
        has = u.has
        out = np.array(keys, dtype=np.uint64, copy=True)
        if has.any():
            _, ids = pattern_index.search(self.index, vec[has], 1)
            ok = ids[:, 0] >= 0
            out[u.image[has][ok], u.slot[has][ok]] = self.vocab.keys[ids[ok, 0]]
        return out, u

    def pooled_keys(self, keys: np.ndarray, rule: str | None = None, weights: np.ndarray | None = None) -> torch.Tensor:
        """Pooled image vectors (N x d, the model's bag reduction) for key arrays (N x K) with their
        weights (from :meth:`encode`; None = all 1).

        ``rule`` says what unseen patches do (:mod:`pipeline.query.unseen`); default: the run's
        :attr:`unseen_rule`.
        """
        rule = unseen.check_rule(rule or self.unseen_rule)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if rule == "nearest":
            keys, _ = self.nearest_keys(keys)
        b = to_bags(self.vocab, keys, np.zeros(len(keys), np.int64), weights)
        rows, offsets, counts, _ = b.tensors(torch.device("cpu"))
        weight = self.model.table.weight.detach()
        with torch.no_grad():
            sums = torch.nn.functional.embedding_bag(rows, weight, offsets[:-1], mode="sum", per_sample_weights=counts)
            n = bag_totals(counts, offsets)
            if rule == "compose":
                u = unseen.find(self.plan, self.vocab.rows_of(keys), self.vocab.size)
                extra, m = unseen.composed_sums(u, weight, len(keys))
                sums, n = sums + extra, n + m
        return sums / bag_divisor(n, self.train_config.bag)[:, None]

    def predict_keys(
        self, keys: np.ndarray, rule: str | None = None, classifier: str = "head", k: int = 10, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities (N x C) for key arrays (N x K) and their weights (None = all 1).

        ``classifier`` = ``head`` (the trained linear head) or ``knn`` (a vote of the ``k``
        nearest training images by pooled vector; probabilities are vote shares).
        """
        return self.classify_pooled(self.pooled_keys(keys, rule, weights), classifier, k)

    def classify_pooled(self, pooled: torch.Tensor, classifier: str = "head", k: int = 10) -> np.ndarray:
        """Class probabilities (N x C) of pooled vectors (see :meth:`predict_keys`)."""
        if classifier == "knn":
            return self._vote(pooled.numpy(), k)
        if classifier != "head":
            raise PipelineError(f"--classifier {classifier!r} is not one of head, knn")
        with torch.no_grad():
            return torch.softmax(self.model.head(pooled), dim=1).numpy()

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

    # ------------------------------------------------------------ patterns

    def seen_ids(self, keys: np.ndarray) -> np.ndarray:
        """Pattern id of each key (its vocabulary row), -1 for keys outside the vocabulary."""
        rows = self.vocab.rows_of(keys)
        return np.where(rows < self.vocab.size, rows, -1)

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
        vectors[u.slot] = u.vectors(self.model.table.weight.detach())
        composed = np.zeros(len(keys), bool)
        composed[u.slot[u.has]] = True
        return vectors, seen, composed

    def nearest_images(self, images: np.ndarray, k: int = 5, rule: str | None = None) -> ImageLookup:
        """The k nearest training images of each image by pooled vector."""
        if k < 1:
            raise PipelineError(f"--k {k} must be at least 1")
        keys, weights = self.encode(images)
        return self.neighbours(self.pooled_keys(keys, rule, weights).numpy(), k)

    def neighbours(self, pooled: np.ndarray, k: int) -> ImageLookup:
        """The k nearest training images of pooled vectors (N x d, from :meth:`pooled_keys`)."""
        d, ids = pattern_index.search(self.image_index, pooled, k)
        safe = np.maximum(ids, 0)
        return ImageLookup(
            d, ids, np.where(ids >= 0, self.images["image_id"][safe], -1), np.where(ids >= 0, self.images["label"][safe], -1)
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
            raise PipelineError(f"--k {k} must be at least 1")
        arr = np.asarray(patches_or_image)
        if arr.ndim == 1 and arr.dtype == np.uint64:
            pid = self.seen_ids(arr)
            d = np.full((len(arr), k), np.inf, np.float32)
            ids = np.full((len(arr), k), -1, np.int64)
            ok = pid >= 0
            d[ok], ids[ok] = pattern_index.search(self.index, self.table[pid[ok]], k)
            return d, ids
        keys, weights = self.encode(arr)
        if len(keys) != 1:
            raise PipelineError("nearest_patterns takes one image; call it once per image")
        w = None if weights is None else weights[0]
        return self.lookup_keys(keys[0], self.predict_keys(keys, weights=weights)[0], k, top, w)

    def lookup_keys(self, keys: np.ndarray, probs: np.ndarray, k: int, top: int | None, weights: np.ndarray | None = None) -> PatchLookup:
        """:meth:`nearest_patterns` for one image's keys (K) and weights whose class probabilities are known."""
        vectors, seen, composed = self.patch_vectors(keys)
        has = seen | composed
        w = np.ones(len(keys), np.float32) if weights is None else weights
        share = w / max(float(w.sum()), 1e-12)
        contribution = np.where(has, np.nan_to_num(vectors) @ self._class_direction(int(probs.argmax())) * share, 0.0)
        slots = np.arange(len(keys)) if top is None else np.argsort(-contribution, kind="stable")[:top]
        d = np.full((len(slots), k), np.inf, np.float32)
        ids = np.full((len(slots), k), -1, np.int64)
        sel = has[slots]
        d[sel], ids[sel] = pattern_index.search(self.index, vectors[slots[sel]], k)
        counts = {"total": len(keys), "seen": int(seen.sum()), "composed": int(composed.sum()), "unmatched": int((~has).sum())}
        return PatchLookup(
            slots, d, ids, seen[slots], composed[slots], self.plan.locate(slots), keys[slots], contribution[slots], counts, probs
        )

    def pattern_pixels(self, ids: np.ndarray) -> list[np.ndarray | None]:
        """Example pixels (h x w x C uint8) of patterns ``ids`` as first seen in training; None where unknown."""
        ids = np.asarray(ids, np.int64)
        p = self.patterns
        return patterns.pixels(self.root / layout.PATTERNS, ids, p["h"][ids], p["w"][ids], self.extract_config.channels)

    def _class_direction(self, c: int) -> np.ndarray:
        """How much a unit of pooled vector along each dimension adds to class ``c``'s logit.

        Exact for a linear head; for a hidden layer, the gradient of the logit at the zero vector.
        """
        if self.train_config.hidden == 0:
            return self.model.head.weight.detach().numpy()[c]
        x = torch.zeros(1, self.train_config.dim, requires_grad=True)
        self.model.head(x)[0, c].backward()
        return x.grad[0].numpy()

    # ------------------------------------------------------------ evaluation

    def _label_map(self, class_names: list[str], where: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in class_names if c not in index]
        if missing:
            raise PipelineError(f"{where} has classes the run does not know: {', '.join(missing[:5])}; evaluate on the same classes")
        return np.asarray([index[c] for c in class_names] + [-1], dtype=np.int64)  # last entry maps label -1

    def key_batches(self, data: Source | Shards, batch_size: int = 256, progress: Callable[[int], None] | None = None) -> Iterator[KeyBatch]:
        """Keys of every image of ``data`` (a source, hashed the run's way, or shards extracted with
        the run's config) in batches, labels mapped to the run's classes (-1 when unknown)."""
        if isinstance(data, Shards):
            data.check_fingerprint(self.fingerprint, f"run {self.root}")
            mapping = self._label_map(data.class_names, str(data.root))
            for b in data.iter_batches(names=True):
                for i in range(0, len(b.labels), batch_size):
                    sl = slice(i, i + batch_size)
                    if progress:
                        progress(len(b.labels[sl]))
                    w = None if b.weights is None else b.weights[sl]
                    yield KeyBatch(b.image_ids[sl], mapping[b.labels[sl]], b.keys[sl], b.names[sl], w)
            return
        mapping = self._label_map(data.class_names, data.path)
        for b in data.batches(batch_size, self.extract_config.channels, self.extract_config.resize):
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
    ) -> dict:
        """Accuracy and loss (mean negative log probability) of the run on ``data`` (see :meth:`key_batches`)."""
        loss_sum, correct, n = 0.0, 0, 0
        for b in self.key_batches(data, progress=progress):
            ok = b.labels >= 0
            if not ok.any():
                continue
            probs = self.predict_keys(b.keys[ok], rule, classifier, k, None if b.weights is None else b.weights[ok])
            y = b.labels[ok]
            loss_sum += float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).sum())
            correct += int((probs.argmax(1) == y).sum())
            n += len(y)
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


def load(root: Path | str, unseen_rule: str | None = None) -> Run:
    """Open a trained run directory; ``unseen_rule`` says what unseen patches do in predictions."""
    return Run(root, unseen_rule)
