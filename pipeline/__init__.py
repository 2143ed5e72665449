"""patchhash: learn a vector for every rectangular image patch, and look up the nearest learned pattern.

The verbs::

    source = pipeline.open_source("digits", split="train")
    pipeline.extract(source, "artifacts/digits/shards")
    pipeline.train(pipeline.Shards("artifacts/digits/shards"), "artifacts/digits/run")
    run = pipeline.load("artifacts/digits/run")
    labels, probs = run.predict(images)
    lookup = run.nearest_patterns(image, k=5)
"""
from .config import ExtractConfig, TrainConfig
from .errors import PipelineError
from .extract import extract
from .hashing import KeyPlan
from .run import PatchLookup, Run, load
from .shards import Shards
from .sources import Source, open_source
from .train import train


def open_shards(root) -> Shards:
    """Open a finished shard directory."""
    return Shards(root)


def locate(shards_or_run, slots):
    """Location (y, x, h, w, cell) of key slots of a shard directory's or run's canonical order."""
    plan = shards_or_run.plan if isinstance(shards_or_run, Run) else shards_or_run.plan()
    return plan.locate(slots)


__all__ = [
    "ExtractConfig",
    "TrainConfig",
    "PipelineError",
    "KeyPlan",
    "PatchLookup",
    "Run",
    "Shards",
    "Source",
    "extract",
    "train",
    "load",
    "open_source",
    "open_shards",
    "locate",
]
