"""patchhash: learn a vector for every rectangular image patch, and look up the nearest learned pattern.

The verbs::

    source = pipeline.open_source("digits", split="train")
    pipeline.extract(source, "artifacts/digits/shards")
    pipeline.train(pipeline.Shards("artifacts/digits/shards"), "artifacts/digits/run")
    run = pipeline.load("artifacts/digits/run")
    labels, probs = run.predict(images)
    lookup = run.nearest_patterns(image, k=5)           # PatchLookup: distances, ids, ... per patch
    near = run.nearest_images(images, k=5)              # ImageLookup: distances, ids, image_ids, labels
    pipeline.query_batch(run, pipeline.open_data("digits", split="test"), "results.parquet")
"""
from importlib import import_module

from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.extraction.hashing import KeyPlan
from pipeline.extraction.shards import Shards
from pipeline.data.sources import Source, from_arrays, open_source
from pipeline.query.inputs import open_data
from pipeline.data.split import is_validation

# stages load on first use: extract workers and `pipe extract` never import torch, and a query
# never imports the extraction stage
_LAZY = {
    "extract": "pipeline.extraction.stage",
    "PatchLookup": "pipeline.query.run", "ImageLookup": "pipeline.query.run", "Run": "pipeline.query.run",
    "load": "pipeline.query.run", "train": "pipeline.training.loop", "query_batch": "pipeline.query.batch",
    "rebuild_index": "pipeline.table.reindex", "query_png": "pipeline.query.pictures",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def open_shards(root) -> Shards:
    """Open a finished shard directory."""
    return Shards(root)


def locate(shards_or_run, slots):
    """Location (y, x, h, w, cell) of key slots of a shard directory's or run's canonical order."""
    plan = shards_or_run.plan() if isinstance(shards_or_run, Shards) else shards_or_run.plan
    return plan.locate(slots)


__all__ = [
    "ExtractConfig",
    "TrainConfig",
    "PipelineError",
    "KeyPlan",
    "PatchLookup",
    "ImageLookup",
    "query_batch",
    "rebuild_index",
    "query_png",
    "open_data",
    "Run",
    "Shards",
    "Source",
    "extract",
    "train",
    "load",
    "open_source",
    "from_arrays",
    "open_shards",
    "locate",
    "is_validation",
]
