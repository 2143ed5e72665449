"""Stage 2: shards -> a trained run directory (vocabulary, model, metrics, curves, pattern table, FAISS index).

From the CLI: ``pipe train SHARDS --out RUN``; from Python:
``pipeline.train(open_shards("artifacts/shards"), "artifacts/run", TrainConfig(epochs=5))``.

1. One pass counts the keys of the training images and fixes the vocabulary
   (:mod:`pipeline.table.vocab`), saved first so a resumed run uses the same rows.
2. Each epoch trains on batches of bags (:mod:`pipeline.training.bags`): every image
   becomes a bag of distinct rows with counts. The first epoch reads the shards
   in a seeded random order through a shuffle buffer, in a background thread,
   and keeps the bags in memory up to ``cache_mb``; later epochs permute them
   from memory. On the CPU with Adagrad, each step's pooling and table update
   run in compiled loops (:class:`pipeline.training.optim.CpuTableStep`); elsewhere through
   torch autograd and :mod:`pipeline.training.optim`.
3. After each epoch: validation, one line of ``metrics.jsonl``, ``curves.png``,
   and ``checkpoint.pt`` (model, optimizers, random states), so ``resume=True``
   continues a killed run exactly. ``model.pt`` holds the best epoch so far
   (by validation accuracy); ``patience`` stops early.

Validation images are a fixed ~``val_fraction`` of the shards, chosen by a hash
of ``image_id`` (independent of the seed), so every run of the same shards is
validated on the same images.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from pipeline.training import grow, lookups, optim, run_files
from pipeline.table import vocab
from pipeline import layout, outputs
from pipeline.table import index as pattern_index
from pipeline.config import TrainConfig
from pipeline.errors import ParameterError, PipelineError
from pipeline.training.bags import Bags, BagCache, prefetch, shuffled_bags, validation_bags
from pipeline.layout import RUN_FORMAT
from pipeline.model import PatchBagModel, build_model, pick_device
from pipeline.memory import release_unused
from pipeline.extraction.shards import Shards

log = logging.getLogger(__name__)

RESTART = "start the run again with `overwrite`"
FEW_HELD_OUT = 500  # fewer held-out images than this choose the best epoch by noise (one image is over 0.2 points)

StepProgress = Callable[[int, int], None]  # (images in this step, raw keys in this step)
EpochReport = Callable[[dict], None]


def evaluate_bags(model: PatchBagModel, batches: Iterable[Bags], device: torch.device) -> dict:
    """Loss, accuracy and balanced accuracy (the mean over classes of each class's accuracy) of
    ``model`` over batches of bags."""
    model.eval()
    loss_sum, n = 0.0, 0
    hits: dict[int, list[int]] = {}
    with torch.no_grad():
        for b in batches:
            rows, offsets, counts, y = b.tensors(device)
            logits = model(rows, offsets, counts)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            right = (logits.argmax(1) == y).cpu().numpy()
            for c in np.unique(b.labels):
                h = hits.setdefault(int(c), [0, 0])
                h[0] += int(right[b.labels == c].sum())
                h[1] += int((b.labels == c).sum())
            n += len(y)
    correct = sum(h[0] for h in hits.values())
    balanced = float(np.mean([h[0] / h[1] for h in hits.values()])) if hits else 0.0
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "balanced_accuracy": balanced, "n": n}


def _optimizers(model: PatchBagModel, config: TrainConfig) -> tuple:
    opt_table = optim.table_optimizer(config.optimizer, model.table.weight, config.lr)
    dense = [p for name, p in model.named_parameters() if not name.startswith("table.")]
    return opt_table, torch.optim.Adam(dense, lr=config.head_lr)


# ------------------------------------------------------------------ run directory state

def _job(shards: Shards, config: TrainConfig) -> dict:
    """What a resumed run must match: the shards and every setting except how long to train."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "patience", "device", "index", "nprobe", "ef_search")}
    return {"format": RUN_FORMAT, "shards_fingerprint": shards.fingerprint, "shards_images": shards.num_images, "config": cfg}


def check_run(out: Path, shards: Shards, config: TrainConfig, overwrite: bool, resume: bool, extra: dict | None = None) -> bool:
    """What :func:`prepare_run` refuses, writing nothing (a launcher checks before it starts
    processes); True when a checkpoint is there to resume from."""
    job = dict(_job(shards, config), **(extra or {}))
    if resume and not overwrite:
        if (out / layout.RUN_MANIFEST).exists():
            raise ParameterError("out", f"{out} holds a finished run; nothing to resume (pass `overwrite` to train again)")
        if _unstarted(out):
            raise ParameterError(
                "out", f"{out} stopped before its first epoch ended (or while training again on every image), so there is no checkpoint to resume from; "
                "run the same command without `resume` to start it again"
            )
        if not (out / layout.TRAIN_JOB).exists():
            raise ParameterError("out", f"{out} has no checkpoint to resume from (no interrupted run is there); leave out `resume` to start a new run")
        try:
            old = layout.read_json(out / layout.TRAIN_JOB)
        except (ValueError, OSError) as e:
            raise PipelineError(f"{out / layout.TRAIN_JOB} is unreadable ({e}); start again with `overwrite`") from None
        if old != job:
            diffs = sorted(k for k in set(old["config"]) | set(job["config"]) if old["config"].get(k) != job["config"].get(k))
            diffs += [k for k in ("from", "replay", "distill") if old.get(k) != job.get(k)]
            what = ", ".join(diffs) or "the shards"
            raise ParameterError("out", f"{out} was trained with different settings ({what}); resume with the same settings or start a new run")
        return True
    if shards.config.has_code:
        shards.dictionary()  # refuses a dictionary file that is not the config's
    # an unfinished run with no checkpoint has nothing to keep: it starts again without --overwrite
    outputs.check_prepare(out, overwrite or _unstarted(out), layout.RUN_MANIFEST, "run", [shards.root])
    return False


def _unstarted(out: Path) -> bool:
    """``out`` holds a run that stopped before its first checkpoint (nothing there to keep)."""
    return (out / layout.TRAIN_JOB).exists() and not (out / layout.CHECKPOINT).exists() and not (out / layout.RUN_MANIFEST).exists()


def prepare_run(out: Path, shards: Shards, config: TrainConfig, overwrite: bool, resume: bool, extra: dict | None = None) -> bool:
    """Create or check the run directory (its callers have refused one that holds the shards or
    the current directory); True when a checkpoint is there to resume from. ``extra`` joins
    what a resumed run must match (the run a step grows from)."""
    if check_run(out, shards, config, overwrite, resume, extra):
        return True
    outputs.prepare(out, overwrite or _unstarted(out), layout.RUN_MANIFEST, "run", [shards.root])
    if shards.config.has_code:  # queries code new images with the dictionary the shards were coded with
        layout.copy_file(shards.dictionary_path, out / layout.DICTIONARY)
    layout.write_json(out / layout.TRAIN_JOB, dict(_job(shards, config), **(extra or {})))
    return False


def save_checkpoint(out: Path, model, opts, epoch: int, history: list[dict], best: dict, **extra) -> None:
    """Write ``checkpoint.pt`` (atomically): model, both optimizers, history, best, and ``extra``
    (random states; ``processes`` for a multi-process run)."""
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "opt_table": opts[0].state_dict(),
        "opt_head": opts[1].state_dict(),
        "history": json.dumps(history),
        "best": json.dumps(best),
        **extra,
    }
    run_files.save(state, out / layout.CHECKPOINT)


