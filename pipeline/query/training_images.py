"""A run's training images, loaded for reading: their ids, labels and names, thumbnails, and the
index of their pooled vectors that answers "which training images is this image like"."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.table import index as pattern_index
from pipeline.table import patterns as pattern_file


@dataclass
class ImageLookup:
    """Nearest training images of query images; every array is N x k."""

    distances: np.ndarray  # squared L2 between pooled vectors
    ids: np.ndarray  # rows of the image index (-1 where fewer than k)
    image_ids: np.ndarray  # the training images' ids in their shards / source order
    labels: np.ndarray  # their class indices
    names: np.ndarray  # their file names in the training source (None where unknown)


class TrainingImages:
    """The indexed training images of run directory ``root`` (``index_info`` describes their index;
    ``check_unchanged`` is called before a file is opened)."""

    def __init__(self, root: Path, index_info: pattern_index.IndexInfo, check_unchanged: Callable[[], None]):
        self.root = root
        self.index_info = index_info
        self.check_unchanged = check_unchanged

    @cached_property
    def file(self) -> pq.ParquetFile:
        """images.parquet, opened (its footer read)."""
        self.check_unchanged()
        return pattern_file.open_file(self.root / layout.IMAGES, self.index_info.vectors, "indexed images")

    @cached_property
    def index(self):
        """The index of the training images' pooled vectors (memory-mapped)."""
        self.check_unchanged()
        idx = pattern_index.load(self.root / layout.IMAGE_INDEX, self.index_info, check=True)
        if idx.ntotal != len(self.metadata["image_id"]):
            raise PipelineError(f"{self.root / layout.IMAGE_INDEX} holds {idx.ntotal:,} images but {layout.IMAGES} lists "
                                f"{len(self.metadata['image_id']):,}; train the run again")
        return idx

    @cached_property
    def metadata(self) -> dict[str, np.ndarray]:
        """``image_id``, ``label`` and (where known) ``name`` of the indexed images, row i = index id i."""
        cols = [c for c in ("image_id", "label", "name") if c in self.file.schema_arrow.names]
        t = self.file.read(columns=cols)
        out = {c: pattern_file.array(t, c) for c in ("image_id", "label")}
        out["name"] = np.array(t.column("name").to_pylist() if "name" in cols else [None] * len(t), object)
        return out

    def thumbnails(self, rows: np.ndarray) -> list[np.ndarray | None]:
        """Thumbnails (h x w x C uint8, at most 64 a side) of image-index rows ``rows``; None where the
        run has none (the source was unreadable at training, or the run predates them)."""
        rows = np.asarray(rows, np.int64)
        if "thumbnail" not in self.file.schema_arrow.names:
            return [None] * len(rows)
        t = pattern_file.read_rows(self.file, rows, ["thumbnail_shape", "thumbnail"])
        return [None if v is None else np.frombuffer(v, np.uint8).reshape(shape)
                for v, shape in zip(t.column("thumbnail").to_pylist(), t.column("thumbnail_shape").to_pylist())]

    def search(self, pooled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, index rows), each N x k, of the training images nearest pooled vectors."""
        return pattern_index.search(self.index, pooled, k)

    def nearest(self, pooled: np.ndarray, k: int) -> ImageLookup:
        """The k nearest training images of pooled vectors (N x d)."""
        d, ids = self.search(pooled, k)
        safe = np.maximum(ids, 0)
        im = self.metadata
        return ImageLookup(
            d, ids, np.where(ids >= 0, im["image_id"][safe], -1), np.where(ids >= 0, im["label"][safe], -1),
            np.where(ids >= 0, im["name"][safe], None),
        )
