"""Images as batches of bags: which images train and which validate, shuffling, prefetch, and the in-memory cache.

An image's keys become a bag of distinct table rows with counts (CSR: rows,
offsets, counts). The first epoch reads the shards: all row groups in a seeded
random order, then a shuffle buffer of about ``SHUFFLE_IMAGES`` images, built by
a background thread while the model trains. While it reads, it keeps every row
group's bags in a :class:`BagCache` up to a memory budget (``--cache-mb``); when
they all fit, later epochs draw a fresh permutation of all training images from
memory instead of reading and hashing the shards again, and validation reads its
images once. A cache that would pass the budget is dropped and every epoch
streams, in bounded memory.

The cache is indexed in the shards' canonical row-group order, not the order the
first epoch happened to read, so a resumed run that refills it draws exactly the
batches an uninterrupted run draws.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from pipeline.table import vocab
from pipeline.extraction.shards import Shards

SHUFFLE_IMAGES = 8192  # images held in the shuffle buffer when streaming
PREFETCH_BATCHES = 8  # batches prepared ahead by the reader thread


@dataclass
class Bags:
    """A batch of images as bags of distinct table rows with counts (CSR)."""

    rows: np.ndarray  # int64
    offsets: np.ndarray  # int64, N + 1
    counts: np.ndarray  # float32
    labels: np.ndarray  # int64
    raw_keys: int  # keys the images had before deduplication and vocabulary filtering

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a).to(device) for a in (self.rows, self.offsets, self.counts, self.labels))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.offsets.nbytes + self.counts.nbytes + self.labels.nbytes


def to_bags(v: vocab.Vocabulary, keys: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Bags:
    """Images' keys (N x K, with per-key weights or all 1) as bags of distinct rows with summed weights."""
    rows, offsets, counts = v.bags(keys, weights)
    return Bags(rows, offsets, counts, labels, keys.size)


def concat_bags(parts: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, keys_per_image: int) -> Bags:
    """One batch from per-image (rows, counts) pairs."""
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(r) for r, _ in parts], out=offsets[1:])
    rows = np.concatenate([r for r, _ in parts]).astype(np.int64, copy=False)
    return Bags(rows, offsets, np.concatenate([c for _, c in parts]), labels, keys_per_image * len(parts))


class BagCache:
    """The bags of one part's images (training or validation), kept per row group within a byte budget.

    Rows are stored as int32 when the table allows (half the memory of int64).
    """

    def __init__(self, budget_bytes: int, keys_per_image: int):
        self.budget = budget_bytes
        self.k = keys_per_image
        self.groups: dict[int, Bags] = {}
        self.nbytes = 0
        self.overflow = budget_bytes <= 0
        self.complete = False

    def add(self, group: int, b: Bags) -> None:
        if self.overflow or self.complete:
            return
        small = b.rows.astype(np.int32) if b.rows.size and b.rows.max() < 2**31 else b.rows
        b = Bags(small, b.offsets, b.counts, b.labels, b.raw_keys)
        if self.nbytes + b.nbytes > self.budget:
            self.overflow = True
            self.groups.clear()
            self.nbytes = 0
            return
        self.groups[group] = b
        self.nbytes += b.nbytes

    def seal(self) -> bool:
        """Mark a finished pass over the part: from now on the cache serves it (unless it overflowed)."""
        self.complete = not self.overflow
        return self.complete

    @property
    def images(self) -> int:
        return sum(len(b.labels) for b in self.groups.values())

    def _index(self) -> tuple[list[Bags], np.ndarray, np.ndarray]:
        parts = [self.groups[g] for g in sorted(self.groups)]
        which = np.concatenate([np.full(len(b.labels), i, np.int64) for i, b in enumerate(parts)]) if parts else np.zeros(0, np.int64)
        pos = np.concatenate([np.arange(len(b.labels)) for b in parts]) if parts else np.zeros(0, np.int64)
        return parts, which, pos

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[Bags]:
        """All images in batches: a fresh permutation from ``rng``, or in canonical order without one."""
        parts, which, pos = self._index()
        order = rng.permutation(len(which)) if rng is not None else np.arange(len(which))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            chosen = []
            for i in idx:
                b, p = parts[which[i]], pos[i]
                lo, hi = b.offsets[p], b.offsets[p + 1]
                chosen.append((b.rows[lo:hi], b.counts[lo:hi]))
            labels = np.asarray([parts[which[i]].labels[pos[i]] for i in idx], np.int64)
            yield concat_bags(chosen, labels, self.k)

    def fill(self, shards: Shards, v: vocab.Vocabulary, val: bool, fraction: float, vote: int = 0) -> None:
        """Read the whole part into the cache (a resumed run refilling it before its next epoch);
        ``vote`` as :meth:`Shards.part_groups`."""
        for g, (keys, labels, _, weights) in shards.part_groups(val, fraction, vote=vote):
            self.add(g, to_bags(v, keys, labels, weights))
            if self.overflow:
                break
        self.seal()


