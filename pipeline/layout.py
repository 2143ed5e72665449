"""File names of every artifact, and the atomic-write helpers that create them.

A shard directory is complete only once ``manifest.json`` exists; a run
directory only once ``run.json`` exists. Every file is written
through :func:`atomic`: to ``name.tmp`` (made anew, never through a link found there),
flushed to disk, moved into place with ``os.replace``, and the directory flushed, so a
manifest that names a file is never on disk before the file is. Every artifact is read
only after :func:`regular_file` has checked it is a regular file of a sane size (a FIFO,
a device or a link to one would hang or exhaust memory).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from pipeline.errors import PipelineError


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
WEIGHTS = "model.safetensors"  # the finished run's weights (the best epoch), read without torch (pipeline.table.weights)
METRICS = "metrics.jsonl"
PATTERNS = "patterns.parquet"
PATTERN_INDEX = "patterns.faiss"
IMAGE_INDEX = "images.faiss"  # pooled vectors of the training images (originals)
IMAGES = "images.parquet"  # row i of the image index: image_id, label
FAMILIARITY = "familiarity.npz"  # the familiarity reference: signs of the held-out images (pipeline.familiarity)
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
    _fresh(tmp)
    try:
        yield tmp
        if tmp.is_file():
            _sync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _fresh(tmp: Path) -> None:
    """Make ``tmp`` an empty regular file of this process: whatever was there (a link planted to
    make the writer write elsewhere, a leftover) is removed first, and the file is created with
    ``O_EXCL | O_NOFOLLOW``, so a writer opening the name writes here."""
    if tmp.is_symlink() or tmp.exists():
        if tmp.is_dir() and not tmp.is_symlink():
            raise PipelineError(f"{tmp} is a directory where a temporary file goes; remove it")
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    os.close(fd)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def regular_file(path: Path | str, fix: str, max_bytes: int | None = None) -> int:
    """The size of ``path``, after checking it is a regular file (links followed) of at most
    ``max_bytes``; otherwise one :class:`PipelineError` naming the file, ending with ``fix``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise PipelineError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PipelineError(f"{path} is not a regular file; {fix}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise PipelineError(f"{path} is {st.st_size:,} bytes, more than the {max_bytes:,} such a file can be; {fix}")
    return st.st_size


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic(dst) as tmp:
        shutil.copyfile(src, tmp)


MAX_JSON_BYTES = 1 << 26  # a manifest or settings file larger than this is not one


def read_json(path: Path) -> Any:
    """A JSON artifact; refused (not read) unless it is a regular file of at most :data:`MAX_JSON_BYTES`
    (a missing file raises ``FileNotFoundError`` as ``open`` would)."""
    if os.path.exists(path):
        regular_file(path, "it is not one this tool wrote", MAX_JSON_BYTES)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Unchanged:
    """Whether a run directory is still the one loaded: its manifest's device, inode, size and
    modification time, taken when made and compared by :meth:`check` (a run trained again, or its
    manifest replaced, changes them)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.identity = self._now()

    def _now(self) -> tuple:
        try:
            st = os.stat(self.root / RUN_MANIFEST)
        except OSError:
            return ()
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def check(self) -> None:
        """Raise :class:`PipelineError` when the run on disk is no longer the one loaded: files opened
        from now on would belong to another run."""
        if self._now() != self.identity:
            raise PipelineError(f"{self.root} was replaced on disk after it was loaded (trained again?); load it again")

