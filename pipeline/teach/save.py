"""What a loaded run was taught (:mod:`pipeline.teach.learn`), written as a new run directory.

``save(run, lessons, out)`` writes ``out`` as a finished run that answers as the taught run
answers in memory: its table and head, classes (the new ones appended), the pattern table's
class counts with the lessons' occurrences added, a pattern index rebuilt over the moved
vectors, the nearest-training-images index with the taught images added, and the lessons
themselves as shards (``taught-shards/``, extracted with the run's settings and dictionary, as
``pipe extract --like`` would), so that a later ``pipe train --from`` replays them like any
step's images. ``run.json`` records where it came from: ``taught`` (the run and each image's
name and class) and ``lineage`` (the earlier steps' and the taught shards). The vocabulary,
dictionary and familiarity reference are the taught run's.

The run taught from is only read. ``out`` is written beside itself and moved into place when
complete; an ``out`` this module wrote before is replaced, any other existing path refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.table import index as pattern_index
from pipeline import layout
from pipeline.table import patterns, weights
from pipeline.data.augment import is_original
from pipeline.data.images import thumbnail
from pipeline.data.sources import from_arrays
from pipeline.errors import PipelineError
from pipeline.extraction.shards import Shards
from pipeline.teach.learn import Lesson

SHARDS = "taught-shards"
REWRITTEN = (layout.WEIGHTS, layout.PATTERNS, layout.PATTERN_INDEX, layout.IMAGES, layout.IMAGE_INDEX, layout.RUN_MANIFEST)


def check_out(out: Path | str, run_root: Path) -> Path:
    """Refuse an output that is the run itself (or inside it), or an existing path this module did not write."""
    out = Path(out).resolve()
    root = Path(run_root).resolve()
    if out == root or root in out.parents or out in root.parents:
        raise PipelineError(f"{out} is (or holds, or is inside) the served run {root}; name a new directory for what it learns")
    if out.exists() and not _taught_run(out):
        raise PipelineError(f"{out} already exists and is not a run taught by pipe serve; name a new directory")
    return out


def _taught_run(path: Path) -> bool:
    try:
        return path.is_dir() and "taught" in layout.read_json(path / layout.RUN_MANIFEST)
    except (OSError, ValueError):
        return False


def save(run, lessons: list[Lesson], out: Path | str) -> dict:
    """Write ``run`` (loaded, taught ``lessons`` in memory) as a new run at ``out``; returns its manifest."""
    if not lessons:
        raise PipelineError("nothing was taught yet, so there is nothing to save")
    out = check_out(out, run.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        manifest = _write(run, lessons, work, out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(run, lessons: list[Lesson], work: Path, out: Path) -> dict:
    from pipeline.extraction.stage import extract

    root = run.root
    for p in root.iterdir():  # what the taught run keeps as it was
        if p.is_file() and p.name not in REWRITTEN and not p.name.startswith("."):
            shutil.copy2(p, work / p.name)
    classes = list(run.class_names)
    labels = np.array([classes.index(les.label) for les in lessons], np.int64)
    images = np.stack([les.image for les in lessons])
    src = from_arrays(images, labels, classes, name="taught")
    extract(src, work / SHARDS, like=root, workers=1)
    taught_ids = _original_ids(Shards(work / SHARDS))

    weights.save(run.tensors(), work / layout.WEIGHTS)

    table = pq.read_table(root / layout.PATTERNS)
    cc = run.table.metadata["class_counts"]
    patterns.write(table.set_column(table.column_names.index("class_counts"), "class_counts", patterns.class_counts_column(cc)),
                   work / layout.PATTERNS)
    info = run.table.index_info
    index = pattern_index.build(run.table.vectors[: run.table.size], work / layout.PATTERN_INDEX, info.kind, info.nprobe, info.ef_search)

    keys = np.stack([les.keys for les in lessons])
    key_weights = None if lessons[0].weights is None else np.stack([les.weights for les in lessons])
    pooled = run.classifier.pooled(keys, "drop", key_weights)  # as training pools its images for this index
    old = run.training_images.index.reconstruct_n(0, run.training_images.index.ntotal)
    image_index = pattern_index.build(np.concatenate([old, pooled]).astype(np.float32), work / layout.IMAGE_INDEX, "flat")
    thumbs = [thumbnail(les.image) for les in lessons]
    added = pa.table({
        "image_id": pa.array(taught_ids, pa.int64()), "label": pa.array(labels, pa.int64()),
        "name": pa.array([f"taught/{les.label}/{les.name}" for les in lessons], pa.string()),
        "thumbnail_shape": pa.array([list(t.shape) for t in thumbs], pa.list_(pa.int32(), 3)),
        "thumbnail": pa.array([t.tobytes() for t in thumbs], pa.binary()),
    })
    earlier = pq.read_table(root / layout.IMAGES)
    both = pa.concat_tables([earlier, added.select(earlier.column_names).cast(earlier.schema)])
    patterns.write(both, work / layout.IMAGES)

    m = dict(run.manifest)
    lineage = m.get("lineage") or [{"run": None, "shards": m["shards"]}]
    m.update(
        class_names=classes, index=index.to_dict(), image_index=image_index.to_dict(), grown_from=str(root),
        lineage=lineage + [{"run": str(root), "shards": str(out / SHARDS)}],
        taught={"from": str(root), "images": [{"name": les.name, "class": les.label} for les in lessons]},
    )
    layout.write_json(work / layout.RUN_MANIFEST, m)
    return m


def _original_ids(shards: Shards) -> np.ndarray:
    """The image ids of the original images of ``shards``, in order."""
    ids = [b.image_ids[is_original(b.image_ids)] for b in shards.iter_batches()]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
