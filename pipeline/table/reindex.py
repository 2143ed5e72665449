"""pipe index: a finished run's pattern index rebuilt as another kind, or its query-time knobs changed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline import layout, outputs
from pipeline.errors import PipelineError
from pipeline.table import index as pattern_index
from pipeline.table import weights


def rebuild_index(root, index: str, nprobe: int | None = None, ef_search: int | None = None, seed: int = 0) -> dict:
    """Rebuild a finished run's pattern index as ``index`` (a kind of :data:`pipeline.table.index.KINDS`
    or a FAISS factory string) and record it in the run manifest; returns its entry, with ``rebuilt``
    False when only the query-time knobs changed (``index`` is what the run already has, so nothing
    is rebuilt)."""
    root = Path(root)
    pattern_index.check_params(nprobe, ef_search)
    mpath = root / layout.RUN_MANIFEST
    if not mpath.exists():
        raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
    with outputs.locked(root, "pipe index"):
        return _rebuild(root, mpath, index, nprobe, ef_search, seed)


def _rebuild(root: Path, mpath: Path, kind: str, nprobe: int | None, ef_search: int | None, seed: int) -> dict:
    """:func:`rebuild_index` with the run locked."""
    manifest = layout.read_json(mpath)
    old = pattern_index.IndexInfo.from_dict(manifest["index"])
    dim = old.dim
    pattern_index.check_kind(kind, dim)
    resolved, factory = pattern_index.choose(kind, old.vectors, dim)
    if factory == old.factory:  # same index: only the recorded knob it has changes
        info = dataclasses.replace(
            old, kind=resolved,
            nprobe=old.nprobe and (nprobe or old.nprobe),
            ef_search=old.ef_search and (ef_search or old.ef_search),
        )
    else:
        state = weights.load(root / layout.WEIGHTS, "train the run again")
        vectors = np.asarray(state["table.weight"])[: old.vectors]
        info = pattern_index.build(vectors, root / layout.PATTERN_INDEX, kind, nprobe, ef_search, seed)
    manifest["index"] = info.to_dict()
    layout.write_json(mpath, manifest)
    return dict(manifest["index"], rebuilt=factory != old.factory)
