"""FAISS indexes over learned vectors: choose a kind, build, save, load (memory-mapped), search.

Kinds follow FAISS's guidelines ("Guidelines to choose an index" in the FAISS wiki):

* ``flat``: exact search (``IndexFlatL2``), the choice for small sets and the reference.
* ``hnsw``: graph search (``HNSW32``), the best recall per query time when memory allows;
  slow to build on few cores.
* ``ivf``: inverted lists over k-means cells (``IVF<n>,Flat``), fast to build, recall set by
  ``nprobe`` at query time.
* ``ivfpq``: the same with vectors compressed by product quantization (``IVF<n>,PQ<m>``),
  for when memory is short; approximate distances.
* ``auto``: ``flat`` up to :data:`EXACT_UP_TO` vectors, ``ivf`` beyond: ``ivf`` builds in
  seconds where ``hnsw`` would take longer than the training itself on a large table, at a
  recall close to it (``benchmarks/query.py``; the figures are in docs/results.md).

Any other string is passed to ``faiss.index_factory`` as is (e.g. ``"HNSW64"``,
``"OPQ16_64,IVF4096,PQ16"``). The saved index is always the CPU form and is loaded
memory-mapped, so a run directory works on either kind of machine and large indexes are
paged in on demand. ``faiss-gpu`` is used for search when it is installed and a GPU is
visible (Flat and IVF kinds; HNSW has no GPU form and stays on the CPU).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import layout
from pipeline.errors import ParameterError, PipelineError

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_UP_TO = 100_000  # auto: exact search below this many vectors
DEFAULT_NPROBE = 32  # inverted lists searched per query: chosen on benchmarks/query.py's recall / speed curve
DEFAULT_EF_SEARCH = 64
HNSW_M = 32
TRAIN_PER_LIST = 40  # k-means training sample per inverted list (FAISS warns below 39)
MAX_LISTS = 4096  # bounds the k-means and assignment cost of building an IVF index


def _faiss():
    try:
        import faiss
    except ImportError:
        raise PipelineError(
            "FAISS is not installed; pip install 'patchhash[cpu]' (faiss-cpu) or 'patchhash[gpu]' (faiss-gpu)"
        ) from None
    return faiss


@dataclass
class IndexInfo:
    """What was built, recorded in the run manifest."""

    kind: str  # flat | hnsw | ivf | ivfpq | factory
    factory: str  # the faiss.index_factory string
    vectors: int
    dim: int
    exact: bool
    nprobe: int | None = None
    ef_search: int | None = None
    build_s: float = 0.0
    metric: str = "L2"
    digest: str = ""  # file_digest of the saved file: another run's index of the same size is told apart

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexInfo":
        if "factory" not in d:  # runs from before index kinds: always exact Flat
            return cls("flat", "Flat", int(d.get("vectors", 0)), int(d["dim"]), True)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: a power of two near 2*sqrt(n), between 16 and :data:`MAX_LISTS`."""
    return int(min(MAX_LISTS, max(16, 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1))))))


