"""Batch query: a whole dataset through a run, streamed into one Parquet file.

One row per image: prediction and probabilities, the most decisive patches with their nearest
learned patterns, and the nearest training images. The file is written under a temporary
name and renamed when complete, so an interrupted query leaves no file that looks finished.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, outputs
from pipeline.errors import ParameterError
from pipeline.engines.ray_engine import check_engine, query_tables
from pipeline.query import evaluation
from pipeline.query.report import check_counts
from pipeline.query.run import Run, load
from pipeline.extraction.shards import Shards
from pipeline.data.sources import Source


def schema(num_classes: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("name", pa.string()),
            pa.field("label", pa.string()),  # null when the source has no label
            pa.field("prediction", pa.string(), nullable=False),
            pa.field("probabilities", pa.list_(pa.float32(), num_classes), nullable=False),
            pa.field("familiarity", pa.float32()),  # in [0, 1] (pipeline.familiarity); null for a run without a reference
            # the most decisive patches, most decisive first; per patch its k nearest patterns
            pa.field("patch_slots", pa.list_(pa.int32()), nullable=False),
            pa.field("patch_contributions", pa.list_(pa.float32()), nullable=False),
            pa.field("patch_seen", pa.list_(pa.bool_()), nullable=False),
            pa.field("nearest_pattern_ids", pa.list_(pa.list_(pa.int64())), nullable=False),
            pa.field("nearest_pattern_distances", pa.list_(pa.list_(pa.float32())), nullable=False),
            # the k nearest training images (their image_id in the training shards) and labels
            pa.field("nearest_image_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("nearest_image_labels", pa.list_(pa.string()), nullable=False),
        ],
        metadata={b"patchhash.columns": b"see docs/query.md"},
    )


def _score(table: pa.Table, labels: np.ndarray) -> tuple[int, int]:
    """(labelled images, correct predictions) of one result table."""
    ok = labels >= 0
    pred = np.asarray(table.column("prediction").to_pylist(), dtype=object)
    lab = np.asarray(table.column("label").to_pylist(), dtype=object)
    return int(ok.sum()), int((pred[ok] == lab[ok]).sum())


def result_table(
    run: Run, keys: np.ndarray, labels: np.ndarray, image_ids: np.ndarray, names: list[str] | None,
    k: int, patches: int, unseen: str | None, classifier: str, weights: np.ndarray | None = None,
    vote_keys: np.ndarray | None = None, vote_weights: np.ndarray | None = None,
) -> pa.Table:
    """The result rows (see :func:`schema`) of one batch of images given as keys (and their weights);
    the predictions are made from ``vote_keys`` when given (:meth:`pipeline.query.run.Run.scoring_keys`),
    everything else from the images' own keys."""
    cls = run.class_names
    scored, scored_weights = (keys, weights) if vote_keys is None else (vote_keys, vote_weights)
    pooled, voted = run.classifier.pooled_own_and_all(scored, unseen, scored_weights)
    probs = run.classifier.probabilities(voted, classifier)
    near = run.training_images.nearest(pooled, k)
    fam = run.familiarity_keys(keys, weights, pooled, near, unseen)
    pred = probs.argmax(1)
    looks = [
        run.lookup.lookup_keys(keys[i], probs[i], k, patches, None if weights is None else weights[i], search=False) if patches else None
        for i in range(len(pred))
    ]
    run.lookup.search_lookups([lk for lk in looks if lk is not None], k)  # one search for the batch's decisive patterns
    cols = {
        "image_id": np.asarray(image_ids, np.int64),
        "name": list(names) if names is not None else [None] * len(pred),
        "label": [cls[y] if y >= 0 else None for y in labels],
        "prediction": [cls[p] for p in pred],
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.astype(np.float32).ravel()), len(cls)),
        "familiarity": pa.nulls(len(pred), pa.float32()) if fam is None else pa.array(fam.astype(np.float32), pa.float32()),
        "patch_slots": [lk.slots.astype(np.int32) if lk else [] for lk in looks],
        "patch_contributions": [lk.contribution.astype(np.float32) if lk else [] for lk in looks],
        "patch_seen": [lk.seen if lk else [] for lk in looks],
        "nearest_pattern_ids": [[r[r >= 0] for r in lk.ids] if lk else [] for lk in looks],
        "nearest_pattern_distances": [[d[i >= 0] for d, i in zip(lk.distances, lk.ids)] if lk else [] for lk in looks],
        "nearest_image_ids": [i[r >= 0] for i, r in zip(near.image_ids, near.ids)],
        "nearest_image_labels": [[cls[c] for c in lab[r >= 0]] for lab, r in zip(near.labels, near.ids)],
    }
    return pa.table(cols, schema=schema(len(cls)))


def query_batch(
    run: Run,
    data: Source | Shards,
    out: Path | str,
    k: int = 5,
    patches: int = 5,
    unseen: str | None = None,
    classifier: str = "head",
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    engine: str = "local",
    workers: int = 1,
    address: str | None = None,
    resize: tuple[int, int] | None = None,
) -> dict:
    """Query every image of ``data`` and write ``out`` (Parquet); returns a summary with accuracy when labels exist.
    A source's images are resized to ``resize`` (default: the run's own).

    ``engine="ray"`` spreads the batches over ``workers`` Ray actors (a local instance, or the
    cluster at ``address``), each loading the run once; rows keep the source order.
    """
    check_engine(engine)
    if engine != "ray" and workers != 1:
        raise ParameterError("workers", f"{workers} goes with `engine` ray; leave it out to answer in this process")
    check_counts(k, patches)
    out = Path(out)
    if out.suffix != ".parquet":
        raise ParameterError("out", f"{out} must end in .parquet")
    if out.is_dir():
        raise ParameterError("out", f"{out} is a directory; give the results file, e.g. {out / 'results.parquet'}")
    outputs.check_file_out(out, "`out`")
    with outputs.locked(out, "pipe query --batch", file=True):
        return _write(run, data, out, k, patches, unseen, classifier, batch_size, progress, engine, workers, address, resize)


def _write(run, data, out: Path, k, patches, unseen, classifier, batch_size, progress, engine, workers, address, resize) -> dict:
    """:func:`query_batch` with ``out`` locked."""
    names = run.class_names
    rows = correct = labelled = 0
    batches = evaluation.key_batches(run, data, batch_size, progress, resize)
    if engine == "ray":
        labels_of: list[np.ndarray] = []

        def remember(bs):
            for b in bs:
                labels_of.append(b.labels)
                yield b

        tables = query_tables(load, result_table, str(run.root.resolve()), remember(batches), unseen or run.unseen,
                              (k, patches, unseen, classifier), workers, address)
        pairs = ((t, labels_of.pop(0)) for t in tables)
    else:
        pairs = ((result_table(run, b.keys, b.labels, b.image_ids, b.names, k, patches, unseen, classifier, b.weights,
                                  b.vote_keys, b.vote_weights), b.labels) for b in batches)
    with layout.atomic(out) as tmp, pq.ParquetWriter(tmp, schema(len(names)), compression="zstd") as writer:
        for table, labels in pairs:
            writer.write_table(table)
            n, c = _score(table, labels)
            rows, labelled, correct = rows + table.num_rows, labelled + n, correct + c
    return {"images": rows, "labelled": labelled, "accuracy": correct / labelled if labelled else None, "out": str(out)}
