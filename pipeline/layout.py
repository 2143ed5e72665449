"""File names of every artifact, and the atomic-write helpers that create them.

A shard directory is complete only once ``manifest.json`` exists; a run
directory only once ``run.json`` exists. Every file is written
through :func:`atomic`: to ``name.tmp``, moved into place with ``os.replace``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator


# shard directory (pipe extract)
MANIFEST = "manifest.json"
SHARD_PATTERN = "part-{index:05d}-of-{total:05d}.parquet"
EXTRACT_JOB = "extract-job.json"  # the settings of an unfinished extract, for resuming
PROGRESS_DIR = "_progress"  # one small JSON per finished shard, for resuming
DICTIONARY = "dictionary.npz"  # the code view's whitening and atoms (pipeline.extraction.codes); also copied into a run

# run directory (pipe train)
RUN_FORMAT = "patchhash-run-v3"  # run.json "format"
RUN_MANIFEST = "run.json"
MODEL = "model.pt"  # while training: the best epoch so far (torch); a finished run holds WEIGHTS instead
WEIGHTS = "model.safetensors"  # the finished run's weights (the best epoch), read without torch (pipeline.weights)
METRICS = "metrics.jsonl"
PATTERNS = "patterns.parquet"
PATTERN_INDEX = "patterns.faiss"
IMAGE_INDEX = "images.faiss"  # pooled vectors of the training images (originals)
IMAGES = "images.parquet"  # row i of the image index: image_id, label
VOCAB = "vocab.npz"  # vocabulary keys (own rows, ascending) and counts; tail buckets
VOCAB_STATS = "vocab.json"
CURVES = "curves.png"
CHECKPOINT = "checkpoint.pt"  # while training: model, optimizers, random states (removed when the run is finished)
TRAIN_JOB = "train-job.json"  # while training: the settings a --resume must match


def shard_name(index: int, total: int) -> str:
    """The file name of shard ``index`` (0-based) out of ``total``."""
    return SHARD_PATTERN.format(index=index, total=total)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic(path: Path | str) -> Iterator[Path]:
    """The one way every artifact is written: the block writes the yielded ``name.tmp``, which
    replaces ``path`` only when the block ends without an error (and is removed when it fails),
    so a file under its real name is always complete."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic(dst) as tmp:
        shutil.copyfile(src, tmp)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
