"""The vocabulary: which keys get a row of their own in the pattern table, and where the rest go.

Keys are counted over the training images (every occurrence, as fastText
counts words) in a compiled open-addressing hash table, one pass over the
shards. Keys seen at least ``min_count`` times get their own rows, in key
order (row i = the i-th smallest such key). The rare tail either shares
``buckets`` hashed rows after them (``key % buckets``) or is dropped
(``buckets = 0``). Memory: about 24 bytes per distinct key during counting
(the table is kept at most half full), 8 bytes per vocabulary key after.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import kernels
from .errors import PipelineError


def _table_size(n: int) -> int:
    return 1 << max(4, int(np.ceil(np.log2(max(2 * n, 16)))))


class KeyCounter:
    """Exact occurrence counts of uint64 keys, streamed batch by batch."""

    def __init__(self, capacity: int = 1 << 20):
        size = _table_size(capacity)
        self.keys = np.zeros(size, np.uint64)
        self.used = np.zeros(size, np.bool_)
        self.counts = np.zeros(size, np.int64)
        self.distinct = 0
        self.total = 0

    def _grow(self, need: int) -> None:
        size = _table_size(need)
        old_keys, old_counts = self.keys[self.used], self.counts[self.used]
        self.keys = np.zeros(size, np.uint64)
        self.used = np.zeros(size, np.bool_)
        self.counts = np.zeros(size, np.int64)
        kernels.add_counts(old_keys, old_counts, self.keys, self.used, self.counts)

    def add(self, keys: np.ndarray) -> None:
        if 2 * (self.distinct + keys.size) > len(self.keys):
            self._grow(self.distinct + keys.size)
        self.distinct += kernels.count_keys(np.ascontiguousarray(keys), self.keys, self.used, self.counts)
        self.total += keys.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, counts)."""
        k, c = self.keys[self.used], self.counts[self.used]
        order = np.argsort(k)
        return k[order], c[order]


@dataclass
class Vocabulary:
    """Sorted vocabulary keys (own rows 0..V-1), their training counts, and the tail's buckets."""

    keys: np.ndarray  # V uint64, ascending
    counts: np.ndarray  # V int64
    buckets: int
    min_count: int
    stats: dict  # distinct keys, occurrences, tail figures

    def __post_init__(self) -> None:
        size = _table_size(len(self.keys))
        self._tkeys = np.zeros(size, np.uint64)
        self._tused = np.zeros(size, np.bool_)
        self._trows = np.zeros(size, np.int64)
        kernels.fill_table(self.keys, np.arange(len(self.keys), dtype=np.int64), self._tkeys, self._tused, self._trows)
        self._stamp = np.full(self.rows, -1, np.int64)
        self._where = np.zeros(self.rows, np.int64)

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def rows(self) -> int:
        """Rows of the pattern table: one per vocabulary key plus the shared buckets."""
        return len(self.keys) + self.buckets

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The table row of each key (same shape, int64): own row, shared bucket, or -1 (dropped)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(keys.shape, np.int64)
        return kernels.lookup_rows(keys, self._tkeys, self._tused, self._trows, len(self.keys), self.buckets, out)

    def bags(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each image's keys (N x K) as distinct rows with counts: (rows, offsets N+1, counts float32).

        Not thread-safe (it uses scratch arrays of the vocabulary); one reader at a time.
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        return kernels.bag_rows(keys, self._tkeys, self._tused, self._trows, len(self.keys), self.buckets, self._stamp, self._where)

    def save(self, path: Path) -> None:
        from . import layout

        tmp = layout.tmp_path(path)
        with open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, counts=self.counts, buckets=np.int64(self.buckets), min_count=np.int64(self.min_count))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, stats: dict | None = None) -> "Vocabulary":
        if not path.exists():
            raise PipelineError(f"{path} is missing; the run is incomplete, train it again")
        with np.load(path, allow_pickle=False) as z:
            return cls(z["keys"], z["counts"], int(z["buckets"]), int(z["min_count"]), stats or {})


def build(batches: Iterable[np.ndarray], min_count: int, buckets: int, progress: Callable[[int], None] | None = None) -> Vocabulary:
    """Count the keys of ``batches`` (N x K arrays of training keys) and choose the vocabulary."""
    if min_count < 1:
        raise PipelineError(f"--min-count {min_count} must be at least 1")
    if buckets < 0:
        raise PipelineError(f"--buckets {buckets} must be 0 (drop rare keys) or more")
    counter = KeyCounter()
    for keys in batches:
        counter.add(keys)
        if progress:
            progress(len(keys))
    keys, counts = counter.result()
    own = counts >= min_count
    tail_keys, tail_counts = keys[~own], counts[~own]
    occupied = len(np.unique(tail_keys % np.uint64(buckets))) if buckets and len(tail_keys) else 0
    stats = {
        "distinct_keys": int(len(keys)),
        "occurrences": int(counter.total),
        "vocabulary": int(own.sum()),
        "vocabulary_occurrences": int(counts[own].sum()),
        "tail_keys": int(len(tail_keys)),
        "tail_occurrences": int(tail_counts.sum()),
        "buckets": int(buckets),
        "buckets_used": int(occupied),
        # tail keys that share a bucket with another tail key (0 when the tail is dropped)
        "tail_collisions": int(len(tail_keys) - occupied) if buckets else 0,
        "rows": int(own.sum()) + int(buckets),
    }
    return Vocabulary(keys[own], counts[own], buckets, min_count, stats)


def pattern_stats(vocab: Vocabulary, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict[str, np.ndarray]:
    """For each vocabulary key: occurrences per class and the first (image, slot) it occurs at.

    ``batches`` yields (keys N x K, labels, image_ids) of the training images. The columns
    are what :func:`pipeline.patterns.to_table` takes; pattern id = vocabulary row.
    """
    v = vocab.size
    cc = np.zeros((v, num_classes), np.int64)
    first_image = np.full(v, -1, np.int64)
    first_slot = np.zeros(v, np.int64)
    for keys, labels, ids in batches:
        kernels.pattern_stats(
            np.ascontiguousarray(keys, dtype=np.uint64), labels.astype(np.int64), ids.astype(np.int64),
            vocab._tkeys, vocab._tused, vocab._trows, cc, first_image, first_slot,
        )
    return {"key": vocab.keys, "count": vocab.counts, "class_counts": cc, "slot": first_slot, "example_image": first_image}
