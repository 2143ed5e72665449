"""Stage 1: images -> quantized symbols -> one key per patch -> Parquet shards + manifest.

Run from the CLI as ``pipe extract SOURCE --out SHARDS [--workers N]``; from
Python as ``pipeline.extract(open_source("digits"), "artifacts/shards")``.

Shard i holds the images ranked ``[i * per_shard, (i + 1) * per_shard)`` in
source order, so the split into shards depends only on the settings, never on
timing. That is what makes the extract parallel (each worker process writes
whole shards), resumable (a shard is finished once its file has been renamed
into place and its record written to ``_progress/``; a rerun with the same
settings skips those) and identical to an uninterrupted run. The manifest is
written last; until then ``extract-job.json`` holds the settings.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.data import augment as augment_mod
from pipeline.extraction import codes
from pipeline.extraction import like as like_mod
from pipeline import layout, outputs
from pipeline.config import HASH_VERSION, ExtractConfig, code_shape_text
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.hashing import KeyPlan
from pipeline.engines.ray_engine import check_engine, run_tasks
from pipeline.extraction.shards import DEFAULT_CODEC, FORMAT, ShardWriter, schema
from pipeline.data.sources import RawImage, Source, decode_checked
from pipeline.data.split import DEFAULT_VAL_FRACTION, is_validation
from pipeline.extraction.workers import machine_cores, shard_worker

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done in this step, patches done in this step)

PATCHES_PER_SHARD = 1 << 23  # 64 MiB of raw keys per shard file
PATCHES_PER_ROW_GROUP = 1 << 21  # about 16 MiB of keys in memory per row group (the unit training reads)


def resolve(config: ExtractConfig, source: Source) -> ExtractConfig:
    """Replace ``color='auto'`` by the first image's kind (gray or rgb)."""
    if config.color != "auto":
        return config
    return dataclasses.replace(config, color="gray" if source.first_channels() == 1 else "rgb")


def resolve_size(config: ExtractConfig, height: int, width: int) -> ExtractConfig:
    """Replace the settings left to the image (``code_shapes``, ``views``: 'auto'; ``grid``, ``max_h``/``max_w``: 0)
    by what its size and channels give, as :class:`KeyPlan` resolves them; refuses shapes larger than the images."""
    return KeyPlan(config, height, width).config


