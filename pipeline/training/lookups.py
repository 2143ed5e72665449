"""The look-up artifacts written when training ends: pattern table with example pixels, pattern
index, and the index of the training images' pooled vectors.

Example pixels are cut from the images the shards were extracted from (found again through
the shard manifest's ``source`` entry); when that source is gone the column is left empty
and the run manifest says why.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import familiarity
from pipeline.table import index as pattern_index
from pipeline import layout
from pipeline.table import patterns
from pipeline.data import augment
from pipeline.data.augment import VARIANT_STRIDE
from pipeline.training.bags import to_bags
from pipeline.errors import PipelineError
from pipeline.extraction.hashing import KeyPlan
from pipeline.model import PatchBagModel
from pipeline.memory import release_unused
from pipeline.extraction.shards import Shards
from pipeline.data.sources import reopen
from pipeline.data.images import thumbnail
from pipeline.table.vocab import PatternStats, Vocabulary




@dataclasses.dataclass
class SourcePixels:
    """What :func:`source_pixels` cut from the training source."""

    patterns: pa.Array  # each pattern's example: h*w*C bytes, row-major HWC (null when unread)
    names: list  # per image-index image: its file name in the source (None when unread)
    thumbnails: pa.Array  # per image-index image: raw HWC pixels, at most THUMBNAIL_SIDE (pipeline.data.images) a side (null when unread)
    thumbnail_shape: list  # per image-index image: [height, width, channels] of its thumbnail
    missing: str | None  # why pixels are missing, None when complete


def source_pixels(example_image: np.ndarray, slots: np.ndarray, plan: KeyPlan, shards: Shards, image_ids: np.ndarray) -> SourcePixels:
    """One pass over the images the shards came from: each pattern's first occurrence as raw pixels,
    and the file name and a thumbnail of each image of ``image_ids`` (the image index's rows).

    Images are read once, in source order; when the source cannot be read again the pixels are
    null and ``missing`` says why.
    """
    n = len(slots)
    loc = plan.locate(slots)
    channels = shards.config.channels
    sizes = loc["h"].astype(np.int64) * loc["w"] * channels
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    m = len(image_ids)
    names: list = [None] * m
    thumbs: list = [None] * m
    shapes: list = [[0, 0, channels]] * m
    try:
        src = reopen(shards.manifest["source"])
    except PipelineError as e:
        return SourcePixels(pa.nulls(n, pa.binary()), names, pa.nulls(m, pa.large_binary()), shapes, f"source of the shards unreadable: {e}")
    data = np.zeros(int(offsets[-1]), np.uint8)
    spec = shards.manifest.get("augment", "none")
    base, variant = example_image % VARIANT_STRIDE, example_image // VARIANT_STRIDE  # an example in a copy is cut from the copy
    base[example_image < 0] = -1
    order = np.argsort(base, kind="stable")
    sorted_ids = base[order]
    img_order = np.argsort(image_ids, kind="stable")
    sorted_img = np.asarray(image_ids)[img_order]
    found = np.zeros(n, bool)
    for b in src.batches(256, channels, shards.config.resize):
        lo, hi = np.searchsorted(sorted_img, [b.ids.min(), b.ids.max() + 1])
        for r in img_order[lo:hi]:
            at = int(np.searchsorted(b.ids, image_ids[r]))
            if at < len(b.ids) and b.ids[at] == image_ids[r]:
                t = thumbnail(b.images[at])
                names[r], thumbs[r], shapes[r] = b.names[at], t.tobytes(), list(t.shape)
        lo, hi = np.searchsorted(sorted_ids, [b.ids.min(), b.ids.max() + 1])
        if lo == hi:
            continue
        pats = order[lo:hi]
        where = np.searchsorted(b.ids, base[pats])
        where = np.minimum(where, len(b.ids) - 1)
        ok = b.ids[where] == base[pats]
        pats, where = pats[ok], where[ok]
        images = b.images
        copies = variant[pats] > 0
        if copies.any():
            pairs, inverse = np.unique(np.stack([where[copies], variant[pats][copies]], 1), axis=0, return_inverse=True)
            made = [augment.variants(b.images[i], spec)[v - 1] for i, v in pairs]
            images = np.concatenate([b.images, np.stack(made)])
            where = where.copy()
            where[copies] = len(b.images) + inverse.reshape(-1)
        for h, w in {(int(a), int(c)) for a, c in zip(loc["h"][pats], loc["w"][pats])}:
            m = (loc["h"][pats] == h) & (loc["w"][pats] == w)
            p, img = pats[m], where[m]
            yy = loc["y"][p][:, None, None] + np.arange(h)[None, :, None]
            xx = loc["x"][p][:, None, None] + np.arange(w)[None, None, :]
            cut = images[img[:, None, None], yy, xx]  # P x h x w x C
            idx = offsets[p][:, None] + np.arange(h * w * channels)[None, :]
            data[idx] = cut.reshape(len(p), -1)
            found[p] = True
    arr = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    thumbnails = pa.array(thumbs, pa.large_binary())
    missing = None
    if not found.all():
        arr = pa.array([v if f else None for v, f in zip(arr.to_pylist(), found)], pa.large_binary())
        missing = f"{int((~found).sum())} example images were unreadable"
    return SourcePixels(arr, names, thumbnails, shapes, missing)


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


def _pool(model: PatchBagModel, v: Vocabulary, keys: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """Pooled vectors (len(keep) x d) of the images ``keep`` of a batch, as the model pools them."""
    w = None if weights is None else weights[keep]
    rows, offsets, counts, _ = to_bags(v, keys[keep], labels[keep], w).tensors(torch.device("cpu"))
    with torch.no_grad():
        return model.pooled(rows, offsets, counts).numpy()


def _pool_originals(model: PatchBagModel, v: Vocabulary, batch, vecs: list, ids: list, labels: list) -> None:
    """Collect the pooled vectors, ids and labels of the original images (no augmented copies) of one
    batch (keys, labels, image_ids, weights)."""
    keys, lab, img, weights = batch
    keep = augment.is_original(img)
    if keep.any():
        vecs.append(_pool(model, v, keys, lab, weights, keep))
        ids.append(img[keep])
        labels.append(lab[keep])


def _reference_signs(batches, model: PatchBagModel, v: Vocabulary, index, index_ids: np.ndarray, leave_out: bool) -> dict | None:
    """The familiarity signs of up to REFERENCE_IMAGES original images of ``batches``, pooled the
    way a query pools them (unseen patches dropped); with ``leave_out`` each image (a training
    image, so in ``index``) is left out of its own neighbours. None when there are no images."""
    k = familiarity.NEIGHBOURS + int(leave_out)
    got: list[dict] = []
    left = familiarity.REFERENCE_IMAGES
    model.eval()
    for keys, lab, img, weights in batches:
        keep = np.flatnonzero(augment.is_original(img))[:left]
        if not len(keep):
            continue
        d, ids = pattern_index.search(index, _pool(model, v, keys, lab, weights, keep), k)
        if leave_out:  # drop each image's own entry (or, where it is not among them, the farthest)
            own = index_ids[np.maximum(ids, 0)] == img[keep][:, None]
            own[~own.any(1), -1] = True
            own &= np.cumsum(own, 1) == 1
            d = d[~own].reshape(len(keep), k - 1)
        got.append(familiarity.signs(v.own_ids(keys[keep]), d))
        left -= len(keep)
        if left == 0:
            break
    if not got:
        return None
    return {name: np.concatenate([g[name] for g in got]) for name in familiarity.SIGNS}


def write_familiarity(
    out: Path, shards: Shards, model: PatchBagModel, v: Vocabulary, image_index: dict, val_fraction: float,
    given: familiarity.Reference | None = None,
) -> str:
    """Write the run's familiarity reference (:func:`familiarity_reference` against its finished
    image index, ``image_index`` being its manifest entry; or the one ``given``); returns where
    the reference came from."""
    if given is None:
        index = pattern_index.load(out / layout.IMAGE_INDEX, pattern_index.IndexInfo.from_dict(image_index), gpu=False)
        ids = pq.read_table(out / layout.IMAGES, columns=["image_id"]).column("image_id").to_numpy()
        given = familiarity_reference(shards, model, v, index, ids, val_fraction)
    with layout.atomic(out / layout.FAMILIARITY) as tmp:
        tmp.write_bytes(given.to_bytes())
    return given.source


def chooser_reference(shards: Shards, model: PatchBagModel, v: Vocabulary, val_fraction: float) -> familiarity.Reference | None:
    """The familiarity reference of a run about to train again on its held-out images (a refit):
    their signs as the model that chose the epoch count saw them, against its own training
    images; once trained on, they would look more familiar than new images do. None when
    nothing is held out."""
    import faiss

    vecs: list = []
    ids: list = []
    labels: list = []
    model.eval()
    for batch in shards.part_batches(False, val_fraction):
        _pool_originals(model, v, batch, vecs, ids, labels)
    if not vecs:
        return None
    index = faiss.IndexFlatL2(model.table.weight.shape[1])
    index.add(np.ascontiguousarray(np.concatenate(vecs), np.float32))
    held = _reference_signs(shards.part_batches(True, val_fraction), model, v, index, np.concatenate(ids), False)
    return None if held is None else familiarity.Reference(held, "held-out, before the refit")


def familiarity_reference(shards: Shards, model: PatchBagModel, v: Vocabulary, index, index_ids: np.ndarray, val_fraction: float) -> familiarity.Reference:
    """The run's familiarity reference (:mod:`pipeline.familiarity`): the held-out images' signs, or
    with none held out, training images' signs with each left out of its own neighbours."""
    held = _reference_signs(shards.part_batches(True, val_fraction), model, v, index, index_ids, False) if val_fraction > 0 else None
    if held is not None:
        return familiarity.Reference(held, "held-out")
    train = _reference_signs(shards.part_batches(False, val_fraction), model, v, index, index_ids, True)
    if train is None:
        train = {name: np.zeros(0) for name in familiarity.SIGNS}
    return familiarity.Reference(train, "training, each left out")


