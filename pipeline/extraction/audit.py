"""Collision audit: are distinct patches ever given the same key?

For every shape, the exact content of each patch (its quantized symbols, packed
losslessly into a uint64 when they fit, else compared as raw bytes) and its
content key are collected; the audit then compares the number of distinct
contents with the number of distinct keys, within each shape and over all
shapes together. Keys are a function of (shape, content), so any shortfall of
keys is a collision. The count is printed next to the birthday-bound
expectation for ``bits``-bit keys; ``bits`` below 64 truncates the keys, which
is how the tests plant collisions.

Memory grows with the number of distinct patches (8 bytes each for packed
contents), so audit a sample (``limit``) when the shapes are large.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline import layout
from pipeline.config import ExtractConfig
from pipeline.extraction.stage import resolve
from pipeline.extraction.hashing import KeyPlan
from pipeline.data.sources import Source

Progress = Callable[[int, int], None]


def expected_collisions(n: int, bits: int) -> float:
    """Expected number of lost distinct values when ``n`` distinct items get uniform random ``bits``-bit keys."""
    m = 2.0**bits
    if n <= 1:
        return 0.0
    if n / m < 1e-6:
        return n * (n - 1) / (2 * m)  # birthday bound; the exact formula below cancels catastrophically here
    return n - m * -math.expm1(n * math.log1p(-1 / m))


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort, then the positions where a value changes)."""
    if values.dtype.kind == "V":  # raw-byte rows of large patches: numpy compares those itself
        return np.unique(values)
    a = np.sort(values)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


class _Distinct:
    """Distinct values of a stream of arrays, merged lazily (sorted runs, merged when they double)."""

    def __init__(self) -> None:
        self.merged: np.ndarray | None = None
        self.runs: list[np.ndarray] = []
        self.pending = 0

    def add(self, values: np.ndarray) -> None:
        u = _unique(values)
        self.runs.append(u)
        self.pending += len(u)
        if self.pending > max(1 << 20, len(self.merged) if self.merged is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.merged] if self.merged is not None else []) + self.runs
        if parts:
            self.merged = _unique(np.concatenate(parts))
        self.runs, self.pending = [], 0

    def values(self) -> np.ndarray:
        self._merge()
        return self.merged if self.merged is not None else np.empty(0)


def _contents(syms: np.ndarray, h: int, w: int, stride: int, bits: int) -> np.ndarray:
    """The exact content of every h x w patch (row-major locations), as packed uint64 or as raw-byte rows."""
    win = sliding_window_view(syms, (h, w), axis=(1, 2))[:, ::stride, ::stride]
    win = win.reshape(-1, h * w)
    if h * w * bits <= 64:
        packed = np.zeros(len(win), np.uint64)
        for i in range(h * w):
            packed |= win[:, i].astype(np.uint64) << np.uint64(bits * i)
        return packed
    small = win.astype(np.uint8 if bits <= 8 else (np.uint16 if bits <= 16 else np.uint32))
    small = np.ascontiguousarray(small)
    return small.view(np.dtype((np.void, small.shape[1] * small.itemsize))).ravel()


def audit(
    source: Source,
    config: ExtractConfig = ExtractConfig(),
    bits: int = 64,
    limit: int | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict:
    """Count hash collisions among the patches of ``source`` (its first ``limit`` images) under ``config``."""
    if not 1 <= bits <= 64:
        raise ValueError("bits must be in 1..64")
    config = resolve(config, source)
    plan: KeyPlan | None = None
    views = config.view_list()
    # symbols per pixel: levels**channels, or 4**channels for the ordinal 'grad' view (2 bits per channel)
    sym_bits = [max(1, math.ceil(math.log2((4 if kind == "grad" else lv) ** config.channels))) for kind, lv in views]
    mask = np.uint64((1 << bits) - 1) if bits < 64 else None
    # one unit per (view, shape): keys of different views never share content by construction
    shapes = [(v, h, w) for v in range(len(views)) for h, w in config.shape_list()]
    contents = {s: _Distinct() for s in shapes}
    keys = {s: _Distinct() for s in shapes}
    images = patches = 0
    for batch in source.batches(batch_size, config.channels, config.resize):
        if limit is not None and images >= limit:
            break
        imgs = batch.images if limit is None else batch.images[: limit - images]
        if plan is None:
            plan = KeyPlan(config, imgs.shape[1], imgs.shape[2])
        syms = plan.symbols(imgs)
        content_keys = plan.content_keys(syms)
        if mask is not None:
            content_keys &= mask
        offset = 0
        for v, h, w in shapes:
            n = ((plan.height - h) // config.stride + 1) * ((plan.width - w) // config.stride + 1)
            keys[(v, h, w)].add(content_keys[:, offset : offset + n].ravel())
            contents[(v, h, w)].add(_contents(syms[:, v], h, w, config.stride, sym_bits[v]))
            offset += n
        images += len(imgs)
        patches += content_keys.size
        if progress:
            progress(len(imgs), content_keys.size)
    per_shape = []
    all_keys = _Distinct()
    distinct_contents = 0
    for s in shapes:
        kv = keys[s].values()
        nc = len(contents[s].values())
        all_keys.add(kv)
        distinct_contents += nc
        name = f"{s[1]}x{s[2]}" if len(views) == 1 else f"{config.views.split(',')[s[0]]} {s[1]}x{s[2]}"
        per_shape.append({"shape": name, "distinct_contents": nc, "distinct_keys": len(kv), "collisions": nc - len(kv)})
    distinct_keys = len(all_keys.values())
    return {
        "images": images,
        "patches": patches,
        "bits": bits,
        "distinct_contents": distinct_contents,
        "distinct_keys": distinct_keys,
        "collisions": distinct_contents - distinct_keys,
        "expected_collisions": expected_collisions(distinct_contents, bits),
        "per_shape": per_shape,
    }


def save(shards_dir, result: dict) -> None:
    """Record an audit in the shard directory's manifest (atomically)."""
    path = Path(shards_dir) / layout.MANIFEST
    manifest = layout.read_json(path)
    manifest["audit"] = result
    layout.write_json(path, manifest)
