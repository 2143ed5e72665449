"""Stage 2: shards -> a trained run directory (model, configs, metrics, pattern table, FAISS index).

From the CLI: ``pipe train SHARDS --out RUN``; from Python:
``pipeline.train(Shards("artifacts/shards"), "artifacts/run", TrainConfig(epochs=5))``.

Validation images are a fixed ~``val_fraction`` of the shards, chosen by a hash
of ``image_id`` (independent of the seed), so every run of the same shards is
validated on the same images.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import index as pattern_index
from . import layout, patterns
from .config import TrainConfig
from .errors import PipelineError
from .hashing import fmix64
from .model import PatchBagModel, key_rows, pick_device
from .shards import Shards

log = logging.getLogger(__name__)

RUN_FORMAT = "patchhash-run-v1"
VAL_SALT = 0x5BD1E9955BD1E995
SHUFFLE_IMAGES = 4096  # images held in the shuffle buffer

StepProgress = Callable[[int, int], None]  # (images in this step, ids in this step)
EpochReport = Callable[[dict], None]


def is_validation(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the images held out for validation: ``fmix64(id + VAL_SALT) % 10000 < fraction * 10000``."""
    h = fmix64(np.asarray(image_ids, dtype=np.int64).astype(np.uint64) + np.uint64(VAL_SALT))
    return (h % np.uint64(10000)) < np.uint64(round(fraction * 10000))


def _part_batches(
    shards: Shards, val: bool, fraction: float, files: list[Path] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(keys, labels, image_ids) of the training (or validation) images, row group by row group."""
    for b in shards.iter_batches(files):
        m = is_validation(b.image_ids, fraction) == val
        if m.any():
            yield b.keys[m], b.labels[m], b.image_ids[m]


def _shuffled(shards: Shards, fraction: float, batch_size: int, rng: np.random.Generator, rows: int):
    """Training batches (rows N x K, labels) through a shuffle buffer of about SHUFFLE_IMAGES images."""
    files = shards.files()
    order = rng.permutation(len(files))
    buf_rows: list[np.ndarray] = []
    buf_labels: list[np.ndarray] = []
    held = 0

    def drain(final: bool):
        nonlocal buf_rows, buf_labels, held
        r = np.concatenate(buf_rows)
        lab = np.concatenate(buf_labels)
        perm = rng.permutation(len(r))
        r, lab = r[perm], lab[perm]
        full = len(r) if final else (len(r) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            yield r[s : s + batch_size], lab[s : s + batch_size]
        buf_rows, buf_labels = [r[full:]], [lab[full:]]
        held = len(r) - full

    for keys, labels, _ in _part_batches(shards, False, fraction, [files[i] for i in order]):
        buf_rows.append(key_rows(keys, rows))
        buf_labels.append(labels)
        held += len(keys)
        if held >= SHUFFLE_IMAGES:
            yield from drain(False)
    if held:
        yield from drain(True)


def evaluate_batches(model: PatchBagModel, batches, rows: int, device: torch.device, batch_size: int = 512) -> dict:
    """Loss and accuracy of ``model`` over (keys, labels, ...) batches."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for keys, labels, *_ in batches:
            for s in range(0, len(keys), batch_size):
                x = torch.from_numpy(key_rows(keys[s : s + batch_size], rows)).to(device)
                y = torch.from_numpy(labels[s : s + batch_size]).to(device)
                logits = model(x)
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                n += len(y)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}


def train(
    shards: Shards,
    out: Path | str,
    config: TrainConfig = TrainConfig(),
    overwrite: bool = False,
    progress: StepProgress | None = None,
    on_epoch: EpochReport | None = None,
) -> dict:
    """Train a model on ``shards`` and write a complete run directory to ``out``; returns its manifest."""
    out = Path(out)
    labels_seen = False
    for b in shards.iter_batches(shards.files()[:1]):
        labels_seen = bool((b.labels >= 0).any())
        break
    if not labels_seen or not shards.class_names:
        raise PipelineError(f"{shards.root} has no labels; training needs a labelled source (class folders or y=)")
    layout.prepare_output_dir(out, overwrite, layout.RUN_MANIFEST, "run")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    num_classes = len(shards.class_names)
    model = PatchBagModel(config.rows, config.dim, num_classes).to(device)
    opt_table = torch.optim.SparseAdam(list(model.table.parameters()), lr=config.lr)
    opt_head = torch.optim.Adam(model.head.parameters(), lr=config.head_lr)
    metrics_path = out / layout.METRICS
    metrics_path.write_text("")
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        t0 = time.time()
        loss_sum, correct, n, ids = 0.0, 0, 0, 0
        for rows, labels in _shuffled(shards, config.val_fraction, config.batch_size, rng, config.rows):
            x = torch.from_numpy(rows).to(device)
            y = torch.from_numpy(labels).to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt_table.zero_grad()
            opt_head.zero_grad()
            loss.backward()
            opt_table.step()
            opt_head.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
            ids += rows.size
            if progress:
                progress(len(y), rows.size)
        if n == 0:
            raise PipelineError(f"{shards.root} has no training images left after holding out --val-fraction {config.val_fraction}")
        seconds = time.time() - t0
        val = evaluate_batches(model, _part_batches(shards, True, config.val_fraction), config.rows, device)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / n,
            "train_accuracy": correct / n,
            "val_loss": val["loss"] if val["n"] else None,
            "val_accuracy": val["accuracy"] if val["n"] else None,
            "train_images": n,
            "val_images": val["n"],
            "seconds": round(seconds, 3),
            "ids_per_s": round(ids / max(seconds, 1e-9)),
        }
        history.append(row)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if on_epoch:
            on_epoch(row)
    return _finish_run(out, shards, config, model, history)


def _finish_run(out: Path, shards: Shards, config: TrainConfig, model: PatchBagModel, history: list[dict]) -> dict:
    model = model.cpu()
    tmp = layout.tmp_path(out / layout.MODEL)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out / layout.MODEL)
    stats = patterns.collect(_part_batches(shards, False, config.val_fraction), len(shards.class_names))
    table = patterns.to_table(stats, shards.plan())
    patterns.write(table, out / layout.PATTERNS)
    vectors = model.table.weight.detach().numpy()[key_rows(stats["key"], config.rows)]
    pattern_index.build(vectors, out / layout.PATTERN_INDEX)
    manifest = {
        "format": RUN_FORMAT,
        "extract_config": shards.config.to_dict(),
        "extract_fingerprint": shards.fingerprint,
        "train_config": config.to_dict(),
        "height": shards.height,
        "width": shards.width,
        "class_names": shards.class_names,
        "shards": str(shards.root),
        "patterns": int(len(stats["key"])),
        "index": {"type": "Flat", "metric": "L2", "dim": config.dim},
        "final": history[-1],
    }
    layout.write_json(out / layout.RUN_MANIFEST, manifest)
    return manifest