def check_checkpoint(out: Path, processes: int | None) -> None:
    """Refuse a checkpoint written by another number of processes (``None``: the single-process
    trainer, whose optimizer and random states differ from the multi-process one's)."""
    ck = run_files.load(out / layout.CHECKPOINT, RESTART, mmap=True)
    had = ck.get("processes")
    if had != processes:
        how = "without `nproc`" if had is None else f"with `nproc` {had}"
        raise ParameterError("out", f"{out} was trained by {had or 'one'} process{'es' if had else ''}; resume it {how}")


def load_checkpoint(out: Path, model, opts, device) -> tuple[dict, list[dict], dict, int]:
    """Restore model and optimizers from ``checkpoint.pt``; returns (checkpoint, history, best, next epoch)."""
    ck = run_files.load(out / layout.CHECKPOINT, RESTART, map_location=device)
    model.load_state_dict(ck.pop("model"))
    opts[0].load_state_dict(ck.pop("opt_table"))
    opts[1].load_state_dict(ck.pop("opt_head"))
    log.info("resuming %s at epoch %d", out, ck["epoch"] + 1)
    return ck, json.loads(ck["history"]), json.loads(ck["best"]), ck["epoch"] + 1


def restart_metrics(out: Path | None, history: list[dict], best: dict) -> int:
    """Rewrite metrics.jsonl from ``history`` (an empty file for a new run; skipped when ``out``
    is None) and return the epochs since ``best`` (what early stopping counts)."""
    if out is not None:
        (out / layout.METRICS).write_text("".join(json.dumps(r) + "\n" for r in history))
    return 0 if not history else history[-1]["epoch"] - best["epoch"]


