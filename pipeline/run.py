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
from typing import Callable

import numpy as np
import torch

from . import index as pattern_index
from . import layout, patterns
from .config import ExtractConfig, TrainConfig
from .errors import PipelineError
from .hashing import KeyPlan
from .pixels import as_nhwc, to_channels
from .shards import Shards
from .sources import Source
from .bags import to_bags
from .trainer import RUN_FORMAT, build_model, evaluate_bags
from .vocab import Vocabulary


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


class Run:
    """A trained run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        mpath = self.root / layout.RUN_MANIFEST
        if not mpath.exists():
            raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
        self.manifest = layout.read_json(mpath)
        if self.manifest.get("format") != RUN_FORMAT:
            raise PipelineError(f"{root} is in format {self.manifest.get('format')!r}, expected {RUN_FORMAT!r}; train again")
        self.extract_config = ExtractConfig.from_dict(self.manifest["extract_config"])
        self.train_config = TrainConfig.from_dict(self.manifest["train_config"])
        self.fingerprint: str = self.manifest["extract_fingerprint"]
        if self.extract_config.fingerprint() != self.fingerprint:
            raise PipelineError(f"{mpath} is inconsistent (extract config does not match its fingerprint); train again")
        self.height: int = self.manifest["height"]
        self.width: int = self.manifest["width"]
        self.class_names: list[str] = self.manifest["class_names"]
        self.plan = KeyPlan(self.extract_config, self.height, self.width)
        self.vocab = Vocabulary.load(self.root / layout.VOCAB, self.manifest.get("vocabulary"))
        self.model = build_model(self.train_config, self.vocab.rows, len(self.class_names))
        state = torch.load(self.root / layout.MODEL, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    # ------------------------------------------------------------ lazily loaded parts

    @cached_property
    def patterns(self) -> dict[str, np.ndarray]:
        """Pattern metadata as numpy columns, row i = pattern id i."""
        return patterns.read(self.root / layout.PATTERNS)

    @cached_property
    def index(self):
        return pattern_index.load(self.root / layout.PATTERN_INDEX)

    @property
    def table(self) -> np.ndarray:
        return self.model.table.weight.detach().numpy()

    # ------------------------------------------------------------ keys and predictions

    def images_to_keys(self, images: np.ndarray) -> np.ndarray:
        """Keys (N x K) of uint8 images (N x H x W [x C], or one H x W x C image) hashed the run's way."""
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[:2] == (self.height, self.width):
            arr = arr[None]
        arr = as_nhwc(arr)
        if arr.shape[1:3] != (self.height, self.width):
            raise PipelineError(
                f"images are {arr.shape[1]}x{arr.shape[2]} but the run was trained on "
                f"{self.height}x{self.width}; resize them to {self.height}x{self.width}"
            )
        return self.plan.image_keys(to_channels(arr, self.extract_config.channels))

    def predict_keys(self, keys: np.ndarray) -> np.ndarray:
        """Class probabilities (N x C) for key arrays (N x K)."""
        rows, offsets, counts, _ = to_bags(self.vocab, keys, np.zeros(len(keys), np.int64)).tensors(torch.device("cpu"))
        with torch.no_grad():
            return torch.softmax(self.model(rows, offsets, counts), dim=1).numpy()

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels N, probabilities N x C) for uint8 images."""
        probs = self.predict_keys(self.images_to_keys(images))
        return probs.argmax(1), probs

    # ------------------------------------------------------------ patterns

    def seen_ids(self, keys: np.ndarray) -> np.ndarray:
        """Pattern id of each key (its vocabulary row), -1 for keys outside the vocabulary."""
        rows = self.vocab.rows_of(keys)
        return np.where(rows < self.vocab.size, rows, -1)

    def patch_vectors(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectors for the K slots of one image's keys: (vectors K x d, seen, composed).

        A key in the vocabulary uses its learned vector. Any other key gets the mean of the
        learned vectors of its seen strictly smaller sub-patches (same position mode),
        fastText's rule for unknown words applied to rectangles; with no seen sub-patch it has
        no vector (NaN).
        """
        rows = self.vocab.rows_of(keys)
        seen = (rows >= 0) & (rows < self.vocab.size)
        vectors = np.where(seen[:, None], self.table[np.maximum(rows, 0)], np.nan).astype(np.float32)
        composed = np.zeros(len(keys), bool)
        for slot in np.flatnonzero(~seen):
            subs = self.plan.sub_slots(int(slot))
            subs = subs[seen[subs]]
            if len(subs):
                vectors[slot] = self.table[rows[subs]].mean(0)
                composed[slot] = True
            else:
                vectors[slot] = np.nan
        return vectors, seen, composed

    def nearest_patterns(self, image: np.ndarray, k: int = 5, top: int | None = None) -> PatchLookup:
        """The k nearest learned patterns of the patches of one image (see :class:`PatchLookup`).

        ``top`` = None looks up every patch; ``top`` = N only the N patches contributing most
        to the predicted class's logit, in that order (the search is the costly part).
        """
        if k < 1:
            raise PipelineError(f"--k {k} must be at least 1")
        keys = self.images_to_keys(image)
        if len(keys) != 1:
            raise PipelineError("nearest_patterns takes one image; call it once per image")
        keys = keys[0]
        vectors, seen, composed = self.patch_vectors(keys)
        has = seen | composed
        probs = self.predict_keys(keys[None])[0]
        contribution = np.where(has, np.nan_to_num(vectors) @ self._class_direction(int(probs.argmax())) / len(keys), 0.0)
        slots = np.arange(len(keys)) if top is None else np.argsort(-contribution, kind="stable")[:top]
        d = np.full((len(slots), k), np.inf, np.float32)
        ids = np.full((len(slots), k), -1, np.int64)
        sel = has[slots]
        d[sel], ids[sel] = pattern_index.search(self.index, vectors[slots[sel]], k)
        counts = {"total": len(keys), "seen": int(seen.sum()), "composed": int(composed.sum()), "unmatched": int((~has).sum())}
        return PatchLookup(
            slots, d, ids, seen[slots], composed[slots], self.plan.locate(slots), keys[slots], contribution[slots], counts, probs
        )

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

    def evaluate(self, data: Source | Shards, progress: Callable[[int], None] | None = None) -> dict:
        """Accuracy and loss of the run on an image source (hashed with the run's config) or on shards."""
        if isinstance(data, Shards):
            data.check_fingerprint(self.fingerprint, f"run {self.root}")
            mapping = self._label_map(data.class_names, str(data.root))

            def batches():
                for b in data.iter_batches():
                    if progress:
                        progress(len(b.labels))
                    yield to_bags(self.vocab, b.keys, mapping[b.labels])
        else:
            mapping = self._label_map(data.class_names, data.path)

            def batches():
                for b in data.batches(256, self.extract_config.channels, self.extract_config.resize):
                    if progress:
                        progress(len(b.labels))
                    yield to_bags(self.vocab, self.images_to_keys(b.images), mapping[b.labels])

        res = evaluate_bags(self.model, batches(), torch.device("cpu"))
        return {"accuracy": res["accuracy"], "loss": res["loss"], "n": res["n"]}


def load(root: Path | str) -> Run:
    """Open a trained run directory."""
    return Run(root)
