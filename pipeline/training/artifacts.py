"""The look-up artifacts written when training ends: pattern table with example pixels, pattern
index, and the index of the training images' pooled vectors.

Example pixels are cut from the images the shards were extracted from (found again through
the shard manifest's ``source`` entry); when that source is gone the column is left empty
and the run manifest says why.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import index as pattern_index
from pipeline import layout, outputs, patterns, torchfiles
from pipeline.data.augment import VARIANT_STRIDE
from pipeline.training.bags import part_batches, to_bags
from pipeline.errors import PipelineError
from pipeline.extraction.hashing import KeyPlan
from pipeline.model import PatchBagModel
from pipeline.memory import release_unused
from pipeline.extraction.shards import Shards
from pipeline.data.sources import reopen
from pipeline.training.vocab import Vocabulary, pattern_stats


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


def code_patterns(keys: np.ndarray, plan: KeyPlan) -> tuple[np.ndarray, np.ndarray]:
    """The atom and code shape (index into ``plan.code_shapes``) of each pattern key of the code view;
    -1 for both where the key is an exact view's."""
    table = plan.code_key_table()
    atom, shape = np.full(len(keys), -1, np.int64), np.full(len(keys), -1, np.int64)
    if not len(table["key"]):
        return atom, shape
    order = np.argsort(table["key"])
    sorted_keys = table["key"][order]
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    hit = sorted_keys[pos] == keys
    atom[hit] = table["atom"][order][pos[hit]]
    shape[hit] = table["shape"][order][pos[hit]]
    return atom, shape


def atom_pictures(atoms: np.ndarray, shape_of: np.ndarray, pixels: pa.Array, dictionary, channels: int) -> pa.Array:
    """``pixels`` with each code pattern's entry replaced by its atom drawn as pixels (un-whitened)."""
    code = np.flatnonzero(atoms >= 0)
    if not len(code):
        return pixels
    drawn = [s.pixels(channels) for s in dictionary.shapes]
    values = [drawn[int(shape_of[i])][int(atoms[i])].tobytes() for i in code]
    mask = np.zeros(len(atoms), bool)
    mask[code] = True
    return pc.replace_with_mask(pixels.cast(pa.large_binary()), pa.array(mask), pa.array(values, pa.large_binary()))


def _pooling(model: PatchBagModel, v: Vocabulary, batches, vecs: list, ids: list, labels: list):
    """Pass ``batches`` (keys, labels, image_ids) through unchanged, collecting the pooled vectors,
    ids and labels of their original images (no augmented copies) on the way."""
    model.eval()
    for keys, lab, img, weights in batches:
        keep = img < VARIANT_STRIDE
        if keep.any():
            w = None if weights is None else weights[keep]
            rows, offsets, counts, _ = to_bags(v, keys[keep], lab[keep], w).tensors(torch.device("cpu"))
            with torch.no_grad():
                vecs.append(model.pooled(rows, offsets, counts).numpy())
            ids.append(img[keep])
            labels.append(lab[keep])
        yield keys, lab, img


def write_lookups(
    out, shards: Shards, model: PatchBagModel, v: Vocabulary, index_kind: str, nprobe: int, ef_search: int, val_fraction: float, seed: int,
) -> dict:
    """Write patterns.parquet, patterns.faiss, images.faiss and images.parquet; returns the manifest entries.

    One pass over the training shards gives both the per-pattern statistics and the pooled
    vectors of the training images.
    """
    plan = shards.plan()
    vecs: list = []
    ids: list = []
    labels: list = []
    stats = pattern_stats(v, _pooling(model, v, part_batches(shards, False, val_fraction), vecs, ids, labels), len(shards.class_names))
    pixels, missing = example_pixels(stats["example_image"], stats["slot"], plan, shards)
    stats["atom"], code_shape = code_patterns(stats["key"], plan)
    if plan.code_slots:
        pixels = atom_pictures(stats["atom"], code_shape, pixels, shards.dictionary(), shards.config.channels)
    patterns.write(patterns.to_table(stats, plan, pixels), out / layout.PATTERNS)
    vectors = model.table.weight.detach().numpy()[: v.size]
    release_unused()  # before the index copies the vectors: the run's peak is there
    info = pattern_index.build(vectors, out / layout.PATTERN_INDEX, index_kind, nprobe, ef_search, seed)
    if vecs:
        ivec, iids, ilab = np.concatenate(vecs), np.concatenate(ids), np.concatenate(labels)
    else:
        ivec, iids, ilab = np.zeros((0, model.table.weight.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    image_info = pattern_index.build(ivec, out / layout.IMAGE_INDEX, "flat")
    with layout.atomic(out / layout.IMAGES) as tmp:
        pq.write_table(pa.table({"image_id": pa.array(iids, pa.int64()), "label": pa.array(ilab, pa.int64())}), tmp)
    return {"index": info.to_dict(), "image_index": image_info.to_dict(), "examples": missing or "complete"}


def rebuild_index(root, kind: str, nprobe: int | None = None, ef_search: int | None = None, seed: int = 0) -> dict:
    """Rebuild a finished run's pattern index as ``kind`` and record it in the run manifest; returns its entry.

    Only the query-time knobs change (no rebuild) when ``kind`` is what the run already has.
    """
    root = Path(root)
    pattern_index.check_params(nprobe, ef_search)
    mpath = root / layout.RUN_MANIFEST
    if not mpath.exists():
        raise PipelineError(f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
    with outputs.locked(root, "pipe index"):
        return _rebuild(root, mpath, kind, nprobe, ef_search, seed)


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
        state = torchfiles.load(root / layout.MODEL, "train the run again", mmap=True)
        vectors = state["table.weight"].numpy()[: old.vectors]
        info = pattern_index.build(vectors, root / layout.PATTERN_INDEX, kind, nprobe, ef_search, seed)
    manifest["index"] = info.to_dict()
    layout.write_json(mpath, manifest)
    return manifest["index"]