def record_epoch(out: Path, model: PatchBagModel, row: dict, history: list[dict], best: dict, stale: int,
                 select: str = "val_accuracy") -> tuple[dict, int]:
    """Keep the model when the epoch improved on ``best`` by ``row[select]`` (or tied it with a lower
    validation loss, so a tie never keeps the less trained of two epochs), append ``row`` to the
    history and metrics.jsonl; returns the new best and the count of epochs without improvement."""
    score, loss = row[select], row.get("val_loss")
    best_loss = best.get("val_loss")
    tied = score == best["val_accuracy"] and loss is not None and loss < (math.inf if best_loss is None else best_loss)
    if score is None or score > best["val_accuracy"] or tied:  # a tie goes to the lower validation loss
        best = {"epoch": row["epoch"], "val_accuracy": score if score is not None else -1.0, "val_loss": loss}
        _save_model(out, model)
        stale = 0
    else:
        stale += 1
    row["best_epoch"] = best["epoch"]
    history.append(row)
    with open(out / layout.METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return best, stale


def _save_model(out: Path, model: PatchBagModel) -> None:
    run_files.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / layout.MODEL)


def build_vocab(shards: Shards, config: TrainConfig, out: Path, progress: Callable[[int], None] | None) -> vocab.Vocabulary:
    v = vocab.build(
        functools.partial(shards.part_keys, False, config.val_fraction),
        config.min_count, config.buckets, progress, config.vocab_mb,
    )
    if v.size == 0:
        raise PipelineError(f"no key occurs `min_count` {config.min_count} times in the training images; lower `min_count`")
    v.save(out / layout.VOCAB)
    layout.write_json(out / layout.VOCAB_STATS, v.stats)
    release_unused()  # the counting tables' pages
    return v


# ------------------------------------------------------------------ training

ARCHITECTURE = ("dim", "bag", "hidden", "drop", "buckets")  # settings that shape a run's tensors: a step keeps them