def fit_dictionary(source: Source, config: ExtractConfig, progress: Callable[[int], None] | None = None, mirror: bool = False) -> codes.Dictionary:
    """Fit the code view's dictionary on a seeded, evenly spread sample of the source's images,
    leaving out the images training holds out for validation by default (so the held-out
    accuracy is measured on images the dictionary never saw); ``mirror`` closes it under
    left-right mirroring (:func:`pipeline.extraction.codes.fit`)."""
    want = min(len(source), max(codes.FIT_MIN_IMAGES, -(-config.code_sample // codes.FIT_PATCHES_PER_IMAGE)))
    step = max(1, len(source) // want)
    picked = []
    for b in source.batches(256, config.channels, config.resize):
        keep = (b.ids % step == 0) & ~is_validation(b.ids, DEFAULT_VAL_FRACTION)
        if keep.any():
            picked.append(b.images[keep])
        if progress:
            progress(len(b.ids))
    return codes.fit(picked, config.code_shape_list(), config.atoms, config.whiten, config.code_sample, config.seed, config.channels, config.code_norm, mirror)


# ------------------------------------------------------------------ one shard (runs in a worker)

@dataclass
class ShardTask:
    """Everything a worker needs to write one shard; plain data, so it pickles."""

    index: int
    total: int
    out: str
    config: ExtractConfig
    height: int
    width: int
    compression: str
    skip_bad: bool
    images: list[RawImage]
    augment: str = "none"


@lru_cache(maxsize=4)
def _plan(config: ExtractConfig, height: int, width: int, out: str) -> KeyPlan:
    """One plan per worker process, not one per shard; a code view's dictionary is read from ``out``."""
    dictionary = codes.Dictionary.load(Path(out) / layout.DICTIONARY, config.dictionary) if config.has_code else None
    return KeyPlan(config, height, width, dictionary)


def write_shard(task: ShardTask, progress: Progress | None = None) -> dict:
    """Decode, hash and write the images of one shard; returns the shard's record."""
    plan = _plan(task.config, task.height, task.width, task.out)
    config = plan.config
    out = Path(task.out)
    path = out / layout.shard_name(task.index, task.total)
    per_group = max(1, PATCHES_PER_ROW_GROUP // plan.patches_per_image)
    skipped: list[str] = []
    buf: list[tuple[int, int, str]] = []  # (image id, label, name) of each row
    pixels: list[np.ndarray] = []
    mirror_of: list[int] = []  # per row: the row it is the left-right mirror of, or -1
    flip = augment_mod.flip_variant(task.augment)
    originals = written = unlabelled = 0

    def flush() -> None:
        nonlocal originals, written
        written += originals
        images = np.stack(pixels)
        keys = plan.content_keys(plan.symbols(images))
        atoms, weights = plan.codes(images, np.array(mirror_of, np.int64)) if plan.code_slots else (None, None)
        writer.write(np.array([b[0] for b in buf], np.int64), np.array([b[1] for b in buf], np.int32), [b[2] for b in buf], keys, atoms, weights)
        if progress:
            progress(originals, keys.size + (atoms.size if atoms is not None else 0))
        buf.clear()
        pixels.clear()
        mirror_of.clear()
        originals = 0

    with layout.atomic(path) as tmp:
        writer = ShardWriter(tmp, schema(plan.exact_patches, config, plan.code_slots), task.compression)
        try:
            for raw in task.images:
                arr = decode_checked(raw, config.channels, config.resize, task.skip_bad, (task.height, task.width))
                if arr is None:
                    skipped.append(raw.name)
                    if progress:
                        progress(1, 0)
                    continue
                row = len(buf)
                buf.append((raw.index, raw.label, raw.name))
                pixels.append(arr)
                mirror_of.append(-1)
                originals += 1
                unlabelled += raw.label < 0
                for v, var in enumerate(augment_mod.variants(arr, task.augment), start=1):
                    buf.append((raw.index + v * augment_mod.VARIANT_STRIDE, raw.label, f"{raw.name}#{v}"))
                    pixels.append(var)
                    mirror_of.append(row if v == flip else -1)
                if len(buf) >= per_group:
                    flush()
            if buf:
                flush()
            record = writer.close()
        except BaseException:
            writer.close()  # the file handle; atomic() removes the partial file
            raise
    record = dict(file=path.name, bytes=path.stat().st_size, **record)
    record.update(index=task.index, skipped=skipped, originals=written, unlabelled=unlabelled)
    layout.write_json(_progress_path(out, task.index), record)
    return record


def _dictionary(source: Source, config: ExtractConfig, out: Path, given, on_fit, augment: str = "none",
                overwrite: bool = False) -> tuple[codes.Dictionary, ExtractConfig]:
    """The code view's dictionary and the config carrying its digest: the one ``given``, the one an
    unfinished (or finished) extract into ``out`` with the same settings already fitted (unless
    ``overwrite`` starts it again from nothing), or a new fit, closed under left-right mirroring
    when ``augment`` mirrors the images (a mirrored copy's code is then its original's, mirrored,
    with no products of its own)."""
    if given is not None:
        d = codes.Dictionary.load(given)
    else:
        d = None if overwrite else _existing_dictionary(out, config, augment)
        if d is None:
            d = fit_dictionary(source, config, on_fit, augment_mod.flip_variant(augment) > 0)
    if [(s.h, s.w, s.scale) for s in d.shapes] != config.code_shape_list() or d.channels != config.channels:
        have = code_shape_text([(s.h, s.w, s.scale) for s in d.shapes])
        raise ParameterError(
            "dictionary", f"{given} has {have} atoms on {d.channels} channel(s), but this extract codes "
            f"{config.code_shapes} on {config.channels}; pass the same `code_shapes` and `color` as the training extract"
        )
    if given is not None and (len(d.shapes[0].atoms), d.norm) != (config.atoms, config.code_norm):
        config = dataclasses.replace(config, atoms=len(d.shapes[0].atoms), code_norm=d.norm)
    return d, dataclasses.replace(config, dictionary=d.digest())


def _existing_dictionary(out: Path, config: ExtractConfig, augment: str = "none") -> codes.Dictionary | None:
    """The dictionary already in ``out`` when its job (unfinished or finished) has these settings and
    augmentation: a resumed extract keeps the dictionary its first shards were coded with."""
    path = out / layout.DICTIONARY
    if not path.is_file():
        return None
    for name in (layout.EXTRACT_JOB, layout.MANIFEST):
        try:
            job = layout.read_json(out / name)
        except (ValueError, OSError):
            continue
        spec = job.get("job", job)  # a manifest holds its job under "job"
        old = dict(spec.get("config", {}))
        if spec.get("augment", "none") != augment:
            continue
        if old.get("dictionary") and {**old, "dictionary": ""} == {**config.to_dict(), "dictionary": ""}:
            try:
                return codes.Dictionary.load(path, old["dictionary"])
            except PipelineError:
                return None
    return None


def _progress_path(out: Path, index: int) -> Path:
    return out / layout.PROGRESS_DIR / f"{index:05d}.json"


# ------------------------------------------------------------------ the job: settings, resume, dispatch

def _first_size(source: Source, config: ExtractConfig) -> tuple[int, int]:
    first = next(source.batches(1, config.channels, config.resize))
    return tuple(int(v) for v in first.images.shape[1:3])


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}.{d}" for d in _differences(a, b)]
        else:
            diffs.append(k)
    return diffs


def _prepare(out: Path, job: dict, overwrite: bool, inputs: list) -> dict | None:
    """Create or check ``out`` (already refused by :func:`extract` when it holds an input or the
    current directory); returns the finished manifest when the same job is already complete."""
    if outputs.contents(out) and not overwrite:
        for name, state in ((layout.MANIFEST, "a finished"), (layout.EXTRACT_JOB, "an unfinished")):
            if not (out / name).exists():
                continue
            try:
                old = layout.read_json(out / name)
            except (ValueError, OSError):
                old = {}
            old = old.get("job", old) if name == layout.MANIFEST else old
            if old == job:
                return layout.read_json(out / name) if name == layout.MANIFEST else None
            changed = _differences(old, job)
            if changed and all(d.startswith("source.identity") for d in changed):
                raise PipelineError(
                    f"{job['source']['path']} has changed since {state} extract into `out` {out} read it; "
                    "its shards would mix two datasets: pass `overwrite` to extract the new images from the start"
                )
            diffs = ", ".join(changed) or "format"
            raise ParameterError(
                "out", f"{out} holds {state} extract with different settings ({diffs}); "
                "pass `overwrite` to replace it, rerun with the same arguments, or choose another directory"
            )
        raise ParameterError("out", f"{out} already holds other files; pass `overwrite` to replace them or choose another directory")
    if not (out / layout.EXTRACT_JOB).exists() or overwrite:
        outputs.prepare(out, overwrite, layout.MANIFEST, "extract", inputs)
    (out / layout.PROGRESS_DIR).mkdir(exist_ok=True)
    if not (out / layout.EXTRACT_JOB).exists():
        layout.write_json(out / layout.EXTRACT_JOB, job)
    return None


def _finished(out: Path, total: int) -> dict[int, dict]:
    """Records of the shards a previous attempt completed (file in place with the recorded size)."""
    done = {}
    for i in range(total):
        p = _progress_path(out, i)
        if not p.exists():
            continue
        try:
            rec = layout.read_json(p)
        except (ValueError, OSError):
            continue
        f = out / rec.get("file", "")
        if f.is_file() and f.stat().st_size == rec.get("bytes"):
            done[i] = rec
    for tmp in out.glob("*.tmp"):  # a shard that was being written when the last attempt stopped
        tmp.unlink()
    return done


def _tasks(source: Source, per_shard: int, done: dict, make: Callable[[int, list[RawImage]], ShardTask]) -> Iterator[ShardTask]:
    """One task per unfinished shard, in order; raw images of finished shards are not even read,
    and files a worker can open itself go as references (the worker reads them)."""
    current, images = -1, []
    for rank, raw in source.raw_images(lambda r: r // per_shard not in done, by_reference=True):
        shard = rank // per_shard
        if shard in done:
            continue
        if shard != current and images:
            yield make(current, images)
            images = []
        current = shard
        images.append(raw)
    if images:
        yield make(current, images)


def _run_pool(tasks: Iterator[ShardTask], workers: int, progress: Progress | None) -> list[dict]:
    """Write shards in ``workers`` processes, at most two tasks per worker in flight (bounded memory)."""
    records = []
    ctx = multiprocessing.get_context("spawn")  # portable; the workers import only what extraction needs
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=shard_worker) as pool:
        pending: set[Future] = set()
        try:
            for task in tasks:
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    records += _collect(finished, progress)
                pending.add(pool.submit(write_shard, task))
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                records += _collect(finished, progress)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return records


def _collect(finished: set[Future], progress: Progress | None) -> list[dict]:
    out = []
    for f in finished:
        rec = f.result()  # re-raises a worker's PipelineError here
        if progress:
            progress(rec["originals"] + len(rec["skipped"]), rec["patches"])
        out.append(rec)
    return out


def extract(
    source: Source,
    out: Path | str,
    config: ExtractConfig = ExtractConfig(),
    overwrite: bool = False,
    images_per_shard: int | None = None,
    workers: int = 0,
    compression: str = DEFAULT_CODEC,
    progress: Progress | None = None,
    augment: str = "auto",
    engine: str = "local",
    address: str | None = None,
    dictionary: Path | str | None = None,
    on_fit: Callable[[int], None] | None = None,
    like: Path | str | None = None,
) -> dict:
    """Hash every patch of every image of ``source`` into shards under ``out``; returns the manifest.

    An unfinished extract into ``out`` with the same settings is resumed; a finished one is
    returned as is (``resumed_shards`` in the result says how many shards were reused).
    ``workers`` = 0 runs one worker per core (:func:`machine_cores`), at most one per shard left
    to write. More than one starts processes with the ``spawn`` method, so a script that calls
    this needs the usual ``if __name__ == "__main__":`` guard; the keys do not depend on the
    number of workers. ``engine="ray"`` runs the same
    shard tasks on Ray (:mod:`pipeline.engines.ray_engine`): a local Ray instance of ``workers``
    CPUs, or the cluster at ``address``.

    ``augment`` = ``auto`` mirrors colour images (``flip``) and leaves grayscale ones alone
    (:func:`pipeline.data.augment.resolve`).

    With a code view the dictionary is fitted on ``source`` (``on_fit`` is told of each batch
    of images read for it) and saved as ``out/dictionary.npz``, unless ``dictionary`` names
    one to use instead (a test set coded with the training shards' dictionary).

    ``like`` (a run or shard directory) takes every setting from there instead of ``config``,
    ``augment`` and ``dictionary`` (:mod:`pipeline.extraction.like`): the new shards' keys are
    the earlier ones' keys, so ``pipe train --from`` can learn them on top of an earlier run.
    """
    settings = None
    if like is not None:
        if dictionary is not None:
            raise PipelineError("like takes the dictionary from the earlier run or shards; leave out dictionary")
        settings = like_mod.like(like)
        config, augment, dictionary = settings.config, settings.augment, settings.dictionary
    if address is not None and engine != "ray":
        raise ParameterError("address", "goes with `engine` ray")
    check_engine(engine)  # a missing Ray extra fails before anything is written
    if workers < 0:
        raise ParameterError("workers", f"{workers} must be at least 1, or 0 for one per core")
    if images_per_shard is not None and images_per_shard < 1:
        raise ParameterError("images_per_shard", f"{images_per_shard} must be at least 1")
    out = Path(out)
    inputs = [p for p in (source.describe()["location"], dictionary) if p is not None and Path(p).exists()]
    outputs.check_out(out, inputs)
    with outputs.locked(out, "pipe extract"):
        return _extract(source, out, config, overwrite, images_per_shard, workers, compression, progress, augment, engine,
                        address, dictionary, on_fit, inputs, settings)


def _extract(source, out, config, overwrite, images_per_shard, workers, compression, progress, augment, engine, address, dictionary, on_fit, inputs,
             settings: like_mod.Like | None = None) -> dict:
    """:func:`extract` with ``out`` locked."""
    t0 = time.time()
    config = resolve(config, source)
    augment = augment_mod.resolve(augment, config.channels)
    copies = 1 + augment_mod.count(augment)  # validates the spec
    height, width = _first_size(source, config)
    if settings is not None:
        like_mod.check_fits(source, settings, (height, width))
    augment_mod.check_size(augment, height, width)
    config = resolve_size(config, height, width)
    if dictionary is not None and not config.has_code:
        raise ParameterError("dictionary", "goes with a code view; leave it out, or set `code_shapes`")
    dict_obj = None
    if config.has_code:
        dict_obj, config = _dictionary(source, config, out, dictionary, on_fit, augment, overwrite)
    plan = KeyPlan(config, height, width)
    p = plan.patches_per_image
    per_shard = images_per_shard or max(1, min(len(source), PATCHES_PER_SHARD // (p * copies)))
    total = math.ceil(len(source) / per_shard)
    job = {
        "format": FORMAT,
        "fingerprint": config.fingerprint(),
        "config": config.to_dict(),
        "source": source.describe(),
        "height": height,
        "width": width,
        "images_per_shard": per_shard,
        "shards": total,
        "compression": compression,
        "augment": augment,
    }
    finished_manifest = _prepare(out, job, overwrite, inputs)
    if finished_manifest is not None:
        log.info("%s already holds this extract; nothing to do", out)
        return dict(finished_manifest, resumed_shards=len(finished_manifest["shards"]))
    if dict_obj is not None and not (out / layout.DICTIONARY).is_file():
        dict_obj.save(out / layout.DICTIONARY)
    done = _finished(out, total)
    if done and progress:
        progress(sum(r["originals"] + len(r["skipped"]) for r in done.values()), sum(r["patches"] for r in done.values()))

    def make(index: int, images: list[RawImage]) -> ShardTask:
        return ShardTask(index, total, str(out.resolve()), config, height, width, compression, source.skip_bad, images, augment)

    tasks = _tasks(source, per_shard, done, make)
    if workers == 0:
        workers = max(1, min(machine_cores(), total - len(done)))
    if engine == "ray":
        records = run_tasks(write_shard, tasks, workers, address, progress)
    elif workers == 1:
        records = [write_shard(t, progress) for t in tasks]
    else:
        records = _run_pool(tasks, workers, progress)
    shards = sorted([*done.values(), *records], key=lambda r: r["index"])
    images = sum(r["rows"] for r in shards)
    if len(shards) != total:
        raise PipelineError(f"only {len(shards)} of {total} shards were written; run the same command again to finish")
    if images == 0:
        shutil.rmtree(out)
        raise PipelineError(f"{source.path} gave no readable images; nothing was written")
    total_bytes = sum(r["bytes"] for r in shards)
    manifest = {
        "format": FORMAT,
        "hash_version": HASH_VERSION,
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "shapes": [list(s) for s in config.shape_list()],
        "stride": config.stride,
        "position_modes": list(config.position_modes),
        "source": source.describe(),
        "class_names": source.class_names,
        "height": height,
        "width": width,
        "channels": config.channels,
        "images": images,
        "augment": augment,
        "variants_per_image": copies - 1,
        "like": None if settings is None else str(settings.root.resolve()),  # the run or shards whose settings these keys share
        "skipped": [name for r in shards for name in r["skipped"]],
        "unlabelled": sum(r.get("unlabelled", 0) for r in shards),  # kept for query; out of training and validation
        "keys_per_image": plan.keys_per_image,
        "patches_per_image": p,
        "code_slots": plan.code_slots,
        "code_shapes": [[h, w] + ([sc] if sc > 1 else []) for h, w, sc in config.code_shape_list()],  # [h, w] or, scaled, [h, w, scale]
        "keys": images * plan.keys_per_image,
        "patches": images * p,
        "compression": compression,
        "shards": [{k: r[k] for k in ("file", "rows", "patches", "bytes", "skipped")} for r in shards],
        "bytes": total_bytes,
        "bytes_per_patch": round(total_bytes / max(1, images * p), 4),
        "job": job,
    }
    layout.write_json(out / layout.MANIFEST, manifest)
    (out / layout.EXTRACT_JOB).unlink(missing_ok=True)
    shutil.rmtree(out / layout.PROGRESS_DIR, ignore_errors=True)
    log.info("extracted %d images into %d shards at %s", images, len(shards), out)
    return dict(manifest, seconds=round(time.time() - t0, 3), resumed_shards=len(done))
