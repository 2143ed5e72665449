"""The vocabulary: which keys get a row of their own in the pattern table, and where the rest go.

Keys are counted over the training images (every occurrence, as fastText
counts words) in a compiled open-addressing hash table, one pass over the
shards. Keys seen at least ``min_count`` times get their own rows, in key
order (row i = the i-th smallest such key). The rare tail either shares
``buckets`` hashed rows after them (``key % buckets``) or is dropped
(``buckets = 0``). Memory: 16 bytes per table slot, so about 32 bytes per distinct key during counting
(the table is kept at most half full); after it, the vocabulary's keys (8 bytes each)
and their key -> row look-up table (16 bytes per slot, at most half full).
"""
from __future__ import annotations

import zipfile

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline import layout
from pipeline.table import count_tables
from pipeline.data.augment import VARIANT_STRIDE
from pipeline.errors import ParameterError, PipelineError


def _table_size(n: int) -> int:
    return 1 << max(4, int(np.ceil(np.log2(max(2 * n, 16)))))


class OverBudget(Exception):
    """A counting table would pass its memory budget (caught by :func:`build`, which partitions)."""


class KeyCounter:
    """Exact occurrence counts of uint64 keys, streamed batch by batch.

    With ``parts`` > 1 it counts only the keys of partition ``part`` (their top bits),
    so a 1/parts share of the distinct keys; ``budget_bytes`` raises :class:`OverBudget`
    instead of growing the table past it.
    """

    def __init__(self, capacity: int = 1 << 16, part: int = 0, parts: int = 1, budget_bytes: int | None = None):
        self.slots = np.zeros((_table_size(capacity), 2), np.uint64)
        self.distinct = 0
        self.total = 0
        self.budget = budget_bytes
        bits = parts.bit_length() - 1  # parts is a power of two; a partition is a value of the top bits
        self.part_mask = np.uint64(0) if bits == 0 else np.uint64(((1 << bits) - 1) << (64 - bits))
        self.part_value = np.uint64(0) if bits == 0 else np.uint64(part << (64 - bits))

    def _grow(self, need: int) -> None:
        size = _table_size(need)
        if self.budget is not None and (size + len(self.slots)) * 16 > self.budget:
            raise OverBudget
        keys, counts = self._items()
        self.slots = np.zeros((size, 2), np.uint64)
        count_tables.add_counts(keys, counts, self.slots)

    def _items(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.slots[:, 1] != 0
        return self.slots[used, 0], self.slots[used, 1].astype(np.int64)

    def add(self, keys: np.ndarray) -> None:
        if 2 * (self.distinct + keys.size) > len(self.slots):  # room even if every key is new: never more than half full
            self._grow(self.distinct + keys.size)
        self.distinct += count_tables.count_keys(np.ascontiguousarray(keys), self.slots, self.part_mask, self.part_value)
        self.total += keys.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, counts)."""
        k, c = self._items()
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
        self._slots = np.zeros((_table_size(len(self.keys)), 2), np.uint64)
        count_tables.fill_table(self.keys, np.arange(len(self.keys), dtype=np.int64), self._slots)
        self._local: np.ndarray | None = None
        # merge scratch for keys sharing a bucket row; bag_rows reads it only when buckets > 0
        scratch = self.rows if self.buckets else 1
        self._stamp = np.full(scratch, -1, np.int64)
        self._where = np.zeros(scratch, np.int64)

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
        return count_tables.lookup_rows(keys, self._slots, len(self.keys), self.buckets, out)

    def own_ids(self, keys: np.ndarray) -> np.ndarray:
        """The pattern id of each key (its own row), -1 for a key without one (dropped, or sharing
        a bucket row)."""
        rows = self.rows_of(keys)
        return np.where(rows < self.size, rows, -1)

    def bags(self, keys: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each image's keys (N x K) as distinct rows with counts: (rows, offsets N+1, counts float32).

        With ``weights`` (N x K float32) a row's count is the sum of its keys' weights instead of
        how many there are. Not thread-safe (it uses scratch arrays of the vocabulary); one
        reader at a time.
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        w = np.zeros((0, 0), np.float32) if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
        if weights is not None and w.shape != keys.shape:
            raise ValueError(f"weights of shape {w.shape} do not match keys of shape {keys.shape}")
        if self._local is None or len(self._local) < 2 * keys.shape[1]:
            self._local = np.zeros((_table_size(keys.shape[1]), 2), np.uint64)
        return count_tables.bag_rows(keys, w, self._slots, len(self.keys), self.buckets, self._local, self._stamp, self._where)

    def save(self, path: Path) -> None:
        with layout.atomic(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, counts=self.counts, buckets=np.int64(self.buckets), min_count=np.int64(self.min_count))

    @classmethod
    def load(cls, path: Path, stats: dict | None = None) -> "Vocabulary":
        layout.regular_file(path, "the run is incomplete, train it again")
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, counts, buckets, min_count = z["keys"], z["counts"], int(z["buckets"]), int(z["min_count"])
            if keys.dtype != np.uint64 or keys.ndim != 1 or counts.shape != keys.shape or counts.dtype.kind not in "iu" or buckets < 0:
                raise ValueError(f"keys {keys.dtype} {keys.shape}, counts {counts.dtype} {counts.shape}, buckets {buckets}")
            if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
                raise ValueError("keys not ascending")
        except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise PipelineError(f"{path} is not a readable vocabulary ({e.__class__.__name__}: {e}); train the run again") from None
        return cls(keys, counts, buckets, min_count, stats or {})


def build(
    batches: Callable[[], Iterable[np.ndarray]],
    min_count: int,
    buckets: int,
    progress: Callable[[int], None] | None = None,
    memory_mb: int | None = None,
) -> Vocabulary:
    """Count the keys of the training images and choose the vocabulary.

    ``batches()`` yields N x K key arrays and can be called more than once. The count is
    exact in bounded memory: when the counting table would pass ``memory_mb``, the keys
    are split by their top bits into 2, 4, 8, ... partitions, each counted in its own pass
    over ``batches()``, keeping only each partition's vocabulary keys (``stats['passes']``).
    ``progress`` is told the images counted (a share of each batch per pass when there are
    several); when an attempt restarts in more passes it is told minus what that attempt reported,
    so its total is one pass over the images.
    """
    if min_count < 1:
        raise ParameterError("min_count", f"{min_count} must be at least 1")
    if buckets < 0:
        raise ParameterError("buckets", f"{buckets} must be 0 (drop rare keys) or more")
    budget = None if memory_mb is None else memory_mb << 20
    parts = 1
    told = [0.0]  # images reported by the attempt under way

    def tell(n: float) -> None:
        told[0] += n
        if progress:
            progress(n)

    while True:
        try:
            return _count_in_parts(batches, parts, budget, min_count, buckets, tell)
        except OverBudget:
            if progress and told[0]:
                progress(-told[0])  # the attempt starts again in more passes: take back what it reported
            told[0] = 0.0
            if parts >= 1 << 16:
                raise ParameterError("vocab_mb", f"{memory_mb} is too small to count the keys even in {parts} passes; raise it") from None
            parts *= 2


def _count_in_parts(batches, parts: int, budget: int | None, min_count: int, buckets: int, progress) -> Vocabulary:
    own_keys, own_counts = [], []
    distinct = total = tail_keys = tail_occ = 0
    used = np.zeros(buckets, np.bool_) if buckets else None
    for part in range(parts):
        counter = KeyCounter(part=part, parts=parts, budget_bytes=budget)
        for keys in batches():
            counter.add(keys)
            if progress:
                progress(len(keys) if parts == 1 else len(keys) / parts)
        keys, counts = counter.result()
        own = counts >= min_count
        own_keys.append(keys[own])
        own_counts.append(counts[own])
        distinct += len(keys)
        total = counter.total
        tail_keys += int((~own).sum())
        tail_occ += int(counts[~own].sum())
        if buckets:
            used[(keys[~own] % np.uint64(buckets)).astype(np.int64)] = True
    keys, counts = np.concatenate(own_keys), np.concatenate(own_counts)  # partitions are key ranges, so still ascending
    occupied = int(used.sum()) if buckets else 0
    stats = {
        "distinct_keys": int(distinct),
        "occurrences": int(total),
        "vocabulary": int(len(keys)),
        "vocabulary_occurrences": int(counts.sum()),
        "tail_keys": int(tail_keys),
        "tail_occurrences": int(tail_occ),
        "buckets": int(buckets),
        "buckets_used": occupied,
        # tail keys that share a bucket with another tail key (0 when the tail is dropped)
        "tail_collisions": int(tail_keys - occupied) if buckets else 0,
        "rows": int(len(keys)) + int(buckets),
        "passes": parts,
    }
    return Vocabulary(keys, counts, buckets, min_count, stats)


class PatternStats:
    """For each vocabulary key: occurrences per class and the first (image, slot) it occurs at,
    gathered batch by batch (:meth:`add`); :meth:`columns` gives what
    :func:`pipeline.table.patterns.to_table` takes (pattern id = vocabulary row)."""

    def __init__(self, vocab: Vocabulary, num_classes: int):
        self.vocab = vocab
        v = vocab.size
        self.class_counts = np.zeros((v, num_classes), np.int64)
        self.first_image = np.full(v, -1, np.int64)
        self.first_slot = np.zeros(v, np.int64)

    def add(self, keys: np.ndarray, labels: np.ndarray, image_ids: np.ndarray) -> None:
        """Count one batch of training images: keys N x K, their labels and image ids."""
        count_tables.pattern_stats(
            np.ascontiguousarray(keys, dtype=np.uint64), labels.astype(np.int64), image_ids.astype(np.int64),
            self.vocab._slots, self.class_counts, self.first_image, self.first_slot, VARIANT_STRIDE,
        )

    def columns(self) -> dict[str, np.ndarray]:
        return {"key": self.vocab.keys, "count": self.vocab.counts, "class_counts": self.class_counts, "slot": self.first_slot,
                "example_image": self.first_image}


def pattern_stats(vocab: Vocabulary, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict[str, np.ndarray]:
    """:class:`PatternStats` of every batch (keys N x K, labels, image_ids) of ``batches``."""
    stats = PatternStats(vocab, num_classes)
    for keys, labels, ids in batches:
        stats.add(keys, labels, ids)
    return stats.columns()
