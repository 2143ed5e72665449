"""Stage 3: a trained run, loaded from its directory alone, answering predictions and pattern look-ups.

``run = pipeline.load("artifacts/run")`` then ``run.predict(images)``,
``run.nearest_patterns(image, k)`` and ``run.evaluate(source)``. Nothing is
unpickled and torch is never imported: the weights are memory-mapped from
``model.safetensors`` (:mod:`pipeline.table.weights`), the rest is JSON, Parquet and
FAISS indexes.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table import index as pattern_index
from pipeline import familiarity, layout
from pipeline.table import patterns, weights
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.images import MAX_PIXELS
from pipeline.data.pixels import as_nhwc, to_channels
from pipeline.errors import PipelineError
from pipeline.extraction.codes import Dictionary
from pipeline.extraction.hashing import KeyPlan
from pipeline.layout import RUN_FORMAT
from pipeline.query import unseen
from pipeline.query.classify import Classify
from pipeline.query.lookup import ImageLookup, LookUp, PatchLookup
from pipeline.table.vocab import Vocabulary

__all__ = ["Run", "load", "PatchLookup", "ImageLookup"]

MAX_SIDE = 1 << 16  # image sides a run records; more is a damaged run.json
RUN_FILES = (layout.VOCAB, layout.WEIGHTS, layout.PATTERNS, layout.IMAGES, layout.PATTERN_INDEX, layout.IMAGE_INDEX, layout.DICTIONARY)


def head_names(hidden: int) -> list[str]:
    """The head's tensors in ``model.safetensors``: a linear head's weight and bias, or (``hidden`` > 0)
    both layers' around the ReLU."""
    return ["head.weight", "head.bias"] if hidden == 0 else ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]


