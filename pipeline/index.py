"""The FAISS index over learned pattern vectors: build, save, load, search.

Ids are pattern ids (rows of ``patterns.parquet``). ``faiss-gpu`` is used for
search when it is installed and a GPU is visible; the saved index is always the
CPU form, so a run directory works on either kind of machine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layout
from .errors import PipelineError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise PipelineError(
            "FAISS is not installed; pip install 'patchhash[cpu]' (faiss-cpu) or 'patchhash[gpu]' (faiss-gpu)"
        ) from None
    return faiss


def build(vectors: np.ndarray, path: Path) -> None:
    """Build an exact L2 index (``IndexFlatL2``) over ``vectors`` (P x d float32) and save it atomically."""
    faiss = _faiss()
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    idx = faiss.IndexFlatL2(v.shape[1])
    if len(v):
        idx.add(v)
    tmp = layout.tmp_path(path)
    faiss.write_index(idx, str(tmp))
    tmp.replace(path)


def load(path: Path):
    """Read a saved index (on the GPU when faiss-gpu and a GPU are present)."""
    faiss = _faiss()
    if not path.exists():
        raise PipelineError(f"{path} is missing; the run is incomplete, train it again")
    idx = faiss.read_index(str(path))
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        idx = faiss.index_cpu_to_gpu(res, 0, idx)
        idx._patchhash_res = res  # keep the GPU resources alive with the index
    return idx


def search(idx, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each Q x k; squared L2 distances; id -1 where fewer than k vectors exist."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if len(q) == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return idx.search(q, k)
