"""Stage 2: shards -> a trained run directory (vocabulary, model, metrics, curves, pattern table, FAISS index).

From the CLI: ``pipe train SHARDS --out RUN``; from Python:
``pipeline.train(open_shards("artifacts/shards"), "artifacts/run", TrainConfig(epochs=5))``.

1. One pass counts the keys of the training images and fixes the vocabulary
   (:mod:`pipeline.vocab`), saved first so a resumed run uses the same rows.
2. Each epoch streams the shards in a seeded random file order. Every image
   becomes a bag of distinct rows with counts; a shuffle buffer of about
   ``SHUFFLE_IMAGES`` images mixes row groups; a background thread prepares the
   next batches while the model trains on the current one.
3. After each epoch: validation, one line of ``metrics.jsonl``, ``curves.png``,
   and ``checkpoint.pt`` (model, optimizers, random states), so ``resume=True``
   continues a killed run exactly. ``model.pt`` holds the best epoch so far
   (by validation accuracy); ``patience`` stops early.

Validation images are a fixed ~``val_fraction`` of the shards, chosen by a hash
of ``image_id`` (independent of the seed), so every run of the same shards is
validated on the same images.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from . import index as pattern_index
from . import layout, optim, patterns, vocab
from .config import TrainConfig
from .errors import PipelineError
from .hashing import fmix64
from .model import PatchBagModel, pick_device
from .shards import Shards

log = logging.getLogger(__name__)

RUN_FORMAT = "patchhash-run-v2"
VAL_SALT = 0x5BD1E9955BD1E995
SHUFFLE_IMAGES = 8192  # images held in the shuffle buffer (about 500 MB of bags for CIFAR-10)
PREFETCH_BATCHES = 8  # batches prepared ahead by the reader thread

StepProgress = Callable[[int, int], None]  # (images in this step, raw keys in this step)
EpochReport = Callable[[dict], None]


def is_validation(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the images held out for validation: ``fmix64(id + VAL_SALT) % 10000 < fraction * 10000``."""
    h = fmix64(np.asarray(image_ids, dtype=np.int64).astype(np.uint64) + np.uint64(VAL_SALT))
    return (h % np.uint64(10000)) < np.uint64(round(fraction * 10000))


