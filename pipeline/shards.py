"""The shard format: Parquet files of one row per image plus ``manifest.json``.

Each row holds ``image_id`` (int64, position in the source order), ``label``
(int32, -1 when unknown), ``name`` (string) and ``keys`` (fixed-size list of
uint64 in the canonical order of :class:`pipeline.hashing.KeyPlan`, so slot i of
every row is the same shape and location). Files are zstd-compressed and named
``part-00000-of-00004.parquet``; the manifest, written last, is the commit
point. See docs/format.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .config import ExtractConfig
from .errors import PipelineError
from .hashing import KeyPlan

FORMAT = "patchhash-shards-v1"


def schema(keys_per_image: int, config: ExtractConfig) -> pa.Schema:
    meta = {
        b"patchhash.format": FORMAT.encode(),
        b"patchhash.fingerprint": config.fingerprint().encode(),
        b"patchhash.config": json.dumps(config.to_dict(), sort_keys=True).encode(),
    }
    return pa.schema(
        [
            pa.field("image_id", pa.int64()),
            pa.field("label", pa.int32()),
            pa.field("name", pa.string()),
            pa.field("keys", pa.list_(pa.uint64(), keys_per_image)),
        ],
        metadata=meta,
    )


class ShardWriter:
    """Writes one shard file: row groups are appended, and the file appears under its name on :meth:`close`."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.tmp = layout.tmp_path(path)
        self.schema = schema
        self.rows = 0
        self.keys = 0
        self._writer = pq.ParquetWriter(
            self.tmp, schema, compression="zstd", use_dictionary=["label"], write_statistics=["image_id", "label"]
        )

    def write(self, image_ids: np.ndarray, labels: np.ndarray, names: list[str], keys: np.ndarray) -> None:
        k = keys.shape[1]
        table = pa.Table.from_arrays(
            [
                pa.array(image_ids, pa.int64()),
                pa.array(labels, pa.int32()),
                pa.array(names, pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1), pa.uint64()), k),
            ],
            schema=self.schema,
        )
        self._writer.write_table(table)
        self.rows += len(image_ids)
        self.keys += keys.size

    def close(self) -> dict:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "rows": self.rows, "keys": self.keys, "bytes": self.path.stat().st_size}

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class KeyBatch:
    """Keys of a batch of images read back from shards."""

    image_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    keys: np.ndarray  # N x keys_per_image uint64


class Shards:
    """A finished shard directory: its manifest, config and a streaming reader."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"shard directory {root} does not exist; create it with pipe extract")
        mpath = self.root / layout.MANIFEST
        if not mpath.exists():
            raise PipelineError(
                f"{root} has no {layout.MANIFEST}: the extract did not finish (or this is not a shard directory); "
                "run pipe extract again"
            )
        try:
            self.manifest = layout.read_json(mpath)
        except (ValueError, OSError) as e:
            raise PipelineError(f"{mpath} is not valid JSON ({e}); run pipe extract again") from None
        if self.manifest.get("format") != FORMAT:
            raise PipelineError(f"{root} was written in format {self.manifest.get('format')!r}, expected {FORMAT!r}; extract again")
        self.config = ExtractConfig.from_dict(self.manifest["config"])
        self.fingerprint: str = self.manifest["fingerprint"]
        self.height: int = self.manifest["height"]
        self.width: int = self.manifest["width"]
        self.class_names: list[str] = self.manifest["class_names"]

    @property
    def num_images(self) -> int:
        return int(self.manifest["images"])

    @property
    def keys_per_image(self) -> int:
        return int(self.manifest["keys_per_image"])

    def plan(self) -> KeyPlan:
        return KeyPlan(self.config, self.height, self.width)

    def files(self) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"]]

    def check_fingerprint(self, expected: str, what: str) -> None:
        if self.fingerprint != expected:
            raise PipelineError(
                f"{self.root} was extracted with config {self.fingerprint}, but {what} expects {expected}; "
                "extract the images again with the run's settings (or pass the image source instead)"
            )

    def iter_batches(self, files: list[Path] | None = None) -> Iterator[KeyBatch]:
        """Yield one :class:`KeyBatch` per Parquet row group, shard by shard."""
        for path in files if files is not None else self.files():
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as e:
                raise PipelineError(f"cannot read shard {path} ({e}); extract again") from None
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["image_id", "label", "keys"])
                yield _to_batch(t, self.keys_per_image)


def _to_batch(t: pa.Table, k: int) -> KeyBatch:
    keys_col = t.column("keys").combine_chunks()
    flat = keys_col.flatten().to_numpy(zero_copy_only=False) if len(keys_col) else np.empty(0, np.uint64)
    return KeyBatch(
        t.column("image_id").to_numpy().astype(np.int64),
        t.column("label").to_numpy().astype(np.int64),
        flat.reshape(len(keys_col), k),
    )