Step = Callable[[str, int], Callable[[int], None] | None]  # (what starts, items it has or 0) -> its progress


def write_lookups(
    out, shards: Shards, model: PatchBagModel, v: Vocabulary, index_kind: str, nprobe: int, ef_search: int, val_fraction: float, seed: int,
    on_step: Step | None = None,
) -> dict:
    """Write patterns.parquet, patterns.faiss, images.faiss and images.parquet; returns the manifest entries.

    One pass over the training shards gives both the per-pattern statistics and the pooled
    vectors of the training images. ``on_step`` is told as each step starts (and may return
    a progress callable for its items).
    """
    def step(what: str, items: int = 0):
        return on_step(what, items) if on_step else None

    plan = shards.plan()
    step("counting each pattern's classes and pooling the training images")
    vecs: list = []
    ids: list = []
    labels: list = []
    counting = PatternStats(v, len(shards.class_names))
    model.eval()
    for batch in shards.part_batches(False, val_fraction):  # one pass: each pattern's classes, each image's pooled vector
        counting.add(*batch[:3])
        _pool_originals(model, v, batch, vecs, ids, labels)
    stats = counting.columns()
    if vecs:
        ivec, iids, ilab = np.concatenate(vecs), np.concatenate(ids), np.concatenate(labels)
    else:
        ivec, iids, ilab = np.zeros((0, model.table.weight.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    step("cutting pattern pictures and training-image thumbnails from the source")
    got = source_pixels(stats["example_image"], stats["slot"], plan, shards, iids)
    pixels, missing = got.patterns, got.missing
    stats["atom"], code_shape = code_patterns(stats["key"], plan)
    if plan.code_slots:
        pixels = atom_pictures(stats["atom"], code_shape, pixels, shards.dictionary(), shards.config.channels)
    patterns.write(patterns.to_table(stats, plan, pixels), out / layout.PATTERNS)
    vectors = model.table.weight.detach().numpy()[: v.size]
    release_unused()  # before the index copies the vectors: the run's peak is there
    _, factory = pattern_index.choose(index_kind, len(vectors), vectors.shape[1])
    added = step(f"building the pattern index ({factory} over {len(vectors):,} vectors)", len(vectors))
    info = pattern_index.build(vectors, out / layout.PATTERN_INDEX, index_kind, nprobe, ef_search, seed, added)
    image_info = pattern_index.build(ivec, out / layout.IMAGE_INDEX, "flat")
    table = pa.table({
        "image_id": pa.array(iids, pa.int64()), "label": pa.array(ilab, pa.int64()), "name": pa.array(got.names, pa.string()),
        "thumbnail_shape": pa.array(got.thumbnail_shape, pa.list_(pa.int32(), 3)), "thumbnail": got.thumbnails,
    })
    patterns.write(table, out / layout.IMAGES)
    return {"index": info.to_dict(), "image_index": image_info.to_dict(), "examples": missing or "complete"}
