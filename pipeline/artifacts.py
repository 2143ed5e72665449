"""The look-up artifacts written when training ends: pattern table with example pixels, pattern
index, and the index of the training images' pooled vectors.

Example pixels are cut from the images the shards were extracted from (found again through
the shard manifest's ``source`` entry); when that source is gone the column is left empty
and the run manifest says why.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import index as pattern_index
from . import layout, patterns
from .augment import VARIANT_STRIDE
from .bags import part_batches, to_bags
from .errors import PipelineError
from .hashing import KeyPlan
from .model import PatchBagModel
from .shards import Shards
from .sources import reopen
from .vocab import Vocabulary


def example_pixels(example_image: np.ndarray, slots: np.ndarray, plan: KeyPlan, shards: Shards) -> tuple[pa.Array, str | None]:
    """Each pattern's first occurrence as raw pixels (h*w*C bytes, row-major HWC), and a reason when missing.

    Images are read once, in source order, and only those that are some pattern's example.
    """
    n = len(slots)
    loc = plan.locate(slots)
    channels = shards.config.channels
    sizes = loc["h"].astype(np.int64) * loc["w"] * channels
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    try:
        src = reopen(shards.manifest["source"])
    except PipelineError as e:
        return pa.nulls(n, pa.binary()), f"source of the shards unreadable: {e}"
    data = np.zeros(int(offsets[-1]), np.uint8)
    order = np.argsort(example_image, kind="stable")
    sorted_ids = example_image[order]
    found = np.zeros(n, bool)
    for b in src.batches(256, channels, shards.config.resize):
        lo, hi = np.searchsorted(sorted_ids, [b.ids.min(), b.ids.max() + 1])
        if lo == hi:
            continue
        pats = order[lo:hi]
        where = np.searchsorted(b.ids, example_image[pats])
        where = np.minimum(where, len(b.ids) - 1)
        ok = b.ids[where] == example_image[pats]
        pats, where = pats[ok], where[ok]
        for h, w in {(int(a), int(c)) for a, c in zip(loc["h"][pats], loc["w"][pats])}:
            m = (loc["h"][pats] == h) & (loc["w"][pats] == w)
            p, img = pats[m], where[m]
            yy = loc["y"][p][:, None, None] + np.arange(h)[None, :, None]
            xx = loc["x"][p][:, None, None] + np.arange(w)[None, None, :]
            cut = b.images[img[:, None, None], yy, xx]  # P x h x w x C
            idx = offsets[p][:, None] + np.arange(h * w * channels)[None, :]
            data[idx] = cut.reshape(len(p), -1)
            found[p] = True
    arr = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    if not found.all():
        arr = pa.array([v if f else None for v, f in zip(arr.to_pylist(), found)], pa.large_binary())
        return arr, f"{int((~found).sum())} example images were unreadable"
    return arr, None


def training_vectors(model: PatchBagModel, v: Vocabulary, shards: Shards, val_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pooled vectors, image ids, labels) of the original training images (no augmented copies)."""
    vecs, ids, labels = [], [], []
    model.eval()
    with torch.no_grad():
        for keys, lab, img in part_batches(shards, False, val_fraction):
            keep = img < VARIANT_STRIDE
            if not keep.any():
                continue
            rows, offsets, counts, _ = to_bags(v, keys[keep], lab[keep]).tensors(torch.device("cpu"))
            vecs.append(model.pooled(rows, offsets, counts).numpy())
            ids.append(img[keep])
            labels.append(lab[keep])
    if not vecs:
        return np.zeros((0, model.table.weight.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(vecs), np.concatenate(ids), np.concatenate(labels)


def write_lookups(
    out, shards: Shards, model: PatchBagModel, v: Vocabulary, stats: dict, index_kind: str, nprobe: int, ef_search: int,
    val_fraction: float, seed: int, stage: Callable[[str], None] | None = None,
) -> dict:
    """Write patterns.parquet, patterns.faiss, images.faiss and images.parquet; returns the manifest entries."""
    plan = shards.plan()
    say = stage or (lambda _: None)
    say("pattern examples")
    pixels, missing = example_pixels(stats["example_image"], stats["slot"], plan, shards)
    patterns.write(patterns.to_table(stats, plan, pixels), out / layout.PATTERNS)
    say("pattern index")
    vectors = model.table.weight.detach().numpy()[: v.size]
    info = pattern_index.build(vectors, out / layout.PATTERN_INDEX, index_kind, nprobe, ef_search, seed)
    say("image index")
    ivec, iids, ilab = training_vectors(model, v, shards, val_fraction)
    image_info = pattern_index.build(ivec, out / layout.IMAGE_INDEX, "flat")
    tmp = layout.tmp_path(out / layout.IMAGES)
    pq.write_table(pa.table({"image_id": pa.array(iids, pa.int64()), "label": pa.array(ilab, pa.int64())}), tmp)
    tmp.replace(out / layout.IMAGES)
    return {"index": info.to_dict(), "image_index": image_info.to_dict(), "examples": missing or "complete"}


def rebuild_index(root, kind: str, nprobe: int | None = None, ef_search: int | None = None, seed: int = 0) -> dict:
    """Rebuild a finished run's pattern index as ``kind`` and record it in the run manifest; returns its entry.

    Only the query-time knobs change (no rebuild) when ``kind`` is what the run already has.
    """
    from pathlib import Path

    root = Path(root)
    mpath = root / layout.RUN_MANIFEST
    if not mpath.exists():
        raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
    manifest = layout.read_json(mpath)
    old = pattern_index.IndexInfo.from_dict(manifest["index"])
    dim = old.dim
    pattern_index.check_kind(kind, dim)
    resolved, factory = pattern_index.choose(kind, old.vectors, dim)
    if factory == old.factory:
        info = old
        info.nprobe = (nprobe or info.nprobe) if info.nprobe is not None else None
        info.ef_search = (ef_search or info.ef_search) if info.ef_search is not None else None
        info.kind = resolved
    else:
        state = torch.load(root / layout.MODEL, map_location="cpu", weights_only=True, mmap=True)
        vectors = state["table.weight"].numpy()[: old.vectors]
        info = pattern_index.build(vectors, root / layout.PATTERN_INDEX, kind, nprobe, ef_search, seed)
    manifest["index"] = info.to_dict()
    layout.write_json(mpath, manifest)
    return manifest["index"]