def _identity(path: Path) -> tuple:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Run(Classify, LookUp):
    """A trained run directory, loaded: its configs, plan, vocabulary, model and (on first use)
    pattern table and indexes. Classifying is :class:`Classify`'s, looking up :class:`LookUp`'s."""

    def __init__(self, root: Path | str, unseen_rule: str | None = None):
        self.root = Path(root)
        mpath = self.root / layout.RUN_MANIFEST
        if not mpath.exists() and not mpath.is_symlink():
            raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
        self._identity = _identity(mpath)
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
        if not (1 <= self.height <= MAX_SIDE and 1 <= self.width <= MAX_SIDE and self.height * self.width <= MAX_PIXELS) or not self.class_names:
            raise PipelineError(f"{mpath} is damaged (images of {self.height}x{self.width}, {len(self.class_names)} classes); train the run again")
        for name in RUN_FILES:  # a missing one is reported by whatever needs it
            path = self.root / name
            if path.exists() or path.is_symlink():
                layout.regular_file(path, "the run is damaged: train it again")
        if self.extract_config.fingerprint() != self.fingerprint:
            raise PipelineError(f"{mpath} is inconsistent (extract config does not match its fingerprint); train again")
        self.dictionary = (
            Dictionary.load(self.root / layout.DICTIONARY, self.extract_config.dictionary) if self.extract_config.has_code else None
        )
        self.plan = KeyPlan(self.extract_config, self.height, self.width, self.dictionary)
        self.vocab = Vocabulary.load(self.root / layout.VOCAB, self.manifest.get("vocabulary"))
        if self.index_info.vectors != self.vocab.size:
            raise PipelineError(f"{mpath} records {self.index_info.vectors:,} indexed patterns but the vocabulary has {self.vocab.size:,}; train the run again")
        self.weights = weights.load(self.root / layout.WEIGHTS, "train the run again")
        self._table, self.head_layers = self._check_weights()
        self.unseen_rule = unseen.check_rule(unseen_rule or unseen.DEFAULT_RULE)
        self._near_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # learned key -> its nearest patterns (lookup.py)
        self._pushes: dict[int, np.ndarray] = {}  # class -> every table row's push on its logit (lookup.py)
        self.moved = np.zeros(0, np.int64)  # rows changed in memory since loading (learn), ascending
        # the tables are opened now (their footers read), so the whole run is the files present at load
        for name in (layout.PATTERNS, layout.IMAGES):
            if (self.root / name).exists():
                getattr(self, "pattern_file" if name == layout.PATTERNS else "image_file")

    def __repr__(self) -> str:
        return (f"Run({str(self.root)!r}: {len(self.class_names)} classes, {self.height}x{self.width}x{self.extract_config.channels} images, "
                f"{self.vocab.size:,} patterns)")

    def check_unchanged(self) -> None:
        """Raise :class:`PipelineError` when the run directory was trained again (or its manifest
        replaced) after it was loaded: files opened from now on would belong to another run."""
        if _identity(self.root / layout.RUN_MANIFEST) != self._identity:
            raise PipelineError(f"{self.root} was replaced on disk after it was loaded (trained again?); load it again")

    @cached_property
    def patterns(self) -> dict[str, np.ndarray]:
        """The whole pattern table's metadata as numpy columns, row i = pattern id i (a query
        needs only :meth:`pattern_rows`)."""
        return patterns.read(self.pattern_file)

    @cached_property
    def pattern_file(self) -> pq.ParquetFile:
        return self._parquet(layout.PATTERNS, self.vocab.size, "patterns")

    @cached_property
    def image_file(self) -> pq.ParquetFile:
        return self._parquet(layout.IMAGES, self.image_index_info.vectors, "indexed images")

    def _parquet(self, name: str, rows: int, what: str) -> pq.ParquetFile:
        """The Parquet table ``name``, opened, with ``rows`` rows (one per {what} of the run)."""
        path = self.root / name
        if not path.exists():
            raise PipelineError(f"{path} is missing; the run is incomplete or from an older version: train it again")
        self.check_unchanged()
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise PipelineError(f"{path} is not a readable Parquet file ({e.__class__.__name__}); train the run again") from None
        if pf.metadata.num_rows != rows:
            raise PipelineError(f"{path} has {pf.metadata.num_rows:,} rows but the run has {rows:,} {what}; train the run again")
        return pf

    def pattern_rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Metadata of patterns ``ids`` (numpy columns parallel to ``ids``): from :attr:`patterns` once
        that is loaded (a server loads it), else read from their row groups only."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if "patterns" in self.__dict__:
            if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab.size):
                raise IndexError(f"pattern ids must lie in 0..{self.vocab.size - 1}")
            return {c: v[ids] for c, v in self.patterns.items()}
        names = [c for c in self.pattern_file.schema_arrow.names if c != "example_pixels"]
        return patterns.columns(patterns.rows(self.pattern_file, ids, names))

    @cached_property
    def index(self):
        """The pattern index (memory-mapped); ``nprobe`` / ``ef_search`` as recorded, see :meth:`tune`."""
        self.check_unchanged()
        return pattern_index.load(self.root / layout.PATTERN_INDEX, self.index_info, check=True)

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the pattern index's query-time knobs (recall against speed) for this session."""
        pattern_index.apply_params(self.index, nprobe, ef_search)
        self._near_cache.clear()  # answers of the old settings

    @cached_property
    def image_index(self):
        self.check_unchanged()
        idx = pattern_index.load(self.root / layout.IMAGE_INDEX, self.image_index_info, check=True)
        if idx.ntotal != len(self.images["image_id"]):
            raise PipelineError(f"{self.root / layout.IMAGE_INDEX} holds {idx.ntotal:,} images but {layout.IMAGES} lists {len(self.images['image_id']):,}; train the run again")
        return idx

    @cached_property
    def images(self) -> dict[str, np.ndarray]:
        """The training images of the image index: ``image_id``, ``label`` and (where known) ``name``,
        row i = index id i."""
        cols = [c for c in ("image_id", "label", "name") if c in self.image_file.schema_arrow.names]
        t = self.image_file.read(columns=cols)
        out = {c: patterns.array(t, c) for c in ("image_id", "label")}
        out["name"] = np.array(t.column("name").to_pylist() if "name" in cols else [None] * len(t), object)
        return out

    def thumbnails(self, rows: np.ndarray) -> list[np.ndarray | None]:
        """Thumbnails (h x w x C uint8, at most 64 a side) of image-index rows ``rows``; None where the
        run has none (the source was unreadable at training, or the run predates them)."""
        rows = np.asarray(rows, np.int64)
        if "thumbnail" not in self.image_file.schema_arrow.names:
            return [None] * len(rows)
        t = patterns.rows(self.image_file, rows, ["thumbnail_shape", "thumbnail"])
        return [None if v is None else np.frombuffer(v, np.uint8).reshape(shape)
                for v, shape in zip(t.column("thumbnail").to_pylist(), t.column("thumbnail_shape").to_pylist())]

    def summary(self) -> dict:
        """What ``pipe info`` shows: classes, image size, both configs, the best epoch's figures, the
        table, the indexes, the shards it came from and each file's size on disk."""
        m = self.manifest
        files = {p.name: p.stat().st_size for p in sorted(self.root.iterdir()) if p.is_file()}
        return {
            "run": str(self.root),
            "classes": self.class_names,
            "image": {"height": self.height, "width": self.width, "channels": self.extract_config.channels},
            "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"],
            "val_accuracy": m["final"].get("val_accuracy"),
            "train_accuracy": m["final"].get("train_accuracy"),
            "patterns": m["patterns"],
            "rows": m["rows"],
            "index": m["index"]["factory"],
            "unseen_rule": self.unseen_rule,
            "shards": m.get("shards"),
            "refit": m.get("refit"),  # trained again on every image for the chosen epochs (then nothing is held out)
            "lineage": m.get("lineage"),  # a run grown in steps (pipe train --from): each step's shards and the run it grew from
            "taught": m.get("taught"),  # a run taught on pipe serve's page: the run taught from, each image's name and class
            "familiarity": None if self.familiarity_reference is None else {
                "reference": self.familiarity_reference.source, "images": self.familiarity_reference.images,
                "unfamiliar_below": familiarity.UNFAMILIAR},
            "extract_config": m["extract_config"],
            "train_config": m["train_config"],
            "files_bytes": files,
            "bytes": sum(files.values()),
        }

    def view_name(self, view: int) -> str:
        """The name of view ``view`` of a slot (``locate()``'s ``view``): an exact view of ``--views``, or ``code``."""
        views = [] if self.extract_config.views == "none" else self.extract_config.views.split(",")
        return views[view] if view < len(views) else "code"

    def _check_weights(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The table (rows x dim) and the head's (weight, bias) layers, refused unless their shapes
        are what the run's vocabulary and settings make."""
        w, cfg, c = self.weights, self.train_config, len(self.class_names)
        names = head_names(cfg.hidden)
        shapes = {"table.weight": (self.vocab.rows, cfg.dim)}
        shapes.update({"head.weight": (c, cfg.dim), "head.bias": (c,)} if cfg.hidden == 0 else
                      {"head.0.weight": (cfg.hidden, cfg.dim), "head.0.bias": (cfg.hidden,), "head.2.weight": (c, cfg.hidden), "head.2.bias": (c,)})
        for name, shape in shapes.items():
            got = tuple(w[name].shape) if name in w else None
            if got != shape:
                raise PipelineError(f"{self.root / layout.WEIGHTS} does not fit this run's vocabulary and settings "
                                    f"({name} is {got}, expected {shape}); train the run again")
        layers = [(np.asarray(w[names[i]], np.float32), np.asarray(w[names[i + 1]], np.float32)) for i in range(0, len(names), 2)]
        return np.asarray(w["table.weight"]), layers

    @property
    def table(self) -> np.ndarray:
        """The pattern table (rows x dim float32), memory-mapped from ``model.safetensors``."""
        return self._table

    @cached_property
    def model(self):
        """The run as a torch module (``PatchBagModel``, eval mode), for code that wants torch; a
        query itself never builds it (:mod:`pipeline.query.pooling`)."""
        import torch

        from pipeline.model import build_model

        state = {k: torch.from_numpy(np.array(v)) for k, v in self.weights.items()}
        model = build_model(self.train_config, self.vocab.rows, len(self.class_names), state)
        return model.eval()

    def learned(self, rows: np.ndarray, vectors: np.ndarray, head_layers: list[tuple[np.ndarray, np.ndarray]],
                class_names: list[str], class_counts: np.ndarray) -> None:
        """Take what learning an image changed, in memory (:mod:`pipeline.teach`): table ``rows`` get
        ``vectors``, the head becomes ``head_layers`` for ``class_names`` (the old ones first), and
        ``class_counts`` (patterns x classes) are added to the pattern table's. The files on disk are
        not touched; the pattern index still holds the moved rows' old vectors, so searches find a
        moved row at its new place instead (:meth:`search_patterns`)."""
        if len(class_names) < len(self.class_names) or class_names[: len(self.class_names)] != self.class_names:
            raise ValueError("class_names must extend the run's classes")
        cc = self.patterns["class_counts"]
        grown = np.zeros((len(cc), len(class_names)), np.int64)
        grown[:, : cc.shape[1]] = cc
        self.patterns["class_counts"] = grown + class_counts
        if not self._table.flags.writeable:  # the memory-mapped file stays as it is: learn on a copy
            self._table = np.array(self._table)
        rows = np.asarray(rows, np.int64)
        self._table[rows] = vectors
        self.head_layers = [(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)) for w, b in head_layers]
        self.weights = dict(self.weights, **self.head_tensors(), **{"table.weight": self._table})
        self.class_names = list(class_names)
        self.moved = np.union1d(self.moved, rows[rows < self.vocab.size])
        self._pushes.clear()
        self._near_cache.clear()
        self.__dict__.pop("model", None)

    def head_tensors(self) -> dict[str, np.ndarray]:
        """The head's layers by their names in ``model.safetensors``."""
        names = head_names(0 if len(self.head_layers) == 1 else 1)
        return dict(zip(names, [x for layer in self.head_layers for x in layer]))

    def images_to_keys(self, images: np.ndarray) -> np.ndarray:
        """Keys (N x K) of uint8 images (N x H x W [x C], or one H x W x C image) hashed the run's way."""
        return self.encode(images)[0]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Keys (N x K) of uint8 images hashed the run's way, and their weights (N x K float32; None
        when every key weighs 1, i.e. the run has no code view)."""
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[1:] != (self.height, self.width):
            arr = arr[None]  # one H x W x C image (a batch of gray images is N x H x W)
        arr = as_nhwc(arr)
        if arr.shape[1:3] != (self.height, self.width):
            raise PipelineError(
                f"the images are {arr.shape[1]}x{arr.shape[2]} (height x width) but the run was trained on "
                f"{self.height}x{self.width}; resize them to {self.height}x{self.width} first"
            )
        return self.plan.encode(to_channels(arr, self.extract_config.channels))


def load(root: Path | str, unseen_rule: str | None = None) -> Run:
    """Open a trained run directory; ``unseen_rule`` says what unseen patches do in predictions."""
    return Run(root, unseen_rule)
