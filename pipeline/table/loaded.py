"""A run's learned patterns, loaded for reading: the vocabulary, the vectors, the pattern table's
metadata and the pattern index, with searches that stay exact for rows moved since loading.

:class:`pipeline.query.run.Run` holds one as ``run.table``; queries read it, learning an image
(:mod:`pipeline.teach`) moves some of its rows in memory.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.table import index as pattern_index
from pipeline.table import patterns as pattern_file
from pipeline.table.vocab import Vocabulary

MOVED_SLACK = 64  # more index answers asked per query when rows moved, to make up for the dropped ones


class PatternTable:
    """The patterns of a run directory ``root``: ``vocab`` (key -> row), ``vectors`` (rows x dim
    float32, memory-mapped until a row moves), the pattern index described by ``index_info``.
    ``check_unchanged`` is called before a file is opened, to refuse files of a run trained again."""

    def __init__(self, root: Path, vocab: Vocabulary, vectors: np.ndarray, index_info: pattern_index.IndexInfo,
                 check_unchanged: Callable[[], None]):
        self.root = root
        self.vocab = vocab
        self.vectors = vectors
        self.index_info = index_info
        self.check_unchanged = check_unchanged
        self.moved = np.zeros(0, np.int64)  # rows changed in memory since loading (learn), ascending

    @property
    def size(self) -> int:
        """Learned patterns (rows with an own key; the vocabulary's hash buckets come after them)."""
        return self.vocab.size

    @cached_property
    def file(self) -> pq.ParquetFile:
        """patterns.parquet, opened (its footer read)."""
        self.check_unchanged()
        return pattern_file.open_file(self.root / layout.PATTERNS, self.vocab.size, "patterns")

    @cached_property
    def metadata(self) -> dict[str, np.ndarray]:
        """The whole pattern table's metadata as numpy columns, row i = pattern id i (one query needs
        only :meth:`metadata_of`)."""
        return pattern_file.read(self.file)

    def metadata_of(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Metadata of patterns ``ids`` (numpy columns parallel to ``ids``): from :attr:`metadata` once
        that is loaded (a server loads it), else read from their row groups only."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if "metadata" in self.__dict__:
            if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab.size):
                raise IndexError(f"pattern ids must lie in 0..{self.vocab.size - 1}")
            return {c: v[ids] for c, v in self.metadata.items()}
        names = [c for c in self.file.schema_arrow.names if c != "example_pixels"]
        return pattern_file.columns(pattern_file.read_rows(self.file, ids, names))

    def pixels(self, ids: np.ndarray, channels: int) -> list[np.ndarray | None]:
        """The stored example pixels (h x w x C uint8) of patterns ``ids``; None where there are none."""
        return pattern_file.pixels(self.file, ids, channels)

    @cached_property
    def index(self):
        """The pattern index (memory-mapped); ``nprobe`` / ``ef_search`` as recorded, see :meth:`tune`."""
        self.check_unchanged()
        return pattern_index.load(self.root / layout.PATTERN_INDEX, self.index_info, check=True)

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the pattern index's query-time knobs (recall against speed) for this session."""
        pattern_index.apply_params(self.index, nprobe, ef_search)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, pattern ids), each Q x k, of the learned patterns nearest ``vectors``.

        Rows moved in memory since loading (:attr:`moved`) are still at their old place in the
        index: the index is asked for more, its answers for moved rows are dropped, and the moved
        rows are searched exactly at their new place; the two lists are merged."""
        moved = self.moved
        if not len(moved):
            return pattern_index.search(self.index, vectors, k)
        q = np.ascontiguousarray(vectors, np.float32)
        extra = min(len(moved), MOVED_SLACK)
        d, ids = pattern_index.search(self.index, q, k + extra)
        stale = np.isin(ids, moved) | (ids < 0)
        d = np.where(stale, np.inf, d)
        at = self.vectors[moved]
        norms = (at * at).sum(1)
        out_d, out_ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for s in range(0, len(q), 1024):  # a block of queries at a time: Q x moved distances stay small
            qs = q[s : s + 1024]
            dm = np.maximum((qs * qs).sum(1)[:, None] - 2 * qs @ at.T + norms[None], 0).astype(np.float32)
            all_d = np.concatenate([d[s : s + 1024], dm], 1)
            all_ids = np.concatenate([ids[s : s + 1024], np.broadcast_to(moved, dm.shape)], 1)
            best = np.argsort(all_d, 1, kind="stable")[:, :k]
            out_d[s : s + 1024], out_ids[s : s + 1024] = np.take_along_axis(all_d, best, 1), np.take_along_axis(all_ids, best, 1)
        return out_d, np.where(np.isfinite(out_d), out_ids, -1)

    def move(self, rows: np.ndarray, vectors: np.ndarray, class_counts: np.ndarray) -> None:
        """Rows ``rows`` get ``vectors`` and every pattern's class counts grow by ``class_counts``
        (patterns x classes, possibly more classes than before), in memory only: the files on disk
        are not touched, and the memory-mapped vectors are copied at the first move."""
        cc = self.metadata["class_counts"]
        grown = np.zeros((len(cc), class_counts.shape[1]), np.int64)
        grown[:, : cc.shape[1]] = cc
        self.metadata["class_counts"] = grown + class_counts
        if not self.vectors.flags.writeable:
            self.vectors = np.array(self.vectors)
        rows = np.asarray(rows, np.int64)
        self.vectors[rows] = vectors
        self.moved = np.union1d(self.moved, rows[rows < self.vocab.size])
