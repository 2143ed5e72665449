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
from typing import Callable

import numpy as np

from pipeline import familiarity, layout
from pipeline.config import ExtractConfig, TrainConfig, check_resize
from pipeline.data.images import FIT_RULE, MAX_PIXELS, BadImage, as_nhwc, decode, file_channels, fit_array, to_channels
from pipeline.data.sources import Source, read_ref
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.codes import Dictionary
from pipeline.extraction.hashing import KeyPlan
from pipeline.extraction.shards import Shards
from pipeline.layout import RUN_FORMAT
from pipeline.query import evaluation
from pipeline.query.classify import DEFAULT_UNSEEN, Classifier
from pipeline.query.lookup import PatchLookup, PatternLookup
from pipeline.query.training_images import ImageLookup, TrainingImages
from pipeline.table import index as pattern_index
from pipeline.table import weights
from pipeline.table.loaded import PatternTable
from pipeline.table.vocab import Vocabulary

__all__ = ["Run", "load", "PatchLookup", "ImageLookup"]

MAX_SIDE = 1 << 16  # image sides a run records; more is a damaged run.json
RUN_FILES = (layout.VOCAB, layout.WEIGHTS, layout.PATTERNS, layout.IMAGES, layout.PATTERN_INDEX, layout.IMAGE_INDEX, layout.DICTIONARY)


def head_names(hidden: int) -> list[str]:
    """The head's tensors in ``model.safetensors``: a linear head's weight and bias, or (``hidden`` > 0)
    both layers' around the ReLU."""
    return ["head.weight", "head.bias"] if hidden == 0 else ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]


