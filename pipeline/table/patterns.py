"""The table of patterns seen in training: key, shape, position cell, counts per class, one example.

Pattern ids are row numbers of this table: the vocabulary keys, ascending, so
pattern id = table row = FAISS id of :mod:`pipeline.table.index`. The statistics come
from :func:`pipeline.table.vocab.pattern_stats`.

The file is written in row groups of ``ROW_GROUP`` patterns, so a query reads the
patterns it names (:func:`read_rows`) by decoding only their row groups, not the whole table.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.extraction.hashing import KeyPlan

ROW_GROUP = 1024  # patterns per Parquet row group: what reading one pattern by id decodes

def to_table(stats: dict[str, np.ndarray], plan: KeyPlan, pixels: pa.Array | None = None) -> pa.Table:
    """The Parquet table of patterns: ids, keys, shape and location of the first example, the atom of
    a code-view pattern (-1 for exact views), counts, and the pattern's pixels (``example_pixels``:
    h*w*C bytes, row-major HWC; the first example for exact views, the atom drawn for the code view;
    null when unknown)."""
    if pixels is None:
        pixels = pa.nulls(len(stats["key"]), pa.large_binary())
    loc = plan.locate(stats["slot"])
    loc["h"], loc["w"] = plan.pattern_shape(stats["slot"])  # a pooled code slot's place is its cell; its pattern is the code shape's
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
            "class_counts": class_counts_column(cc),
            "example_image": pa.array(stats["example_image"]),
            "example_y": pa.array(loc["y"]),
            "example_x": pa.array(loc["x"]),
            "example_pixels": pixels.cast(pa.large_binary()),
        }
    )


def class_counts_column(cc: np.ndarray) -> pa.FixedSizeListArray:
    """The ``class_counts`` column of counts ``cc`` (patterns x classes): one fixed-size list per pattern."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(cc).reshape(-1), pa.int64()), cc.shape[1])


def write(table: pa.Table, path: Path) -> None:
    """Write a run's Parquet table (the pattern table, or the image table images.parquet) atomically,
    in row groups of ``ROW_GROUP`` rows, so that rows by id decode only their row groups."""
    with layout.atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)


def open_file(path: Path, rows: int, what: str) -> pq.ParquetFile:
    """A run's Parquet table at ``path`` (the pattern table, the image table), opened, refused unless
    readable with ``rows`` rows (one per {what} of the run)."""
    if not path.exists():
        raise PipelineError(f"{path} is missing; the run is incomplete or from an older version: train it again")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise PipelineError(f"{path} is not a readable Parquet file ({e.__class__.__name__}); train the run again") from None
    if pf.metadata.num_rows != rows:
        raise PipelineError(f"{path} has {pf.metadata.num_rows:,} rows but the run has {rows:,} {what}; train the run again")
    return pf


def read(pf: pq.ParquetFile) -> dict[str, np.ndarray]:
    """The (opened) pattern table as numpy columns (``class_counts`` as P x C), without the pixels (see :func:`pixels`)."""
    return columns(pf.read(columns=[c for c in pf.schema_arrow.names if c != "example_pixels"]))


def read_rows(pf: pq.ParquetFile, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows ``ids`` (row numbers, in that order, repeats allowed) of a Parquet file (the pattern
    table, the image table), reading only ``columns`` of the row groups that hold them."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    meta = pf.metadata
    starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    if len(ids) and (ids.min() < 0 or ids.max() >= starts[-1]):
        raise IndexError(f"pattern ids must lie in 0..{starts[-1] - 1}")
    g_of = np.searchsorted(starts, ids, side="right") - 1  # the row group of each id
    groups = np.unique(g_of)
    if not len(groups):
        return pf.schema_arrow.empty_table().select(columns)
    part = pf.read_row_groups(groups.tolist(), columns=columns)
    # row r of group g sits at (rows of the groups read before g) + (r - start of g)
    before = np.cumsum([0] + [int(starts[g + 1] - starts[g]) for g in groups[:-1]])
    local = before[np.searchsorted(groups, g_of)] + (ids - starts[g_of])
    local = np.ascontiguousarray(local, np.int64)  # from its buffer: pa.array(ndarray) imports pandas
    return part.take(pa.Array.from_buffers(pa.int64(), len(local), [None, pa.py_buffer(local)]))


def array(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as numpy, read from its buffer where it has no nulls (pyarrow's
    ``to_numpy`` imports pandas, a second of a query's start)."""
    return numpy(table.column(name).combine_chunks())


def numpy(arr: pa.Array) -> np.ndarray:
    """:func:`array` of one Arrow array."""
    kind = "i" if pa.types.is_signed_integer(arr.type) else "u" if pa.types.is_unsigned_integer(arr.type) else "f" if pa.types.is_floating(arr.type) else None
    if arr.null_count == 0 and kind:
        width = arr.type.bit_width // 8
        return np.frombuffer(arr.buffers()[1], np.dtype(f"<{kind}{width}"), len(arr), arr.offset * width).copy()
    return arr.to_numpy(zero_copy_only=False)


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    """A (part of the) pattern table as numpy columns, ``class_counts`` as P x C."""
    out = {c: array(table, c) for c in table.column_names if c not in ("class_counts", "example_pixels")}
    if "class_counts" in table.column_names:
        cc = table.column("class_counts").combine_chunks()
        out["class_counts"] = numpy(cc.flatten()).reshape(len(table), cc.type.list_size)
    return out


def pixels(pf: pq.ParquetFile, ids: np.ndarray, channels: int) -> list[np.ndarray | None]:
    """The example pixels (h x w x C uint8) of patterns ``ids``; None where the run has none."""
    if "example_pixels" not in pf.schema_arrow.names:
        return [None] * len(ids)
    t = read_rows(pf, ids, ["h", "w", "example_pixels"])
    out = []
    for v, hh, ww in zip(t.column("example_pixels").to_pylist(), t.column("h").to_pylist(), t.column("w").to_pylist()):
        out.append(None if v is None else np.frombuffer(v, np.uint8).reshape(int(hh), int(ww), channels))
    return out
