"""Shard layout and codec, chosen by measurement: write speed, read speed and bytes per patch.

    python benchmarks/storage.py --json
    python benchmarks/storage.py --images 500 --repeat 2
    python benchmarks/storage.py --smoke --json     # seconds: 40 digits images, one run per cell (what CI runs)

Every candidate stores the same keys of the first N shared CIFAR-10 images (default
config) and is read back the way training reads shards: row group by row group into
an N x patches uint64 array. Layouts:

* ``list``: one row per image, ``list<uint64>`` with nullable items (Arrow's default);
* ``list_nonnull``: the same with non-nullable list and items (no definition levels);
* ``binary``: one row per image, the keys as one fixed-size binary blob: **ours**;
* ``long``: one row per patch (``image_id``, ``key``), the textbook tidy layout;
* ``binary_allkeys``: ``binary`` but storing both position modes' keys (as shards v1 did)
  instead of deriving the grid keys when read.

Codecs: lz4, snappy, zstd (level 1 and -5), none; plus Parquet dictionary encoding
(per key, so on a list layout) and the row-group size for our layout and codec.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_of, cifar_images, measured_config  # noqa: E402


def _table(layout: str, keys: np.ndarray, ids: np.ndarray) -> pa.Table:
    n, p = keys.shape
    flat = pa.array(keys.reshape(-1), pa.uint64())
    if layout == "list":
        return pa.table({"image_id": ids, "keys": pa.FixedSizeListArray.from_arrays(flat, p)})
    if layout == "list_nonnull":
        t = pa.list_(pa.field("key", pa.uint64(), nullable=False), p)
        schema = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("keys", t, nullable=False)])
        return pa.Table.from_arrays([pa.array(ids), pa.FixedSizeListArray.from_arrays(flat, type=t)], schema=schema)
    if layout in ("binary", "binary_allkeys"):
        arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * p), n, [None, pa.py_buffer(np.ascontiguousarray(keys))])
        schema = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("keys", pa.binary(8 * p), nullable=False)])
        return pa.Table.from_arrays([pa.array(ids), arr], schema=schema)
    if layout == "long":
        schema = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("key", pa.uint64(), nullable=False)])
        return pa.Table.from_arrays([pa.array(np.repeat(ids, p)), flat], schema=schema)
    raise ValueError(layout)


def _read(path: Path, layout: str, p: int) -> int:
    pf = pq.ParquetFile(path)
    total = 0
    for rg in range(pf.num_row_groups):
        col = pf.read_row_group(rg).column(1).combine_chunks()
        if layout in ("binary", "binary_allkeys"):
            keys = np.frombuffer(col.buffers()[1], np.uint64)[: len(col) * p].reshape(-1, p)
        elif layout == "long":
            keys = col.to_numpy().reshape(-1, p)
        else:
            keys = col.values.to_numpy(zero_copy_only=False).reshape(-1, p)
        total += keys.size
    return total


def measure(layout: str, codec: str, keys: np.ndarray, path: Path, repeat: int, rows_per_group: int, dictionary: bool = False) -> dict:
    n, p = keys.shape
    ids = np.arange(n, dtype=np.int64)
    name, level = (codec.split(":") + [None])[:2]

    def write() -> None:
        t = _table(layout, keys, ids)
        pq.write_table(
            t, path, compression=name, compression_level=int(level) if level else None,
            use_dictionary=dictionary, write_statistics=False,
            row_group_size=rows_per_group * (p if layout == "long" else 1),
        )

    t_w, _ = best_of(write, repeat)
    t_r, got = best_of(lambda: _read(path, layout, p), repeat)
    assert got == keys.size
    return {
        "layout": layout, "codec": codec, "dictionary": dictionary, "rows_per_group": rows_per_group,
        "write_patches_per_s": keys.size / t_w, "read_patches_per_s": keys.size / t_r,
        "bytes_per_patch": path.stat().st_size / keys.size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="CIFAR images [1000]")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the fastest counts [3]")
    ap.add_argument("--smoke", action="store_true", help="seconds: 40 digits images, one run per cell (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import pyarrow

    import pipeline

    from pipeline.extraction.stage import PATCHES_PER_ROW_GROUP
    from pipeline.extraction.hashing import KeyPlan

    pyarrow.set_cpu_count(1)
    if args.smoke:
        args.images, args.repeat = 40, 1
        images = next(pipeline.open_source("digits", limit=args.images).batches(args.images, 1)).images
        plan = KeyPlan(measured_config(color="gray"), 8, 8)
    else:
        images, _, _ = cifar_images(args.images)
        plan = KeyPlan(measured_config(color="rgb"), 32, 32)
    content = plan.content_keys(plan.symbols(images))
    allkeys = plan.expand(content)
    group = PATCHES_PER_ROW_GROUP // plan.patches_per_image
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.parquet"
        for layout in ("list", "list_nonnull", "binary", "long"):
            for codec in ("lz4", "snappy", "zstd:1", "zstd:-5", "none"):
                rows.append(measure(layout, codec, content, path, args.repeat, group))
        rows.append(measure("list_nonnull", "snappy", content, path, args.repeat, group, dictionary=True))  # per-key dictionary
        for g in (group // 4, group * 4):
            rows.append(measure("binary", "snappy", content, path, args.repeat, max(1, g)))
        r = measure("binary_allkeys", "snappy", allkeys, path, args.repeat, group // 2)
        r["bytes_per_patch"] *= allkeys.shape[1] / content.shape[1]  # per patch, not per key
        r["write_patches_per_s"] *= content.shape[1] / allkeys.shape[1]
        r["read_patches_per_s"] *= content.shape[1] / allkeys.shape[1]
        rows.append(r)
    out = {"images": args.images, "source": "digits" if args.smoke else "cifar", "patches": int(content.size), "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.images} CIFAR images, {content.size:,} patches (default config), best of {args.repeat}, one thread")
    print(f"{'layout':<16}{'codec':<9}{'dict':<6}{'rows/rg':>8}{'write Mp/s':>12}{'read Mp/s':>11}{'B/patch':>9}")
    for r in rows:
        print(
            f"{r['layout']:<16}{r['codec']:<9}{str(r['dictionary']):<6}{r['rows_per_group']:>8}"
            f"{r['write_patches_per_s'] / 1e6:>12.1f}{r['read_patches_per_s'] / 1e6:>11.1f}{r['bytes_per_patch']:>9.2f}"
        )


if __name__ == "__main__":
    main()