def train(
    shards: Shards,
    out: Path | str,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: StepProgress | None = None,
    on_epoch: EpochReport | None = None,
    on_vocab: Callable[[int], None] | None = None,
    on_step: lookups.Step | None = None,
    start: Path | str | None = None,
    replay: int = grow.REPLAY,
    distill: float = grow.DISTILL,
) -> dict:
    """Train a model on ``shards`` and write a complete run directory to ``out``; returns its manifest.

    ``progress`` counts training images, ``on_epoch`` gets each epoch's figures, ``on_vocab`` counts
    the vocabulary pass's images, and ``on_step`` is told as each step after the last epoch starts
    (see :func:`pipeline.training.lookups.write_lookups`).

    ``start`` (a finished run) learns ``shards`` on top of it instead of from nothing, with up to
    ``replay`` of its earlier images per class, ``distill`` the weight of its answers in the loss
    (:mod:`pipeline.training.grow`); ``config`` defaults to that run's settings. ``start`` itself
    is never modified."""
    out = Path(out)
    growth = None
    if start is not None:  # a step's settings are compared with its run's resolved, so the automatic lr and drop are fixed first
        growth = _Growth(shards, start, config and config.resolved(None, shards.config.large_code, shards.mirror_variant > 0), replay, distill)
        config, shards = growth.config, growth.step
    config = config or TrainConfig()
    present = shards.classes_present()
    if not len(present) or not shards.class_names:
        raise PipelineError(f"{shards.root} has no labels; training needs a labelled source (class folders or y=)")
    if len(present) < 2:
        name = shards.class_names[int(present[0])] if present[0] < len(shards.class_names) else str(present[0])
        raise PipelineError(f"{shards.root} holds images of one class only ({name!r}); a classifier needs at least two: "
                            "extract a source with more classes (`limit` takes the first images, which may all be one class; use `per_class`)")
    pattern_index.check_kind(config.index, config.dim)  # a bad --index fails now, not after training
    device = pick_device(config.device)  # an unusable --device fails before the run directory is touched
    outputs.check_out(out, [shards.root] + ([growth.parent.root] if growth else []))
    config = config.for_shards(shards)
    with outputs.locked(out, "pipe train"):
        return _train(shards, out, config, overwrite, resume, progress, on_epoch, on_vocab, device, on_step, growth)


class _Growth:
    """A step on top of an earlier run (:mod:`pipeline.training.grow`): what it trains on and how its
    vocabulary, model and look-ups start from the earlier run's."""

    def __init__(self, shards: Shards, start, config: TrainConfig | None, replay: int, distill: float):
        if replay < 0:
            raise PipelineError(f"replay {replay} must be 0 or more")
        if not (math.isfinite(distill) and 0 <= distill <= 100):
            raise PipelineError(f"distill {distill} must be a weight from 0 (none) to 100")
        self.parent = grow.load_parent(start)
        p = self.parent
        self.config = config or p.config
        changed = [f for f in ARCHITECTURE if getattr(self.config, f) != getattr(p.config, f)]
        if changed:
            raise PipelineError(f"{', '.join(changed)} differ from {p.root}'s; a step keeps the settings of the run it grows from")
        if shards.fingerprint != p.manifest.get("extract_fingerprint"):
            raise PipelineError(f"{shards.root} was extracted with other settings or another dictionary than {p.root}; "
                                f"extract the new images with pipe extract SOURCE `like` {p.root}")
        self.classes = grow.merged_classes(p.class_names, shards.class_names)
        earlier, self.notes = grow.choose_earlier(p.lineage, self.classes, shards.fingerprint, replay)
        for note in self.notes:
            log.warning(note)
        self.step = grow.StepShards(shards, self.classes, earlier)
        self.new_only = grow.StepShards(shards, self.classes)
        self.replay, self.distill = replay, float(distill)
        self.offsets: list[float] = []
        self.replayed = sum(len(ids) for _, ids, _ in earlier)

    def job(self) -> dict:
        return {"from": str(self.parent.root.resolve()), "replay": self.replay, "distill": self.distill}

    def vocabulary(self, out: Path, config: TrainConfig, progress) -> vocab.Vocabulary:
        v = grow.grown_vocabulary(self.parent.vocab, self.new_only, config.val_fraction, config.min_count, config.vocab_mb, progress)
        v.save(out / layout.VOCAB)
        layout.write_json(out / layout.VOCAB_STATS, v.stats)
        return v

    def class_weights(self, fraction: float) -> torch.Tensor:
        """Each class's weight in the step's loss: equal shares for every class the step trains on,
        however few of its images were chosen again (:func:`pipeline.training.grow.balanced_weights`)."""
        return torch.from_numpy(grow.balanced_weights(self.step, fraction))

    def rows(self, v: vocab.Vocabulary) -> np.ndarray:
        """The new row of each earlier row."""
        return grow.earlier_rows(self.parent.vocab, v)

    def manifest(self) -> dict:
        p = self.parent
        return {"lineage": p.lineage + [{"run": str(p.root.resolve()), "shards": str(self.step.root.resolve())}],
                "grown_from": str(p.root.resolve()), "replayed_images": self.replayed, "distill": self.distill,
                "bias_offsets": self.offsets}


