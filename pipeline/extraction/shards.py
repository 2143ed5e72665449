"""The shard format: Parquet files of one row per image plus ``manifest.json``.

Each row holds ``image_id`` (int64, position in the source order), ``label``
(int32, -1 when unknown), ``name`` (string) and ``patch_keys``: a fixed-size
binary value holding the image's keys as little-endian uint64, one
position-free content key per patch in the patch order of
:class:`pipeline.extraction.hashing.KeyPlan` (key j of every row is the same shape and
location). With a code view (format v3) two more fixed-size columns hold, per
code slot, the atom id (``code_atoms``, little-endian uint16) and its weight
(``code_weights``, little-endian float32). Keys that include the grid cell, and
the code view's keys, are derived from these when read
(:meth:`Shards.iter_batches`), so they cost no disk. Files are named
``part-00000-of-00004.parquet``; the manifest, written last, is the commit point.
The layout and codec were chosen by ``benchmarks/storage.py``; see docs/format.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.extraction.codes import Dictionary
from pipeline.config import ExtractConfig
from pipeline.errors import ParameterError, PipelineError
from pipeline.data.augment import VARIANT_STRIDE, base_ids, flip_variant, is_original
from pipeline.data.split import is_validation
from pipeline.extraction.hashing import KeyPlan

FORMAT = "patchhash-shards-v3"
READABLE_FORMATS = ("patchhash-shards-v2", FORMAT)  # v2: no code view
CODECS = ("snappy", "lz4", "zstd", "none")
DEFAULT_CODEC = "snappy"  # chosen by benchmarks/storage.py (docs/format.md)


def schema(patches_per_image: int, config: ExtractConfig, code_slots: int = 0) -> pa.Schema:
    meta = {
        b"patchhash.format": FORMAT.encode(),
        b"patchhash.fingerprint": config.fingerprint().encode(),
        b"patchhash.config": json.dumps(config.to_dict(), sort_keys=True).encode(),
    }
    return pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("name", pa.string(), nullable=False),
        ]
        # one fixed-size blob per image: no per-key levels to encode (benchmarks/storage.py compares the layouts)
        # (left out when there are no exact views: Parquet has no zero-width values)
        + (
            [
                pa.field(
                    "patch_keys",
                    pa.binary(8 * patches_per_image),
                    nullable=False,
                    metadata={b"patchhash.encoding": f"little-endian uint64 x {patches_per_image}, patch order".encode()},
                )
            ]
            if patches_per_image
            else []
        )
        + (
            [
                pa.field("code_atoms", pa.binary(2 * code_slots), nullable=False,
                         metadata={b"patchhash.encoding": f"little-endian uint16 x {code_slots}, code slot order".encode()}),
                pa.field("code_weights", pa.binary(4 * code_slots), nullable=False,
                         metadata={b"patchhash.encoding": f"little-endian float32 x {code_slots}, code slot order".encode()}),
            ]
            if code_slots
            else []
        ),
        metadata=meta,
    )


class ShardWriter:
    """Writes one shard file, one row group per :meth:`write` (the caller writes it through
    :func:`pipeline.layout.atomic`, so it appears under its name only when complete)."""

    def __init__(self, path: Path, schema: pa.Schema, compression: str = DEFAULT_CODEC):
        if compression not in CODECS:
            raise ParameterError("compression", f"{compression!r} is not one of {', '.join(CODECS)}")
        self.schema = schema
        self.rows = 0
        self.patches = 0
        self._writer = pq.ParquetWriter(
            path,
            schema,
            compression=compression,
            use_dictionary=["label"],
            # min/max of random keys help no reader; computing them costs a pass over every key
            write_statistics=["image_id", "label"],
            write_page_checksum=True,  # verified on read: a flipped bit is an error, not a wrong key
        )

    def write(
        self, image_ids: np.ndarray, labels: np.ndarray, names: list[str], patch_keys: np.ndarray,
        code_atoms: np.ndarray | None = None, code_weights: np.ndarray | None = None,
    ) -> None:
        """Append one row group: one row per image, ``patch_keys`` N x patches_per_image uint64 and,
        with a code view, ``code_atoms`` / ``code_weights`` N x code_slots."""
        blobs = [("patch_keys", patch_keys, "<u8")] if "patch_keys" in self.schema.names else []
        if "code_atoms" in self.schema.names:
            blobs += [("code_atoms", code_atoms, "<u2"), ("code_weights", code_weights, "<f4")]
        arrays = [pa.array(image_ids, pa.int64()), pa.array(labels, pa.int32()), pa.array(names, pa.string())]
        for name, values, dtype in blobs:
            blob_type = self.schema.field(name).type
            a = np.ascontiguousarray(values, dtype=dtype)
            if a.ndim != 2 or a.shape[1] * a.itemsize != blob_type.byte_width:
                raise ValueError(f"{name}: {a.shape[1:]} values per image do not fit the shard's {blob_type.byte_width // a.itemsize}")
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(blob_type, len(a), [None, pa.py_buffer(a)]))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table)
        self.rows += len(image_ids)
        self.patches += patch_keys.size + (code_atoms.size if code_atoms is not None else 0)

    def close(self) -> dict:
        """Finish the file; returns its rows and patches."""
        self._writer.close()
        return {"rows": self.rows, "patches": self.patches}


@dataclass
class KeyBatch:
    """Keys of a batch of images read back from shards."""

    image_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    keys: np.ndarray  # N x keys_per_image uint64, key order (position keys derived)
    names: list[str] | None = None  # file names, when read (``names=True``)
    weights: np.ndarray | None = None  # N x keys_per_image float32 in key order; None = every weight 1
    atoms: np.ndarray | None = None  # content batches only: N x code_slots uint16 atom ids of the code view
    vote_keys: np.ndarray | None = None  # the keys predictions are made from when not ``keys`` (a run's mirror vote: N x 2K)
    vote_weights: np.ndarray | None = None  # their weights (None with ``vote_keys`` None, or every weight 1)


def with_copy(b: KeyBatch, mask: np.ndarray, variant: int, where) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(keys, weights, rows) of the original images of ``b`` that ``mask`` keeps: each row's keys
    followed by those of the image's copy number ``variant`` (its mirror, scored with it), and the
    originals' row numbers in ``b``. An extract writes every image's copies into its own row group,
    in the originals' order; shards where a copy is missing are refused."""
    own = np.flatnonzero(mask & is_original(b.image_ids))
    twin = np.flatnonzero(mask & (np.asarray(b.image_ids, np.int64) // VARIANT_STRIDE == variant))
    if len(twin) != len(own) or (base_ids(b.image_ids[twin]) != b.image_ids[own]).any():
        raise PipelineError(f"in {where}, some images are not stored beside their copy number {variant}; extract the shards again")
    keys = np.concatenate([b.keys[own], b.keys[twin]], axis=1)
    weights = None if b.weights is None else np.concatenate([b.weights[own], b.weights[twin]], axis=1)
    return keys, weights, own


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
        if not isinstance(self.manifest, dict) or self.manifest.get("format") not in READABLE_FORMATS:
            got = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise PipelineError(f"{root} was written in format {got!r}, expected {FORMAT!r}; extract again")
        try:
            self.config = ExtractConfig.from_dict(self.manifest["config"])
            self.fingerprint: str = str(self.manifest["fingerprint"])
            self.height: int = int(self.manifest["height"])
            self.width: int = int(self.manifest["width"])
            self.class_names: list[str] = [str(c) for c in self.manifest["class_names"]]
            self._entries = [(str(e["file"]), int(e["rows"]), int(e["bytes"])) for e in self.manifest["shards"]]
            images = int(self.manifest["images"])
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(f"{mpath} is damaged ({e.__class__.__name__}: {e}); run pipe extract again") from None
        if self.config.fingerprint() != self.fingerprint:
            raise PipelineError(f"{mpath} is inconsistent (its config does not give its fingerprint); run pipe extract again")
        self._check_files(mpath, images)

    def _check_files(self, mpath: Path, images: int) -> None:
        """Every shard the manifest lists is a file inside the directory with the recorded size and
        row count, and the rows add up to the manifest's image count."""
        root = self.root.resolve()
        for name, rows, size in self._entries:
            path = (self.root / name).resolve()
            if path.parent != root:
                raise PipelineError(f"{mpath} lists the shard {name!r}, which is outside {self.root}; the manifest is not pipe's: extract again")
            if not path.is_file():
                raise PipelineError(f"shard {name} of {self.root} is missing; extract again (the data would be incomplete)")
            if path.stat().st_size != size:
                raise PipelineError(f"shard {name} of {self.root} is {path.stat().st_size:,} bytes, the manifest says {size:,}; extract again")
            got = self._open(self.root / name).metadata.num_rows
            if got != rows:
                raise PipelineError(f"shard {name} of {self.root} holds {got:,} rows, the manifest says {rows:,}; extract again")
        if sum(r for _, r, _ in self._entries) != images:
            raise PipelineError(f"the shards of {self.root} hold {sum(r for _, r, _ in self._entries):,} images, the manifest says {images:,}; extract again")

    @property
    def num_images(self) -> int:
        return int(self.manifest["images"])

    @property
    def keys_per_image(self) -> int:
        return int(self.manifest["keys_per_image"])

    @property
    def patches_per_image(self) -> int:
        return int(self.manifest["patches_per_image"])

    @property
    def mirror_variant(self) -> int:
        """The variant number of each image's left-right mirror among its stored copies
        (:func:`pipeline.data.augment.flip_variant` of the extract's ``augment``), 0 when none is stored."""
        return flip_variant(self.manifest.get("augment", "none"))

    def plan(self) -> KeyPlan:
        """The key plan of these shards (without the dictionary: the stored codes need none)."""
        return KeyPlan(self.config, self.height, self.width)

    @property
    def dictionary_path(self) -> Path:
        return self.root / layout.DICTIONARY

    def dictionary(self):
        """The code view's dictionary, checked against the config's digest; None without a code view."""
        return Dictionary.load(self.dictionary_path, self.config.dictionary) if self.config.has_code else None

    def files(self) -> list[Path]:
        return [self.root / name for name, _, _ in self._entries]

    def check_fingerprint(self, expected: str, what: str) -> None:
        if self.fingerprint != expected:
            raise PipelineError(
                f"{self.root} was extracted with config {self.fingerprint}, but {what} expects {expected}; "
                "extract the images again with the run's settings"
                + (" and `dictionary` RUN/dictionary.npz" if self.config.has_code else "")
                + " (or pass the image source instead)"
            )

    def _open(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path, page_checksum_verification=True)
        except (OSError, pa.ArrowInvalid) as e:
            raise PipelineError(f"cannot read shard {path} ({e}); extract again") from None

    def row_groups(self, files: list[Path] | None = None) -> list[tuple[Path, int]]:
        """Every (shard file, row group) of ``files`` (default all shards) in order: the unit a
        shuffled reader permutes."""
        return [(path, rg) for path in (self.files() if files is None else files) for rg in range(self._open(path).num_row_groups)]

    def iter_content(
        self, files: list[Path] | None = None, groups: list[tuple[Path, int]] | None = None, names: bool = False
    ) -> Iterator[KeyBatch]:
        """Yield one :class:`KeyBatch` per Parquet row group with the stored content keys (exact patches,
        patch order), and with a code view the stored atom ids (``atoms``) and weights (``weights``,
        code slot order).

        ``groups`` reads exactly those (file, row group) pairs in that order; else every row
        group of ``files`` (default all shards) in order.
        """
        if groups is None:
            groups = self.row_groups(files)
        # one shard open at a time: an open ParquetFile keeps memory from each row group it read
        # until it is closed, so keeping every shard open would grow through a whole pass
        pf, pf_path = None, None
        code = self.code_slots
        exact = self.patches_per_image - code
        cols = ["image_id", "label"] + (["patch_keys"] if exact else []) + (["code_atoms", "code_weights"] if code else [])
        try:
            for path, rg in groups:
                if path != pf_path:
                    if pf is not None:
                        pf.close()
                    pf, pf_path = self._open(path), path
                try:
                    t = pf.read_row_group(rg, columns=cols + (["name"] if names else []))
                except (OSError, pa.ArrowInvalid) as e:
                    raise PipelineError(f"shard {path} is damaged ({e}); extract again") from None
                yield KeyBatch(
                    t.column("image_id").to_numpy().astype(np.int64),
                    t.column("label").to_numpy().astype(np.int64),
                    patch_matrix(t.column("patch_keys"), exact) if exact else np.empty((len(t), 0), np.uint64),
                    t.column("name").to_pylist() if names else None,
                    patch_matrix(t.column("code_weights"), code, "<f4") if code else None,
                    patch_matrix(t.column("code_atoms"), code, "<u2") if code else None,
                )
        finally:
            if pf is not None:
                pf.close()

    def iter_batches(
        self, files: list[Path] | None = None, groups: list[tuple[Path, int]] | None = None, names: bool = False
    ) -> Iterator[KeyBatch]:
        """Yield one :class:`KeyBatch` per Parquet row group with keys in key order (see :meth:`iter_content`)."""
        plan = self.plan()
        for b in self.iter_content(files, groups, names):
            yield KeyBatch(b.image_ids, b.labels, plan.expand(b.keys, b.atoms), b.names, plan.expand_weights(b.weights))

    def part_groups(
        self, val: bool, fraction: float, groups: list[tuple[Path, int]] | None = None, vote: int = 0
    ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]]:
        """(index of the row group in ``groups``, (keys, labels, image_ids, weights)) of the training
        (or, ``val``, the validation) images, ``fraction`` of them held out by a hash of their id;
        ``weights`` is None when every key weighs 1 (no code view).

        Validation is scored on original images only, not on augmented copies; images without a
        label (-1) are in neither part. ``vote`` > 0 (validation only): each original's row holds
        its keys followed by those of its copy number ``vote`` (:func:`with_copy`).
        """
        groups = self.row_groups() if groups is None else groups
        for g, b in enumerate(self.iter_batches(groups=groups)):
            m = (is_validation(b.image_ids, fraction) == val) & (b.labels >= 0)
            if val and vote:
                keys, weights, own = with_copy(b, m, vote, self.root)
                if len(own):
                    yield g, (keys, b.labels[own], b.image_ids[own], weights)
                continue
            if val:
                m &= is_original(b.image_ids)
            if m.any():
                yield g, (b.keys[m], b.labels[m], b.image_ids[m], None if b.weights is None else b.weights[m])

    def part_batches(self, val: bool, fraction: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(keys, labels, image_ids, weights) of the training (or validation) images, row group by row group."""
        for _, part in self.part_groups(val, fraction):
            yield part

    def part_keys(self, val: bool, fraction: float) -> Iterator[np.ndarray]:
        """The keys alone of :meth:`part_batches` (what counting the vocabulary reads)."""
        for keys, _, _, _ in self.part_batches(val, fraction):
            yield keys

    def count_training(self, fraction: float) -> int:
        """How many images training reads per epoch (labelled, not held out for validation by
        ``fraction``); reads the image_id and label columns only."""
        n = 0
        for path in self.files():
            t = self._open(path).read(columns=["image_id", "label"])
            ids, labels = t.column("image_id").to_numpy(), t.column("label").to_numpy()
            n += int(((~is_validation(ids, fraction)) & (labels >= 0)).sum())
        return n

    def classes_present(self) -> np.ndarray:
        """The distinct labels (>= 0) of the shards' images; reads the label column only."""
        seen = [np.unique(self._open(path).read(columns=["label"]).column("label").to_numpy()) for path in self.files()]
        labels = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
        return labels[labels >= 0]

    @property
    def code_slots(self) -> int:
        """Atom ids (and weights) stored per image for the code view; 0 without one."""
        return int(self.manifest.get("code_slots", 0))


def patch_matrix(column: pa.ChunkedArray, per_image: int, dtype: str = "<u8") -> np.ndarray:
    """A fixed-size binary column as an N x per_image array of ``dtype`` (zero-copy for one chunk;
    ``patch_keys`` by default, as uint64)."""
    col = column.combine_chunks()
    native = np.dtype(dtype).newbyteorder("=")
    if len(col) == 0:
        return np.empty((0, per_image), native)
    flat = np.frombuffer(col.buffers()[1], dtype=dtype)
    flat = flat[col.offset * per_image : (col.offset + len(col)) * per_image]
    return flat.reshape(len(col), per_image).astype(native, copy=False)
