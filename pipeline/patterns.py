"""The table of patterns seen in training: key, shape, position cell, counts per class, one example.

Pattern ids are row numbers of this table: the vocabulary keys, ascending, so
pattern id = table row = FAISS id of :mod:`pipeline.index`. The statistics come
from :func:`pipeline.training.vocab.pattern_stats`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.extraction.hashing import KeyPlan

def to_table(stats: dict[str, np.ndarray], plan: KeyPlan, pixels: pa.Array | None = None) -> pa.Table:
    """The Parquet table of patterns: ids, keys, shape and location of the first example, the atom of
    a code-view pattern (-1 for exact views), counts, and the pattern's pixels (``example_pixels``:
    h*w*C bytes, row-major HWC; the first example for exact views, the atom drawn for the code view;
    null when unknown)."""
    if pixels is None:
        pixels = pa.nulls(len(stats["key"]), pa.large_binary())
    loc = plan.locate(stats["slot"])
    cc = stats["class_counts"]
    return pa.table(
        {
            "pattern_id": pa.array(np.arange(len(stats["key"]), dtype=np.int64)),
            "key": pa.array(stats["key"], pa.uint64()),
            "h": pa.array(loc["h"]),
            "w": pa.array(loc["w"]),
            "cell": pa.array(loc["cell"]),
            "view": pa.array(loc["view"]),
            "atom": pa.array(stats["atom"] if "atom" in stats else np.full(len(stats["key"]), -1, np.int64)),
            "count": pa.array(stats["count"]),
            "class_counts": pa.FixedSizeListArray.from_arrays(pa.array(cc.reshape(-1), pa.int64()), cc.shape[1]),
            "example_image": pa.array(stats["example_image"]),
            "example_y": pa.array(loc["y"]),
            "example_x": pa.array(loc["x"]),
            "example_pixels": pixels.cast(pa.large_binary()),
        }
    )


def write(table: pa.Table, path: Path) -> None:
    with layout.atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read(path: Path) -> dict[str, np.ndarray]:
    """The pattern table as numpy columns (``class_counts`` as P x C), without the pixels (see :func:`pixels`)."""
    names = [c for c in pq.ParquetFile(path).schema_arrow.names if c != "example_pixels"]
    t = pq.read_table(path, columns=names)
    out = {c: t.column(c).to_numpy() for c in t.column_names if c != "class_counts"}
    cc = t.column("class_counts").combine_chunks()
    out["class_counts"] = cc.flatten().to_numpy().reshape(len(t), cc.type.list_size)
    return out


def pixels(path: Path, ids: np.ndarray, h: np.ndarray, w: np.ndarray, channels: int) -> list[np.ndarray | None]:
    """The example pixels (h x w x C uint8) of patterns ``ids``; None where the run has none."""
    pf = pq.ParquetFile(path)
    if "example_pixels" not in pf.schema_arrow.names:
        return [None] * len(ids)
    col = pq.read_table(path, columns=["example_pixels"]).column(0).take(pa.array(np.asarray(ids, np.int64)))
    out = []
    for v, hh, ww in zip(col.to_pylist(), h, w):
        out.append(None if v is None else np.frombuffer(v, np.uint8).reshape(int(hh), int(ww), channels))
    return out