def _start(config: TrainConfig, v: vocab.Vocabulary, num_classes: int) -> tuple[np.random.Generator, PatchBagModel]:
    """A run's seeded generators and new model over vocabulary ``v`` (refused when the table cannot fit)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    config.check_table(v.rows, f"the vocabulary ({v.size:,} keys) with `buckets` {config.buckets:,}")
    return rng, build_model(config, v.rows, num_classes)


def refits(config: TrainConfig, held_out: int, growth) -> bool:
    """Whether a run trains again on every image once its held-out part has chosen the epoch count:
    with ``refit`` auto, a single-process run that is not a step and held out fewer than
    :data:`FEW_HELD_OUT` images (more are worth keeping for ``pipe evaluate --validation``)."""
    return config.refit == "auto" and growth is None and 0 < held_out < FEW_HELD_OUT


def _refit(shards: Shards, out: Path, config: TrainConfig, epochs: int, device, on_step) -> tuple[vocab.Vocabulary, dict]:
    """Train a new run on every labelled image (``val_fraction`` 0) for ``epochs`` epochs, as a run
    started with those settings would (same seeds, its own vocabulary), and keep it as model.pt.
    The checkpoint of the choosing run goes first: a refit killed half-way leaves a run that
    starts again with the same command, ending as it would have."""
    (out / layout.CHECKPOINT).unlink(missing_ok=True)
    every = dataclasses.replace(config, val_fraction=0.0, epochs=epochs, patience=0, refit="off")
    images = shards.count_training(0.0)
    if on_step:
        on_step(f"training again on all {images:,} images for the {epochs} epoch(s) the held-out part chose (`refit` off keeps it held out)", 0)
    v = build_vocab(shards, every, out, None)
    rng, model = _start(every, v, len(shards.class_names))
    model = model.to(device)
    opts = _optimizers(model, every)
    caches = _Caches(every, shards, v, False)
    rows = [_epoch(model, opts, shards, v, every, rng, device, e, None, caches) for e in range(1, epochs + 1)]
    _save_model(out, model)
    last = rows[-1]
    return v, {"epochs": epochs, "images": last["train_images"], "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"]}


def _train(shards, out, config, overwrite, resume, progress, on_epoch, on_vocab, device, on_step=None, growth: _Growth | None = None) -> dict:
    """:func:`train` with ``out`` locked."""
    resuming = prepare_run(out, shards, config, overwrite, resume, growth.job() if growth else None)
    if resuming:
        check_checkpoint(out, None)
    num_classes = len(shards.class_names)
    if resuming:
        v = vocab.Vocabulary.load(out / layout.VOCAB, layout.read_json(out / layout.VOCAB_STATS))
    elif growth is None:
        v = build_vocab(shards, config, out, on_vocab)
    else:
        v = growth.vocabulary(out, config, on_vocab)
    rng, model = _start(config, v, num_classes)
    if growth is not None:  # a resumed step's checkpoint replaces these values below; its teacher keeps them
        grow.initialise(model, growth.parent, growth.rows(v))
    model = model.to(device)
    teacher = grow.Teacher(model, len(growth.parent.class_names), weight=growth.distill) if growth and growth.distill else None
    opts = _optimizers(model, config)
    history: list[dict] = []
    best = {"epoch": 0, "val_accuracy": -1.0}
    start = 1
    if resuming:
        ck, history, best, start = load_checkpoint(out, model, opts, device)
        torch.set_rng_state(ck["torch_rng"].cpu())
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        del ck
    caches = _Caches(config, shards, v, resuming and start > 1)
    weight = growth.class_weights(config.val_fraction).to(device) if growth else None

    def train_epoch(epoch: int) -> dict:
        row = _epoch(model, opts, shards, v, config, rng, device, epoch, progress, caches, weight, teacher)
        release_unused()  # the pages of this epoch's shard reads (the first epoch reads them all)
        return row

    def validate() -> dict:
        row = evaluate_bags(model, validation_bags(shards, v, config.val_fraction, cache=caches.validation(), vote=config.vote_variant(shards)), device)
        return dict(row, cached_mb=round((caches.train.nbytes + caches.validation().nbytes) / 2**20, 1))

    def state() -> dict:
        return {"torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state)}

    # a step's validation images are mostly its new classes': its best epoch is the best over all classes alike
    select = "val_balanced_accuracy" if growth else "val_accuracy"
    history, best = run_epochs(out, model, opts, config, start, history, best, train_epoch, validate, state, on_epoch, select=select)
    if not history:
        raise PipelineError(f"{out} trained no epoch; raise `epochs`")
    # the table, its optimizer state, the bags and a step's copy of the earlier table; the best epoch is reloaded from model.pt
    del model, opts, caches, train_epoch, validate, teacher
    release_unused()  # the bag cache's blocks would stay in the C heap otherwise
    refit = reference = None
    if refits(config, history[-1].get("val_images") or 0, growth):
        chooser = build_model(config, v.rows, num_classes, run_files.load(out / layout.MODEL, RESTART, mmap=True))
        reference = lookups.chooser_reference(shards, chooser, v, config.val_fraction)
        del chooser
        v, refit = _refit(shards, out, config, max(1, best["epoch"]), device, on_step)
        release_unused()
    # memory-mapped and assigned, not copied: the final step must not hold the table twice
    final = build_model(config, v.rows, num_classes, run_files.load(out / layout.MODEL, RESTART, mmap=True))
    if growth is not None:
        head = final.output_layer()
        offsets = grow.calibrate(final, validation_bags(shards, v, config.val_fraction, vote=config.vote_variant(shards)))
        head.bias = nn.Parameter(head.bias.detach() + torch.from_numpy(offsets))
        growth.offsets = [round(float(o), 6) for o in offsets]
    return finish_run(out, shards, config, final, v, history, best, on_step, growth, refit, reference)


def run_epochs(out: Path, model, opts, config: TrainConfig, start: int, history: list[dict], best: dict,
               train_epoch: Callable[[int], dict], validate: Callable[[], dict], state: Callable[[], dict],
               on_epoch: EpochReport | None = None, master: bool = True, agree: Callable[[bool], bool] | None = None,
               select: str = "val_accuracy") -> tuple[list[dict], dict]:
    """The epochs of a run, for one process or several (``pipeline.training.ddp``): ``train_epoch(epoch)``
    trains one epoch and returns its training figures (on every process, already summed over
    them); on the ``master`` process ``validate()`` scores the validation images (an
    :func:`evaluate_bags` result, plus any figures to record), and the epoch's row goes to
    metrics.jsonl, the best model to model.pt, a checkpoint (with ``state()``: random states and
    the like) and the curves. Early stopping is decided by the master; ``agree(stop)`` gives
    every process the master's decision. ``select`` names the figure the best epoch is chosen by.
    Returns the history and the best epoch."""
    stale = restart_metrics(out if master else None, history, best)
    for epoch in range(start, config.epochs + 1):
        if config.patience and stale >= config.patience:
            break
        row = train_epoch(epoch)
        if master:
            val = validate()
            n = val.pop("n")
            if epoch == start and 0 < n < FEW_HELD_OUT:
                log.warning(few_held_out(n, config.val_fraction))
            balanced = val.pop("balanced_accuracy")
            row.update(val_loss=val.pop("loss") if n else None, val_accuracy=val.pop("accuracy") if n else None,
                       val_balanced_accuracy=balanced if n else None, val_images=n, **val)
            if model.auto_drop is not None:
                row["drop_rate"] = float(model.auto_drop.rate.item())
            best, stale = record_epoch(out, model, row, history, best, stale, select)
            save_checkpoint(out, model, opts, epoch, history, best, **state())
            run_files.plot_curves(history, out / layout.CURVES)
            if on_epoch:
                on_epoch(row)
        stop = bool(config.patience) and stale >= config.patience
        if agree is not None and agree(stop):
            break
    return history, best


def few_held_out(n: int, val_fraction: float) -> str:
    """The warning of a run whose held-out part is too small to choose its best epoch by."""
    return (f"only {n} held-out images choose the best epoch (one image is {100 / n:.2f} points of accuracy), "
            f"so the choice is mostly noise: raise `val_fraction` (now {val_fraction:g}) if there are images to spare")


class _Caches:
    """The training and validation parts' bag caches, sharing the ``cache_mb`` budget (training first)."""

    def __init__(self, config: TrainConfig, shards: Shards, v: vocab.Vocabulary, refill: bool):
        self.budget = config.cache_mb << 20
        self.train = BagCache(self.budget, shards.keys_per_image)
        self.val: BagCache | None = None
        if refill:  # a resumed run: the uninterrupted run would hold the bags by now
            self.train.fill(shards, v, False, config.val_fraction)
            self.validation().fill(shards, v, True, config.val_fraction, config.vote_variant(shards))

    def validation(self) -> BagCache:
        if self.val is None:
            self.val = BagCache(self.budget - self.train.nbytes if self.train.complete else 0, self.train.k)
        return self.val


