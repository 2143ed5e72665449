"""The table of patterns seen in training: key, shape, position cell, counts per class, one example.

Pattern ids are row numbers of this table (keys sorted ascending), and the
same ids are the FAISS ids of :mod:`pipeline.index`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .hashing import KeyPlan

_COLUMNS = ("key", "count", "class_counts", "slot", "example_image")


def _part(keys: np.ndarray, labels: np.ndarray, ids: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    n, k = keys.shape
    flat = keys.reshape(-1)
    u, first, inv, counts = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
    lab = np.repeat(labels, k)
    ok = lab >= 0
    cc = np.bincount(inv[ok] * num_classes + lab[ok], minlength=len(u) * num_classes).reshape(len(u), num_classes)
    return {
        "key": u,
        "count": counts.astype(np.int64),
        "class_counts": cc.astype(np.int64),
        "slot": (first % k).astype(np.int64),
        "example_image": ids[first // k].astype(np.int64),
    }


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    cat = {c: np.concatenate([p[c] for p in parts]) for c in _COLUMNS}
    order = np.argsort(cat["key"], kind="stable")  # stable: the earliest part's example wins
    cat = {c: v[order] for c, v in cat.items()}
    starts = np.flatnonzero(np.r_[True, cat["key"][1:] != cat["key"][:-1]])
    return {
        "key": cat["key"][starts],
        "count": np.add.reduceat(cat["count"], starts),
        "class_counts": np.add.reduceat(cat["class_counts"], starts, axis=0),
        "slot": cat["slot"][starts],
        "example_image": cat["example_image"][starts],
    }


def collect(batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int, merge_every: int = 16) -> dict[str, np.ndarray]:
    """Distinct keys of ``(keys N x K, labels, image_ids)`` batches with their counts and first example."""
    parts: list[dict[str, np.ndarray]] = []
    for keys, labels, ids in batches:
        if len(keys):
            parts.append(_part(keys, labels, ids, num_classes))
        if len(parts) >= merge_every:
            parts = [_merge(parts)]
    if not parts:
        return {c: np.empty((0, num_classes) if c == "class_counts" else 0, np.uint64 if c == "key" else np.int64) for c in _COLUMNS}
    return _merge(parts)


def to_table(stats: dict[str, np.ndarray], plan: KeyPlan) -> pa.Table:
    """The Parquet table of patterns: ids, keys, shape and location of the first example, counts."""
    loc = plan.locate(stats["slot"])
    cc = stats["class_counts"]
    return pa.table(
        {
            "pattern_id": pa.array(np.arange(len(stats["key"]), dtype=np.int64)),
            "key": pa.array(stats["key"], pa.uint64()),
            "h": pa.array(loc["h"]),
            "w": pa.array(loc["w"]),
            "cell": pa.array(loc["cell"]),
            "count": pa.array(stats["count"]),
            "class_counts": pa.FixedSizeListArray.from_arrays(pa.array(cc.reshape(-1), pa.int64()), cc.shape[1]),
            "example_image": pa.array(stats["example_image"]),
            "example_y": pa.array(loc["y"]),
            "example_x": pa.array(loc["x"]),
        }
    )


def write(table: pa.Table, path: Path) -> None:
    tmp = layout.tmp_path(path)
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def read(path: Path) -> dict[str, np.ndarray]:
    """The pattern table as numpy columns (``class_counts`` as P x C)."""
    t = pq.read_table(path)
    out = {c: t.column(c).to_numpy() for c in t.column_names if c != "class_counts"}
    cc = t.column("class_counts").combine_chunks()
    out["class_counts"] = cc.flatten().to_numpy().reshape(len(t), cc.type.list_size)
    return out