def shuffled_bags(
    shards: Shards, v: vocab.Vocabulary, fraction: float, batch_size: int, rng: np.random.Generator, cache: BagCache | None = None
) -> Iterator[Bags]:
    """Training batches read from the shards in a seeded random order: all row groups permuted, then a shuffle buffer.

    Sources are often sorted by class (an image folder, CIFAR's tar), so shards and their
    row groups are too; permuting row groups across all shards, not just files, is what
    lets the buffer mix classes. Each row group's bags also
    go to ``cache``, under the group's canonical index.
    """
    groups = shards.row_groups()
    order = rng.permutation(len(groups))
    k = shards.keys_per_image
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    buf_labels: list[int] = []

    def drain(final: bool) -> Iterator[Bags]:
        nonlocal buf, buf_labels
        perm = rng.permutation(len(buf))
        full = len(buf) if final else (len(buf) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            idx = perm[s : s + batch_size]
            yield concat_bags([buf[i] for i in idx], np.asarray([buf_labels[i] for i in idx], np.int64), k)
        rest = perm[full:]
        buf, buf_labels = [buf[i] for i in rest], [buf_labels[i] for i in rest]

    for g, (keys, labels, _, weights) in shards.part_groups(False, fraction, [groups[i] for i in order]):
        b = to_bags(v, keys, labels, weights)
        if cache is not None:
            cache.add(int(order[g]), b)
        for a in range(len(labels)):
            lo, hi = b.offsets[a], b.offsets[a + 1]
            buf.append((b.rows[lo:hi], b.counts[lo:hi]))
            buf_labels.append(int(labels[a]))
        if len(buf) >= SHUFFLE_IMAGES:
            yield from drain(False)
    if buf:
        yield from drain(True)


def validation_bags(shards: Shards, v: vocab.Vocabulary, fraction: float, batch_size: int = 512, cache: BagCache | None = None,
                    vote: int = 0) -> Iterator[Bags]:
    """The validation images in batches: from ``cache`` when it holds them, else read (and offered to
    it). ``vote`` > 0: each image's bag also holds the rows of its copy number ``vote`` (its mirror:
    the image is scored as the bag of both, :attr:`pipeline.config.TrainConfig.vote`)."""
    if cache is not None and cache.complete:
        yield from cache.batches(batch_size)
        return
    for g, (keys, labels, _, weights) in shards.part_groups(True, fraction, vote=vote):
        b = to_bags(v, keys, labels, weights)
        if cache is not None:
            cache.add(g, b)
        for s in range(0, len(labels), batch_size):
            lo, hi = b.offsets[s], b.offsets[min(s + batch_size, len(labels))]
            offsets = b.offsets[s : s + batch_size + 1] - lo
            yield Bags(b.rows[lo:hi], offsets, b.counts[lo:hi], b.labels[s : s + batch_size], keys.shape[1] * len(offsets[:-1]))
    if cache is not None:
        cache.seal()


def prefetch(items: Iterable, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Iterate ``items`` in a background thread, ``depth`` ahead (numba and Arrow release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.01)