def _epoch(model, opts, shards, v, config, rng, device, epoch, progress, caches: _Caches, weight: torch.Tensor | None = None,
           teacher: grow.Teacher | None = None) -> dict:
    """One pass over the training images; ``weight``: each class's weight in the loss (None: equal);
    ``teacher``: the earlier run a step's loss keeps close to."""
    model.train()
    t0 = time.time()
    loss_sum, correct, n, raw, rows_seen = 0.0, 0, 0, 0, 0
    fused = optim.cpu_table_step(opts[0], device)
    if caches.train.complete:
        batches = caches.train.batches(config.batch_size, rng)
    else:
        batches = shuffled_bags(shards, v, config.val_fraction, config.batch_size, rng, caches.train)
    for b in prefetch(batches):
        loss, logits, y = (_fused_step if fused else _torch_step)(model, opts, b, device, fused, weight, teacher)
        value = check_loss(loss.item(), epoch)
        loss_sum += value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        raw += b.raw_keys
        rows_seen += len(b.rows)
        if progress:
            progress(len(y), b.raw_keys)
    if n == 0:
        raise PipelineError(f"{shards.root} has no training images left after holding out `val_fraction` {config.val_fraction}")
    caches.train.seal()
    seconds = time.time() - t0
    row = {
        "epoch": epoch,
        "train_loss": loss_sum / n,
        "train_accuracy": correct / n,
        "train_images": n,
        "seconds": round(seconds, 3),
        "ids_per_s": round(raw / max(seconds, 1e-9)),
        "rows_per_image": round(rows_seen / n, 1),
    }
    return row