def part_batches(
    shards: Shards, val: bool, fraction: float, groups: list[tuple[Path, int]] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(keys, labels, image_ids) of the training (or validation) images, row group by row group."""
    for b in shards.iter_batches(groups=groups):
        m = is_validation(b.image_ids, fraction) == val
        if m.any():
            yield b.keys[m], b.labels[m], b.image_ids[m]


@dataclass
class Bags:
    """A batch of images as bags of distinct table rows with counts (CSR)."""

    rows: np.ndarray  # int64
    offsets: np.ndarray  # int64, N + 1
    counts: np.ndarray  # float32
    labels: np.ndarray  # int64
    raw_keys: int  # keys the images had before deduplication and vocabulary filtering

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a).to(device) for a in (self.rows, self.offsets, self.counts, self.labels))


def to_bags(v: vocab.Vocabulary, keys: np.ndarray, labels: np.ndarray) -> Bags:
    rows, offsets, counts = v.bags(keys)
    return Bags(rows, offsets, counts, labels, keys.size)


def _concat(parts: list[tuple[np.ndarray, np.ndarray, int]], labels: np.ndarray, k: int) -> Bags:
    """One batch from per-image (rows, counts) pairs."""
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(r) for r, _ in parts], out=offsets[1:])
    return Bags(np.concatenate([r for r, _ in parts]), offsets, np.concatenate([c for _, c in parts]), labels, k * len(parts))


def shuffled_bags(shards: Shards, v: vocab.Vocabulary, fraction: float, batch_size: int, rng: np.random.Generator) -> Iterator[Bags]:
    """Training batches in a seeded random order: all row groups permuted, then a shuffle buffer of images.

    Sources are often sorted by class (an image folder, CIFAR's tar), so shards and their
    row groups are too; permuting row groups across all shards, not just files, is what
    lets the buffer mix classes (measured in docs/results.md).
    """
    groups = shards.row_groups()
    order = rng.permutation(len(groups))
    k = shards.keys_per_image
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    buf_labels: list[int] = []

    def drain(final: bool) -> Iterator[Bags]:
        nonlocal buf, buf_labels
        perm = rng.permutation(len(buf))
        full = len(buf) if final else (len(buf) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            idx = perm[s : s + batch_size]
            yield _concat([buf[i] for i in idx], np.asarray([buf_labels[i] for i in idx], np.int64), k)
        rest = perm[full:]
        buf, buf_labels = [buf[i] for i in rest], [buf_labels[i] for i in rest]

    for keys, labels, _ in part_batches(shards, False, fraction, [groups[i] for i in order]):
        b = to_bags(v, keys, labels)
        for a in range(len(labels)):
            lo, hi = b.offsets[a], b.offsets[a + 1]
            buf.append((b.rows[lo:hi], b.counts[lo:hi]))
            buf_labels.append(int(labels[a]))
        if len(buf) >= SHUFFLE_IMAGES:
            yield from drain(False)
    if buf:
        yield from drain(True)


def prefetch(items: Iterable, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Iterate ``items`` in a background thread, ``depth`` ahead (numba and Arrow release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.01)


def evaluate_bags(model: PatchBagModel, batches: Iterable[Bags], device: torch.device) -> dict:
    """Loss and accuracy of ``model`` over batches of bags."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            rows, offsets, counts, y = b.tensors(device)
            logits = model(rows, offsets, counts)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}


def validation_bags(shards: Shards, v: vocab.Vocabulary, fraction: float, batch_size: int = 512) -> Iterator[Bags]:
    for keys, labels, _ in part_batches(shards, True, fraction):
        for s in range(0, len(keys), batch_size):
            yield to_bags(v, keys[s : s + batch_size], labels[s : s + batch_size])


def build_model(config: TrainConfig, rows: int, num_classes: int) -> PatchBagModel:
    model = PatchBagModel(rows, config.dim, num_classes, config.bag, config.hidden, config.drop_rate, config.pooled_dropout)
    nn.init.normal_(model.table.weight, std=config.init_std)
    return model


def _optimizers(model: PatchBagModel, config: TrainConfig) -> tuple:
    opt_table = optim.table_optimizer(config.optimizer, model.table.weight, config.lr)
    dense = [p for name, p in model.named_parameters() if not name.startswith("table.")]
    return opt_table, torch.optim.Adam(dense, lr=config.head_lr)


# ------------------------------------------------------------------ run directory state

def _job(shards: Shards, config: TrainConfig) -> dict:
    """What a resumed run must match: the shards and every setting except how long to train."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "patience", "device")}
    return {"format": RUN_FORMAT, "shards_fingerprint": shards.fingerprint, "shards_images": shards.num_images, "config": cfg}


def _prepare(out: Path, shards: Shards, config: TrainConfig, overwrite: bool, resume: bool) -> bool:
    """Create or check the run directory; True when a checkpoint is there to resume from."""
    job = _job(shards, config)
    if resume and not overwrite:
        if (out / layout.RUN_MANIFEST).exists():
            raise PipelineError(f"--out {out} holds a finished run; nothing to resume (pass --overwrite to train again)")
        if not (out / layout.TRAIN_JOB).exists() or not (out / layout.CHECKPOINT).exists():
            raise PipelineError(f"--out {out} has no checkpoint to resume from; leave out --resume to start a new run")
        old = layout.read_json(out / layout.TRAIN_JOB)
        if old != job:
            diffs = sorted(k for k in set(old["config"]) | set(job["config"]) if old["config"].get(k) != job["config"].get(k))
            what = ", ".join(diffs) or "the shards"
            raise PipelineError(f"--out {out} was trained with different settings ({what}); resume with the same settings or start a new run")
        return True
    layout.prepare_output_dir(out, overwrite, layout.RUN_MANIFEST, "run")
    layout.write_json(out / layout.TRAIN_JOB, job)
    return False


def _save_checkpoint(out: Path, model, opts, epoch: int, history: list[dict], rng: np.random.Generator, best: dict) -> None:
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "opt_table": opts[0].state_dict(),
        "opt_head": opts[1].state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "history": json.dumps(history),
        "best": json.dumps(best),
    }
    tmp = layout.tmp_path(out / layout.CHECKPOINT)
    torch.save(state, tmp)
    tmp.replace(out / layout.CHECKPOINT)


def _save_model(out: Path, model: PatchBagModel) -> None:
    tmp = layout.tmp_path(out / layout.MODEL)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out / layout.MODEL)


def _build_vocab(shards: Shards, config: TrainConfig, out: Path, progress: Callable[[int], None] | None) -> vocab.Vocabulary:
    v = vocab.build((keys for keys, _, _ in part_batches(shards, False, config.val_fraction)), config.min_count, config.buckets, progress)
    if v.size == 0:
        raise PipelineError(f"no key occurs --min-count {config.min_count} times in the training images; lower --min-count")
    v.save(out / layout.VOCAB)
    layout.write_json(out / layout.VOCAB_STATS, v.stats)
    return v


# ------------------------------------------------------------------ training

def train(
    shards: Shards,
    out: Path | str,
    config: TrainConfig = TrainConfig(),
    overwrite: bool = False,
    resume: bool = False,
    progress: StepProgress | None = None,
    on_epoch: EpochReport | None = None,
    on_vocab: Callable[[int], None] | None = None,
) -> dict:
    """Train a model on ``shards`` and write a complete run directory to ``out``; returns its manifest."""
    out = Path(out)
    labels_seen = any(bool((b.labels >= 0).any()) for b in shards.iter_batches(shards.files()[:1]))
    if not labels_seen or not shards.class_names:
        raise PipelineError(f"{shards.root} has no labels; training needs a labelled source (class folders or y=)")
    resuming = _prepare(out, shards, config, overwrite, resume)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    num_classes = len(shards.class_names)
    if resuming:
        v = vocab.Vocabulary.load(out / layout.VOCAB, layout.read_json(out / layout.VOCAB_STATS))
    else:
        v = _build_vocab(shards, config, out, on_vocab)
    model = build_model(config, v.rows, num_classes).to(device)
    opts = _optimizers(model, config)
    history: list[dict] = []
    best = {"epoch": 0, "val_accuracy": -1.0}
    start = 1
    if resuming:
        ck = torch.load(out / layout.CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opts[0].load_state_dict(ck["opt_table"])
        opts[1].load_state_dict(ck["opt_head"])
        torch.set_rng_state(ck["torch_rng"].cpu())
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        history, best = json.loads(ck["history"]), json.loads(ck["best"])
        start = ck["epoch"] + 1
        del ck  # a second copy of the table and optimizer state
        log.info("resuming %s at epoch %d", out, start)
    metrics_path = out / layout.METRICS
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    stale = 0 if not history else history[-1]["epoch"] - best["epoch"]
    for epoch in range(start, config.epochs + 1):
        if config.patience and stale >= config.patience:
            break
        row = _epoch(model, opts, shards, v, config, rng, device, epoch, progress)
        improved = row["val_accuracy"] is None or row["val_accuracy"] > best["val_accuracy"]
        if improved:
            best = {"epoch": epoch, "val_accuracy": row["val_accuracy"] if row["val_accuracy"] is not None else -1.0}
            _save_model(out, model)
            stale = 0
        else:
            stale += 1
        row["best_epoch"] = best["epoch"]
        history.append(row)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        _save_checkpoint(out, model, opts, epoch, history, rng, best)
        _plot(history, out / layout.CURVES)
        if on_epoch:
            on_epoch(row)
    if not history:
        raise PipelineError(f"{out} trained no epoch; raise --epochs")
    del model, opts  # the table and its optimizer state; the best epoch is reloaded from model.pt
    state = torch.load(out / layout.MODEL, map_location="cpu", weights_only=True)
    final = build_model(config, v.rows, num_classes)
    final.load_state_dict(state)
    return _finish_run(out, shards, config, final, v, history, best)


def _epoch(model, opts, shards, v, config, rng, device, epoch, progress) -> dict:
    model.train()
    t0 = time.time()
    loss_sum, correct, n, raw, rows_seen = 0.0, 0, 0, 0, 0
    for b in prefetch(shuffled_bags(shards, v, config.val_fraction, config.batch_size, rng)):
        rows, offsets, counts, y = b.tensors(device)
        logits, unique, sub = model.forward_rows(rows, offsets, counts)
        loss = nn.functional.cross_entropy(logits, y)
        opts[1].zero_grad()
        (loss + model.penalty()).backward()
        with torch.no_grad():
            opts[0].step(unique, sub.grad)
        opts[1].step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        raw += b.raw_keys
        rows_seen += len(b.rows)
        if progress:
            progress(len(y), b.raw_keys)
    if n == 0:
        raise PipelineError(f"{shards.root} has no training images left after holding out --val-fraction {config.val_fraction}")
    seconds = time.time() - t0
    val = evaluate_bags(model, validation_bags(shards, v, config.val_fraction), device)
    row = {
        "epoch": epoch,
        "train_loss": loss_sum / n,
        "train_accuracy": correct / n,
        "val_loss": val["loss"] if val["n"] else None,
        "val_accuracy": val["accuracy"] if val["n"] else None,
        "train_images": n,
        "val_images": val["n"],
        "seconds": round(seconds, 3),
        "ids_per_s": round(raw / max(seconds, 1e-9)),
        "rows_per_image": round(rows_seen / n, 1),
    }
    if model.auto_drop is not None:
        row["drop_rate"] = float(model.auto_drop.rate.item())
    return row


def _plot(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    b.plot(ep, [r["train_accuracy"] for r in history], "o-", label="train")
    if history[-1]["val_loss"] is not None:
        a.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
        b.plot(ep, [r["val_accuracy"] for r in history], "o-", label="validation")
    a.set(title="loss", xlabel="epoch")
    b.set(title="accuracy", xlabel="epoch")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _finish_run(out: Path, shards: Shards, config: TrainConfig, model: PatchBagModel, v: vocab.Vocabulary, history: list[dict], best: dict) -> dict:
    stats = vocab.pattern_stats(v, part_batches(shards, False, config.val_fraction), len(shards.class_names))
    patterns.write(patterns.to_table(stats, shards.plan()), out / layout.PATTERNS)
    vectors = model.table.weight.detach().numpy()[: v.size]
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
        "vocabulary": v.stats,
        "patterns": int(v.size),
        "rows": int(v.rows),
        "index": {"type": "Flat", "metric": "L2", "dim": config.dim},
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "final": next(r for r in history if r["epoch"] == best["epoch"]) if best["epoch"] else history[-1],
    }
    layout.write_json(out / layout.RUN_MANIFEST, manifest)
    for name in (layout.CHECKPOINT, layout.TRAIN_JOB):
        (out / name).unlink(missing_ok=True)
    return manifest
