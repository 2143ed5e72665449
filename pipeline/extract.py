"""Stage 1: images -> quantized symbols -> patch keys -> Parquet shards + manifest.

Run from the CLI as ``pipe extract SOURCE --out SHARDS``; from Python as
``pipeline.extract(open_source("digits"), "artifacts/shards")``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import layout
from .config import HASH_VERSION, ExtractConfig
from .errors import PipelineError
from .hashing import KeyPlan
from .pixels import symbols
from .shards import FORMAT, ShardWriter, schema
from .sources import Batch, Source

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done in this step, patches done in this step)

KEYS_PER_SHARD = 1 << 26  # aim: about 512 MiB of raw keys per shard
KEYS_PER_BATCH = 1 << 23  # aim: about 64 MiB of keys in memory per batch


def resolve(config: ExtractConfig, source: Source) -> ExtractConfig:
    """Replace ``color='auto'`` by the first image's kind (gray or rgb)."""
    if config.color != "auto":
        return config
    return dataclasses.replace(config, color="gray" if source.first_channels() == 1 else "rgb")


def image_keys(images: np.ndarray, plan: KeyPlan) -> np.ndarray:
    """Keys of N x H x W x C uint8 images already in the plan's channel count."""
    return plan.keys(symbols(images, plan.config.levels))


def _batches(source: Source, config: ExtractConfig, batch_size: int) -> Iterator[Batch]:
    return source.batches(batch_size, config.channels, config.resize)


def extract(
    source: Source,
    out: Path | str,
    config: ExtractConfig = ExtractConfig(),
    overwrite: bool = False,
    images_per_shard: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Hash every patch of every image of ``source`` into shards under ``out``; returns the manifest."""
    out = Path(out)
    t0 = time.time()
    config = resolve(config, source)
    first = next(_batches(source, config, 1))
    height, width = first.images.shape[1:3]
    plan = KeyPlan(config, height, width)
    k = plan.keys_per_image
    per_shard = images_per_shard or max(1, min(len(source), KEYS_PER_SHARD // k))
    batch_size = max(1, min(per_shard, KEYS_PER_BATCH // k))
    total = math.ceil(len(source) / per_shard)
    layout.prepare_output_dir(out, overwrite, layout.MANIFEST, "extract")
    sch = schema(k, config)
    shards: list[dict] = []
    writer: ShardWriter | None = None
    images = 0
    try:
        for batch in _batches(source, config, batch_size):
            keys = image_keys(batch.images, plan)
            start = 0
            while start < len(batch.ids):
                if writer is None:
                    writer = ShardWriter(out / layout.shard_name(len(shards), total), sch)
                take = min(len(batch.ids) - start, per_shard - writer.rows)
                sl = slice(start, start + take)
                writer.write(batch.ids[sl], batch.labels[sl], batch.names[sl], keys[sl])
                start += take
                if writer.rows == per_shard:
                    shards.append(writer.close())
                    writer = None
            images += len(batch.ids)
            if progress:
                progress(len(batch.ids), len(batch.ids) * plan.patches_per_image)
        if writer is not None:
            shards.append(writer.close())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if images == 0:
        raise PipelineError(f"{source.path} gave no readable images; nothing was written")
    # file names say 'of-N' with N planned from the source size; fix them if skipped files made fewer shards
    if len(shards) != total:
        for i, s in enumerate(shards):
            new = layout.shard_name(i, len(shards))
            (out / s["file"]).rename(out / new)
            s["file"] = new
    manifest = {
        "format": FORMAT,
        "hash_version": HASH_VERSION,
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "source": source.describe(),
        "class_names": source.class_names,
        "height": int(height),
        "width": int(width),
        "channels": config.channels,
        "images": images,
        "skipped": list(source.skipped),
        "keys_per_image": k,
        "patches_per_image": plan.patches_per_image,
        "keys": images * k,
        "patches": images * plan.patches_per_image,
        "shards": shards,
        "bytes": sum(s["bytes"] for s in shards),
        "seconds": round(time.time() - t0, 3),
    }
    layout.write_json(out / layout.MANIFEST, manifest)
    log.info("extracted %d images into %d shards at %s", images, len(shards), out)
    return manifest