def check_loss(value: float, epoch: int) -> float:
    """``value``, or a one-line stop when training has diverged (the run keeps its last good epoch)."""
    if not math.isfinite(value):
        raise PipelineError(
            f"training diverged in epoch {epoch} (the loss became {value}); lower `lr` or `head_lr` (or `init_std`) and train again"
        )
    return value


def _torch_step(model, opts, b: Bags, device, _fused, weight: torch.Tensor | None = None, teacher: grow.Teacher | None = None) -> tuple:
    """One step through torch: distinct rows gathered into a leaf tensor, autograd, then the table optimizer."""
    rows, offsets, counts, y = b.tensors(device)
    logits, unique, sub = model.forward_rows(rows, offsets, counts)
    loss = nn.functional.cross_entropy(logits, y, weight=weight)
    total = loss if teacher is None else loss + teacher.loss(rows, offsets, model.weights(counts, offsets), logits)
    opts[1].zero_grad()
    (total + model.penalty()).backward()
    with torch.no_grad():
        opts[0].step(unique, sub.grad)
    opts[1].step()
    return loss, logits, y


def _fused_step(model, opts, b: Bags, device, fused, weight: torch.Tensor | None = None, teacher: grow.Teacher | None = None) -> tuple:
    """The same step with the table's pool and update in compiled loops (CPU, Adagrad): same arithmetic, no copies."""
    _, offsets, counts, y = b.tensors(device)
    w = model.weights(counts, offsets)
    wn = w.detach().numpy()
    pooled = torch.from_numpy(fused.pool(b.rows, b.offsets, wn)).requires_grad_(True)
    logits = model.head(model.pooled_dropout(pooled))
    loss = nn.functional.cross_entropy(logits, y, weight=weight)
    total = loss if teacher is None else loss + teacher.loss(torch.from_numpy(b.rows), offsets, w, logits)
    opts[1].zero_grad()
    (total + model.penalty()).backward()
    gpooled = pooled.grad.numpy()
    if w.requires_grad:  # a learned drop rate: its gradient flows through the weights
        w.backward(torch.from_numpy(fused.weight_grads(b.rows, b.offsets, gpooled)))
    fused.update(b.rows, b.offsets, wn, gpooled)
    opts[1].step()
    return loss, logits, y


