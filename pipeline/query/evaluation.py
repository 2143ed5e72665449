"""A run scored on labelled images: the keys of a source (hashed the run's way) or of shards in
batches, accuracy, loss, per-class accuracy and the confusion matrix, and the run's held-out part."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from pipeline.config import check_resize
from pipeline.data.augment import is_original
from pipeline.data.sources import Source
from pipeline.data.split import is_validation
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.shards import KeyBatch, Shards, with_copy


def _label_map(run, class_names: list[str], where: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(run.class_names)}
    missing = [c for c in class_names if c not in index]
    if missing:
        raise PipelineError(f"{where} has classes the run does not know: {', '.join(missing[:5])}; evaluate on the same classes")
    return np.asarray([index[c] for c in class_names] + [-1], dtype=np.int64)  # last entry maps label -1


def key_batches(run, data: Source | Shards, batch_size: int = 256, progress: Callable[[int], None] | None = None,
                resize: tuple[int, int] | None = None) -> Iterator[KeyBatch]:
    """Keys of every image of ``data`` (a source, hashed the run's way, or shards extracted with the
    run's config) in batches, labels mapped to the run's classes (-1 when unknown). A source's
    images are resized to ``resize`` (default: the run's own ``resize``; without one, an image of
    another size than the run's is fitted to it, :func:`pipeline.data.images.fit_array`). Of
    shards, only the original images: the augmented copies an extract wrote for training are left out.
    With the run's mirror vote each batch also carries the keys predictions are made from
    (``vote_keys``: an image's followed by its mirror's; of shards, the mirror copy the extract wrote)."""
    if resize is not None and isinstance(data, Shards):
        raise ParameterError("resize", "changes images of a source; shards hold keys already made, so leave it out")
    if resize is not None:
        check_resize(resize)
    if isinstance(data, Shards):
        data.check_fingerprint(run.fingerprint, f"run {run.root}")
        mapping = _label_map(run, data.class_names, str(data.root))
        variant = data.mirror_variant if run.mirror_vote else 0
        if run.mirror_vote and not variant:
            raise PipelineError(f"{data.root} holds no mirrored copies, which {run.root} scores every image with; "
                                "pass a source instead (its images are mirrored as they are read)")
        for b in data.iter_batches(names=True):
            if variant:  # the originals, each with its mirror's keys
                vote_keys, vote_weights, keep = with_copy(b, np.ones(len(b.image_ids), bool), variant, data.root)
            else:
                vote_keys, vote_weights, keep = None, None, np.flatnonzero(is_original(b.image_ids))
            for i in range(0, len(keep), batch_size):
                sl = keep[i : i + batch_size]
                if progress:
                    progress(len(sl))
                w = None if b.weights is None else b.weights[sl]
                votes = {} if vote_keys is None else {"vote_keys": vote_keys[i : i + batch_size],
                                                       "vote_weights": None if vote_weights is None else vote_weights[i : i + batch_size]}
                yield KeyBatch(b.image_ids[sl], mapping[b.labels[sl]], b.keys[sl], [b.names[j] for j in sl], w, **votes)
        return
    mapping = _label_map(run, data.class_names, data.path)
    for b in data.batches(batch_size, run.extract_config.channels, resize or run.extract_config.resize, fit=(run.height, run.width)):
        if progress:
            progress(len(b.labels))
        keys, weights, vote_keys, vote_weights = run.scoring_keys(b.images)
        votes = {"vote_keys": vote_keys, "vote_weights": vote_weights} if run.mirror_vote else {}
        yield KeyBatch(b.ids, mapping[b.labels], keys, b.names, weights, **votes)


def evaluate(run, data: Source | Shards, progress: Callable[[int], None] | None = None, unseen: str | None = None,
             classifier: str = "head", k: int = 10, validation: bool = False, resize: tuple[int, int] | None = None) -> dict:
    """Accuracy and loss (mean negative log probability) of ``run`` on ``data`` (see :func:`key_batches`),
    per-class accuracy and the confusion matrix (``confusion[i][j]``: images of class i predicted as
    j). ``validation`` keeps only the images the run's training held out (original images of
    shards, chosen as training chose them)."""
    if validation and run.manifest.get("refit"):
        raise PipelineError(
            f"{run.root} trained again on every image once its held-out part had chosen the epoch count (refit), so no image is "
            f"held out any more; its held-out accuracy before that, {run.manifest['final']['val_accuracy']:.4f}, is in run.json "
            "(train with `refit` off to keep a held-out part)")
    c = len(run.class_names)
    confusion = np.zeros((c, c), np.int64)
    loss_sum = 0.0
    for b in key_batches(run, data, progress=progress, resize=resize):
        ok = b.labels >= 0
        if validation:
            ok &= is_validation(b.image_ids, run.train_config.val_fraction) & is_original(b.image_ids)
        if not ok.any():
            continue
        keys, weights = (b.keys, b.weights) if b.vote_keys is None else (b.vote_keys, b.vote_weights)
        probs = run.classifier.predict_keys(keys[ok], unseen, classifier, k, None if weights is None else weights[ok])
        y = b.labels[ok]
        loss_sum += float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).sum())
        np.add.at(confusion, (y, probs.argmax(1)), 1)
    n = int(confusion.sum())
    per_class = {name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None) for i, name in enumerate(run.class_names)}
    fitted = getattr(data, "fitted", 0)
    return {"accuracy": float(np.trace(confusion)) / max(n, 1), "loss": loss_sum / max(n, 1), "n": n,
            "per_class": per_class, "confusion": confusion.tolist(), **({"fitted": fitted} if fitted else {})}


def validation_shards(run) -> Shards:
    """The shards ``run`` was trained on (for scoring its held-out part)."""
    where = run.manifest.get("shards")
    try:
        return Shards(where)
    except PipelineError as e:
        raise PipelineError(f"the run's training shards ({where}) cannot be read, so its held-out part cannot be scored: {e}") from None