def choose(kind: str, n: int, dim: int) -> tuple[str, str]:
    """(resolved kind, faiss factory string) for ``kind`` over n vectors of dimension dim."""
    k = kind.strip()
    low = k.lower()
    if low == "auto":
        low = "flat" if n <= EXACT_UP_TO else "ivf"
    if low == "flat":
        return "flat", "Flat"
    if low == "hnsw":
        return "hnsw", f"HNSW{HNSW_M}"
    if low == "ivf":
        return "ivf", f"IVF{_ivf_lists(n)},Flat"
    if low == "ivfpq":
        m = next(m for m in (32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
        return "ivfpq", f"IVF{_ivf_lists(n)},PQ{m}"
    return "factory", k


def _validate(factory: str, dim: int):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError:
        raise ParameterError(
            "index", f"{factory!r} is neither a kind ({', '.join(KINDS)}) nor a FAISS index_factory string "
            "(see the FAISS wiki, 'The index factory'), e.g. HNSW32 or IVF1024,PQ16"
        ) from None


def check_kind(kind: str, dim: int = 64) -> None:
    """Raise :class:`PipelineError` now (before training) for an index kind FAISS cannot build."""
    _validate(choose(kind, 1_000_000, dim)[1], dim)


def check_params(nprobe: int | None, ef_search: int | None) -> None:
    """Refuse an ``nprobe`` or ``ef_search`` below 1 (None = as recorded)."""
    for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
        if v is not None and not 1 <= v <= 1 << 20:
            raise ParameterError(name, f"{v} must be from 1 to {1 << 20:,}")


def apply_params(idx, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set the query-time knobs of an index that has them (others are left alone)."""
    check_params(nprobe, ef_search)
    faiss = _faiss()
    base = idx
    if nprobe is not None:
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            ivf.nprobe = int(nprobe)
    if ef_search is not None:
        h = faiss.downcast_index(base)
        if hasattr(h, "hnsw"):
            h.hnsw.efSearch = int(ef_search)


def build(
    vectors: np.ndarray,
    path: Path,
    kind: str = "auto",
    nprobe: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> IndexInfo:
    """Build an index of ``kind`` over ``vectors`` (n x d float32; id i = row i) and save it atomically.

    ``progress`` is told how many vectors were added, chunk by chunk (for an HNSW graph: all at
    once, which its parallel insertion needs); training an IVF quantizer comes first."""
    path = Path(path)
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = v.shape
    resolved, factory = choose(kind, n, dim)
    t0 = time.perf_counter()
    idx = _validate(factory, dim)
    if not idx.is_trained:
        ivf = _faiss().try_extract_index_ivf(idx)
        need = ivf.nlist if ivf is not None else 1
        if n < need:
            raise ParameterError("index", f"{kind!r} needs at least {need} vectors to train, got {n}; use `index` flat")
        # a product quantizer's codebooks (256 centroids each) want PQ_TRAIN points, more than the coarse lists may
        take = min(n, max(TRAIN_PER_LIST * need, PQ_TRAIN if "PQ" in factory.upper() else 0))
        sample = v if take == n else v[np.sort(np.random.default_rng(seed).choice(n, take, replace=False))]
        idx.train(sample)
    ivf_like = _faiss().try_extract_index_ivf(idx) is not None
    hnsw_like = hasattr(_faiss().downcast_index(idx), "hnsw")
    step = n if hnsw_like else ADD_CHUNK  # a flat or IVF index adds each vector on its own: chunks change nothing
    for lo in range(0, n, max(step, 1)):
        chunk = v[lo : lo + step]
        idx.add(chunk)
        if progress:
            progress(len(chunk))
    info = IndexInfo(
        kind=resolved,
        factory=factory,
        vectors=n,
        dim=dim,
        exact=factory == "Flat",
        nprobe=(nprobe or DEFAULT_NPROBE) if ivf_like else None,
        ef_search=(ef_search or DEFAULT_EF_SEARCH) if hnsw_like else None,
        build_s=round(time.perf_counter() - t0, 2),
    )
    if hnsw_like:  # efSearch is stored with the graph
        apply_params(idx, ef_search=info.ef_search)
    try:
        with layout.atomic(path) as tmp:
            _faiss().write_index(idx, str(tmp))
    except RuntimeError as e:
        raise PipelineError(f"cannot write {path} ({_faiss_reason(e)}); is the disk full? free space and run again") from None
    info.digest = file_digest(path)
    return info


ADD_CHUNK = 1 << 16  # vectors added per call when the build reports progress
PQ_TRAIN = 39 * 256  # training points FAISS asks for to fit 256 centroids per product-quantizer codebook

DIGEST_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    """SHA-256 of a file's size and its first and last MiB: constant time however large the index,
    and different for any two runs (the stored vectors or centroids differ)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(DIGEST_BYTES))
        f.seek(max(0, size - DIGEST_BYTES))
        h.update(f.read(DIGEST_BYTES))
    return h.hexdigest()


def _faiss_reason(e: RuntimeError) -> str:
    """FAISS's C++ message without its source location and stack lines."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if ln.startswith("Error:")), lines[-1] if lines else "unknown error")
    return msg.removeprefix("Error:").strip().strip("'")


def load(path: Path, info: IndexInfo | None = None, gpu: bool = True, check: bool = False):
    """Read a saved index memory-mapped (on the GPU when faiss-gpu and a GPU are present); with
    ``check``, refuse one whose size or dimension is not ``info``'s (a file from another run)."""
    faiss = _faiss()
    if not path.exists():
        raise PipelineError(f"{path} is missing; the run is incomplete or from an older version: train it again")
    try:
        try:
            idx = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            idx = faiss.read_index(str(path))  # index types without a memory-mapped reader
    except RuntimeError as e:
        raise PipelineError(f"{path} is not a readable FAISS index ({_faiss_reason(e)}); train the run again, or rebuild it with pipe index") from None
    if check and info is not None and (idx.ntotal != info.vectors or idx.d != info.dim or (info.digest and file_digest(path) != info.digest)):
        raise PipelineError(
            f"{path} holds {idx.ntotal:,} vectors of dimension {idx.d}, but the run records {info.vectors:,} of {info.dim}"
            f"{' and another file digest' if idx.ntotal == info.vectors and idx.d == info.dim else ''}: "
            "it is another run's file; train the run again, or rebuild it with pipe index"
        )
    if info is not None:
        apply_params(idx, info.nprobe, info.ef_search)
    if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        try:
            res = faiss.StandardGpuResources()
            gidx = faiss.index_cpu_to_gpu(res, 0, idx)
            gidx._patchhash_res = res  # keep the GPU resources alive with the index
            idx = gidx
        except RuntimeError:
            pass  # no GPU form (HNSW): search on the CPU
    return idx


def search(idx, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each Q x k; squared L2 distances; id -1 where fewer than k vectors exist."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if len(q) == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return idx.search(q, k)