class Run:
    """A trained run directory, loaded. What it reads is in named parts:

    * ``table`` (:class:`pipeline.table.loaded.PatternTable`): the learned patterns (vocabulary,
      vectors, pattern metadata, pattern index);
    * ``classifier`` (:class:`pipeline.query.classify.Classifier`): pooling through the table and
      the head (or the nearest training images' vote);
    * ``lookup`` (:class:`pipeline.query.lookup.PatternLookup`): nearest patterns and why a
      prediction was made;
    * ``training_images`` (:class:`pipeline.query.training_images.TrainingImages`): the indexed
      training images;

    and the verbs a user calls are on the run: :meth:`predict`, :meth:`evaluate`,
    :meth:`nearest_patterns`, :meth:`nearest_images`, :meth:`familiarity`, :meth:`pattern_pixels`,
    :meth:`class_patterns`. ``unseen`` is the default unseen-patch rule
    (:mod:`pipeline.query.classify`)."""

    def __init__(self, root: Path | str, unseen: str | None = None):
        self.root = Path(root)
        mpath = self.root / layout.RUN_MANIFEST
        if not mpath.exists() and not mpath.is_symlink():
            raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
        self.unchanged = layout.Unchanged(self.root)  # raises once the run on disk is another
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
            index_info = pattern_index.IndexInfo.from_dict(self.manifest["index"])
            image_index_info = pattern_index.IndexInfo.from_dict(self.manifest["image_index"])
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
        if index_info.vectors != self.vocab.size:
            raise PipelineError(f"{mpath} records {index_info.vectors:,} indexed patterns but the vocabulary has {self.vocab.size:,}; train the run again")
        vectors, head_layers = self._check_weights(weights.load(self.root / layout.WEIGHTS, "train the run again"))
        self.table = PatternTable(self.root, self.vocab, vectors, index_info, self.unchanged.check)
        self.training_images = TrainingImages(self.root, image_index_info, self.unchanged.check)
        self.classifier = Classifier(self.table, self.plan, head_layers, self.train_config.bag, self.training_images,
                                     unseen or DEFAULT_UNSEEN)
        self.lookup = PatternLookup(self.table, self.plan, self.classifier, self.dictionary, self.extract_config.channels)
        # the tables are opened now (their footers read), so the whole run is the files present at load
        if (self.root / layout.PATTERNS).exists():
            self.table.file
        if (self.root / layout.IMAGES).exists():
            self.training_images.file

    def __repr__(self) -> str:
        return (f"Run({str(self.root)!r}: {len(self.class_names)} classes, {self.height}x{self.width}x{self.extract_config.channels} images, "
                f"{self.vocab.size:,} patterns)")

    def check_unchanged(self) -> None:
        """Raise :class:`PipelineError` when the run directory was trained again (or its manifest
        replaced) after it was loaded: files opened from now on would belong to another run."""
        self.unchanged.check()

    @property
    def unseen(self) -> str:
        """The default unseen-patch rule of predictions (``drop``, ``compose`` or ``nearest``)."""
        return self.classifier.unseen

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the pattern index's query-time knobs (recall against speed) for this session."""
        self.table.tune(nprobe, ef_search)
        self.lookup.forget()  # answers of the old settings

    # -- encoding and predicting

    def images_to_keys(self, images: np.ndarray) -> np.ndarray:
        """Keys (N x K) of uint8 images (N x H x W [x C], or one H x W x C image) hashed the run's way."""
        return self.encode(images)[0]

    @property
    def mirror_vote(self) -> bool:
        """Whether predictions score an image as the bag of its own patches and its left-right
        mirror's (``pipe train --vote``; runs from before the setting score the image alone)."""
        return self.train_config.vote == "mirror"

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Keys (N x K) of uint8 images hashed the run's way, and their weights (N x K float32; None
        when every key weighs 1, i.e. the run has no code view)."""
        return self.plan.encode(self._checked(images))

    def scoring_keys(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """:meth:`encode` of uint8 images, then the keys and weights their predictions are made from:
        with :attr:`mirror_vote`, each image's keys followed by its mirror's (N x 2K); else the same arrays."""
        arr = self._checked(images)
        if not self.mirror_vote:
            keys, weights = self.plan.encode(arr)
            return keys, weights, keys, weights
        both, weights = self.plan.encode_with_mirrors(arr)
        k = both.shape[1] // 2
        return both[:, :k], None if weights is None else weights[:, :k], both, weights

    def _checked(self, images: np.ndarray) -> np.ndarray:
        """N x H x W x C uint8 images in the run's channel count (one H x W x C image becomes a batch of one)."""
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[1:] != (self.height, self.width):
            arr = arr[None]  # one H x W x C image (a batch of gray images is N x H x W)
        arr = as_nhwc(arr)
        if arr.shape[1:3] != (self.height, self.width):
            raise PipelineError(
                f"the images are {arr.shape[1]}x{arr.shape[2]} (height x width) but the run was trained on "
                f"{self.height}x{self.width}; resize them to {self.height}x{self.width} first"
            )
        return to_channels(arr, self.extract_config.channels)

    # -- reading image files

    def read_image(self, path: Path | str, resize: tuple[int, int] | None = None, notes: list[str] | None = None) -> np.ndarray:
        """One image file as H x W x C uint8 in the run's channel count, resized to ``resize`` (default:
        the run's own ``--resize``, if it has one; else an image of another size than the run's is
        fitted to it by :func:`pipeline.data.images.fit_array`). A grayscale file on a colour run (or
        the reverse) is converted as docs/extract.md documents; ``notes`` is told of each change."""
        if resize is not None:
            check_resize(resize)
        if not Path(path).exists():
            raise PipelineError(f"{path} does not exist; check the path")
        try:
            data = read_ref(("file", str(path)))
        except BadImage as e:
            raise PipelineError(f"cannot read {path}: {e}") from None
        return self.image_from_bytes(data, str(path), resize, notes)

    def image_from_bytes(self, data: bytes, name: str, resize: tuple[int, int] | None = None, notes: list[str] | None = None,
                         max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """:meth:`read_image` of an encoded image already in memory (an upload); ``name`` names it in messages.
        Raises :class:`PipelineError` for bytes that are no image (or of more than ``max_pixels`` pixels)."""
        cfg = self.extract_config
        if resize is not None:
            check_resize(resize)
        try:
            img = decode(data, cfg.channels, resize or cfg.resize, max_pixels)
            own = file_channels(data)
        except BadImage as e:
            raise PipelineError(f"cannot read {name}: {e}") from None
        if own != cfg.channels and notes is not None:
            kinds = {1: "grayscale", 3: "colour"}
            notes.append(f"{name} is {kinds[own]} and the run {kinds[cfg.channels]}: converted "
                         + ("by repeating the gray channel" if cfg.channels == 3 else "to gray with Pillow's luma formula"))
        if img.shape[:2] != (self.height, self.width):
            if notes is not None:
                notes.append(f"{name} is {img.shape[0]}x{img.shape[1]} (height x width): fitted to the run's {self.height}x{self.width}, {FIT_RULE}")
            img = fit_array(img, (self.height, self.width))
        return img

    # -- predicting

    def predict(self, images: np.ndarray, unseen: str | None = None, classifier: str = "head") -> tuple[np.ndarray, np.ndarray]:
        """(labels N, probabilities N x C) of uint8 images; ``unseen`` overrides the run's unseen-patch
        rule, ``classifier`` = ``knn`` votes by the nearest training images instead of the head."""
        _, _, keys, weights = self.scoring_keys(images)
        probs = self.classifier.predict_keys(keys, unseen, classifier, weights=weights)
        return probs.argmax(1), probs

    def predict_files(self, paths, resize: tuple[int, int] | None = None, unseen: str | None = None, classifier: str = "head") -> list[dict]:
        """One answer per image file: ``{"file", "prediction"`` (the class name), ``"probabilities"``
        ({class name: p}), ``"familiarity"`` (docs/query.md), ``"notes"`` (how the file was
        converted or fitted to the run's size)}``. Files are read as ``pipe query`` reads them."""
        out = []
        for path in paths:
            notes: list[str] = []
            img = self.read_image(path, resize, notes)
            keys, weights, vote_keys, vote_weights = self.scoring_keys(img)
            pooled, voted = self.classifier.pooled_own_and_all(vote_keys, unseen, vote_weights)
            probs = self.classifier.probabilities(voted, classifier)[0]
            fam = self.familiarity_keys(keys, weights, pooled, unseen=unseen)
            out.append({"file": str(path), "prediction": self.class_names[int(probs.argmax())],
                        "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
                        "familiarity": None if fam is None else float(fam[0]), "notes": notes})
        return out

    def evaluate(self, data: Source | Shards, progress: Callable[[int], None] | None = None, unseen: str | None = None,
                 classifier: str = "head", k: int = 10, validation: bool = False, resize: tuple[int, int] | None = None) -> dict:
        """Accuracy, loss, per-class accuracy and confusion matrix on ``data`` (a source or shards);
        ``validation`` scores only the images the run's training held out (:func:`pipeline.query.evaluation.evaluate`)."""
        return evaluation.evaluate(self, data, progress, unseen, classifier, k, validation, resize)

    def validation_shards(self) -> Shards:
        """The shards this run was trained on (for scoring its held-out part)."""
        return evaluation.validation_shards(self)

    # -- looking up

    def nearest_patterns(self, image_or_keys: np.ndarray, k: int = 5, patches: int | None = None) -> PatchLookup | tuple[np.ndarray, np.ndarray]:
        """The k nearest learned patterns.

        Given one image (H x W [x C] uint8): a :class:`PatchLookup` of its patches, every patch
        (``patches`` None) or only the ``patches`` contributing most to the predicted class's logit,
        in that order (the search is the costly part).

        Given patch keys (a 1-D uint64 array, e.g. from :meth:`images_to_keys`): ``(distances,
        ids)``, each len x k, from each seen key's learned vector; rows of unseen keys are
        inf / -1 (without the patch's place no parts can be composed).
        """
        if k < 1:
            raise ParameterError("k", f"{k} must be at least 1")
        arr = np.asarray(image_or_keys)
        if arr.ndim == 1 and arr.dtype == np.uint64:
            return self.lookup.of_keys(arr, k)
        keys, weights = self.encode(arr)
        if len(keys) != 1:
            raise PipelineError("nearest_patterns takes one image; call it once per image")
        probs = self.classifier.predict_keys(keys, weights=weights)[0]
        return self.lookup.lookup_keys(keys[0], probs, k, patches, None if weights is None else weights[0])

    def nearest_images(self, images: np.ndarray, k: int = 5, unseen: str | None = None) -> ImageLookup:
        """The k nearest training images of each image by pooled vector."""
        if k < 1:
            raise ParameterError("k", f"{k} must be at least 1")
        keys, weights = self.encode(images)
        return self.training_images.nearest(self.classifier.pooled(keys, unseen, weights), k)

    def pattern_pixels(self, ids: np.ndarray, like: tuple[float, float] | None = None) -> list[np.ndarray | None]:
        """Example pixels (h x w x C uint8) of patterns ``ids`` (:meth:`pipeline.query.lookup.PatternLookup.pattern_pixels`)."""
        return self.lookup.pattern_pixels(ids, like)

    def class_patterns(self, c: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` patterns class ``c`` relies on most: (pattern ids, scores), best first
        (:meth:`pipeline.query.lookup.PatternLookup.class_patterns`)."""
        return self.lookup.class_patterns(c, n)

    # -- familiarity

    @cached_property
    def familiarity_reference(self) -> familiarity.Reference | None:
        """The held-out images' familiarity signs (:mod:`pipeline.familiarity`); None for a run trained
        before they were measured."""
        try:
            return familiarity.Reference.load(self.root / layout.FAMILIARITY)
        except ValueError as e:
            raise PipelineError(f"{e}; train the run again") from None

    def familiarity(self, images: np.ndarray) -> np.ndarray | None:
        """How much each uint8 image is like the training images, in [0, 1] (:meth:`familiarity_keys`)."""
        keys, weights = self.encode(images)
        return self.familiarity_keys(keys, weights)

    def familiarity_keys(self, keys: np.ndarray, weights: np.ndarray | None = None, pooled: np.ndarray | None = None,
                         near: ImageLookup | None = None, unseen: str | None = None) -> np.ndarray | None:
        """How much each image (keys N x K, their weights) is like the training images, in [0, 1]
        (:mod:`pipeline.familiarity`); None when the run has no reference. ``pooled`` and ``near``:
        the images' pooled vectors and nearest training images where already computed, with unseen
        rule ``unseen`` (default: the run's); reused when that rule drops unseen patches, as the
        familiarity's vectors do."""
        ref = self.familiarity_reference
        if ref is None:
            return None
        if (unseen or self.unseen) != "drop":
            pooled = near = None
        if near is not None and near.distances.shape[1] >= familiarity.NEIGHBOURS:
            d = near.distances[:, : familiarity.NEIGHBOURS]
        else:
            if pooled is None:
                pooled = self.classifier.pooled(keys, "drop", weights)
            d, _ = self.training_images.search(pooled, familiarity.NEIGHBOURS)
        return ref.score(familiarity.signs(self.vocab.own_ids(keys), d))

    # -- describing and learning

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
            "unseen": self.unseen,
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

    def _check_weights(self, w: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """The table (rows x dim) and the head's (weight, bias) layers of the weights file's tensors
        ``w``, refused unless their shapes are what the run's vocabulary and settings make (the run
        keeps only these: after a lesson they are the current ones, :meth:`tensors`)."""
        cfg, c = self.train_config, len(self.class_names)
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

    @cached_property
    def model(self):
        """The run as a torch module (``PatchBagModel``, eval mode), for code that wants torch; a
        query itself never builds it (it pools with :func:`pipeline.table.pooling.pool_bags`)."""
        import torch

        from pipeline.model import build_model

        state = {k: torch.from_numpy(np.array(v)) for k, v in self.tensors().items()}
        model = build_model(self.train_config, self.vocab.rows, len(self.class_names), state)
        return model.eval()

    def learned(self, rows: np.ndarray, vectors: np.ndarray, head_layers: list[tuple[np.ndarray, np.ndarray]],
                class_names: list[str], class_counts: np.ndarray) -> None:
        """Take what learning an image changed, in memory (:mod:`pipeline.teach`): table ``rows`` get
        ``vectors``, the head becomes ``head_layers`` for ``class_names`` (the old ones first), and
        ``class_counts`` (patterns x classes) are added to the pattern table's. The files on disk are
        not touched; the pattern index still holds the moved rows' old vectors, so searches find a
        moved row at its new place instead (:meth:`pipeline.table.loaded.PatternTable.search`)."""
        if len(class_names) < len(self.class_names) or class_names[: len(self.class_names)] != self.class_names:
            raise ValueError("class_names must extend the run's classes")
        self.table.move(rows, vectors, class_counts)
        self.classifier.head_layers = [(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)) for w, b in head_layers]
        self.class_names = list(class_names)
        self.lookup.forget()
        self.__dict__.pop("model", None)

    def tensors(self) -> dict[str, np.ndarray]:
        """The model's tensors by their names in ``model.safetensors``, as they are now (after any lesson)."""
        return {"table.weight": self.table.vectors, **self.head_tensors()}

    def head_tensors(self) -> dict[str, np.ndarray]:
        """The head's layers by their names in ``model.safetensors``."""
        layers = self.classifier.head_layers
        names = head_names(0 if len(layers) == 1 else 1)
        return dict(zip(names, [x for layer in layers for x in layer]))


def load(root: Path | str, unseen: str | None = None) -> Run:
    """Open a trained run directory; ``unseen`` says what unseen patches do in predictions (default ``drop``)."""
    return Run(root, unseen)