def finish_run(
    out: Path, shards: Shards, config: TrainConfig, model: PatchBagModel, v: vocab.Vocabulary, history: list[dict], best: dict,
    on_step: lookups.Step | None = None, growth: _Growth | None = None, refit: dict | None = None,
    reference=None,
) -> dict:
    looked = shards if growth is None else growth.new_only  # a step's look-ups add the new images to the earlier run's
    trained_on = 0.0 if refit else config.val_fraction  # a refit trained on every image: the look-ups hold them all
    written = lookups.write_lookups(out, looked, model, v, config.index, config.nprobe, config.ef_search, trained_on, config.seed, on_step)
    if growth is not None:
        written = grow.merge_lookups(out, growth.parent, growth.rows(v), written, len(shards.class_names), config.seed)
    if on_step:
        on_step("measuring the familiarity of the held-out images", 0)
    written["familiarity"] = lookups.write_familiarity(out, looked, model, v, written["image_index"], trained_on, reference)
    manifest = {
        "format": RUN_FORMAT,
        "extract_config": shards.config.to_dict(),
        "extract_fingerprint": shards.fingerprint,
        "train_config": config.to_dict(),
        "height": shards.height,
        "width": shards.width,
        "class_names": shards.class_names,
        "shards": str(shards.root),
        "augment": shards.manifest.get("augment"),
        "vocabulary": v.stats,
        "patterns": int(v.size),
        "rows": int(v.rows),
        **written,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "final": next(r for r in history if r["epoch"] == best["epoch"]) if best["epoch"] else history[-1],
        "refit": refit,  # trained again on every image for the chosen epochs: no held-out part is left
        **(growth.manifest() if growth else {}),
    }
    run_files.save_weights(model.state_dict(), out / layout.WEIGHTS)
    layout.write_json(out / layout.RUN_MANIFEST, manifest)
    for name in (layout.CHECKPOINT, layout.TRAIN_JOB, layout.MODEL):
        (out / name).unlink(missing_ok=True)
    return manifest
