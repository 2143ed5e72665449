"""Training on several processes: ``torchrun --nproc-per-node N -m pipeline.training.ddp SHARDS --out RUN``
(what ``pipe train --nproc N`` launches).

DistributedDataParallel over the gloo backend, which all-reduces the sparse gradients of the
table's ``EmbeddingBag(sparse=True)`` (NCCL cannot; see docs/distributed.md). Rank 0 counts
the vocabulary and writes it; the others load it. Each rank reads a disjoint set of the
training part's row groups (group i goes to rank i mod N) and steps on ``batch_size / N``
images, so a step sees the same number of images as one process does; ``DDP.join`` covers
ranks whose part runs out first. The table is updated by torch's sparse Adagrad (the
single-process CPU path uses the compiled lazy Adagrad of :mod:`pipeline.training.optim`,
the same arithmetic), or torch's SparseAdam or SGD as ``--optimizer`` says. Rank 0 validates, writes metrics, curves and the best model, and
finishes the run directory exactly as a single-process run does. Rank 0 also writes
``checkpoint.pt`` after every epoch (model, optimizers, history: the optimizer state is the
same on every rank, since DDP all-reduces the gradients), and every epoch's random streams
are seeded from (seed, epoch, rank), so a killed run resumed with ``--resume`` and the same
number of processes reaches the metrics of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import layout, outputs
from pipeline.training import run_files
from pipeline.table import vocab
from pipeline.training.bags import concat_bags, to_bags, validation_bags
from pipeline.config import TrainConfig
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.shards import Shards
from pipeline.model import build_model
from pipeline.training.loop import (
    build_vocab, finish_run, prepare_run, check_checkpoint, check_run, check_loss, evaluate_bags, load_checkpoint, run_epochs,
)


def _my_bags(shards: Shards, v: vocab.Vocabulary, config: TrainConfig, rank: int, world: int):
    """This rank's training images as per-image (rows, counts) and labels, read once: row groups
    r, r + N, ...; with fewer row groups than ranks, every rank reads them all and keeps images
    r, r + N, ... (a rank with no images could not take part in the all-reduces)."""
    groups = shards.row_groups()
    by_group = len(groups) >= world
    parts, labels, seen = [], [], 0
    for _, (keys, lab, _, weights) in shards.part_groups(False, config.val_fraction, groups[rank::world] if by_group else groups):
        b = to_bags(v, keys, lab, weights)
        mine = range(len(lab)) if by_group else range((rank - seen) % world, len(lab), world)
        seen += len(lab)
        for i in mine:
            s, e = b.offsets[i], b.offsets[i + 1]
            parts.append((b.rows[s:e], b.counts[s:e]))
        labels.append(lab[list(mine)])
    return parts, (np.concatenate(labels) if labels else np.zeros(0, np.int64)), shards.keys_per_image


class RankZeroFailed(PipelineError):
    """Raised on the other ranks when rank 0 could not prepare the run (rank 0 says why)."""


# torch's own optimizers for a sparse gradient; row-wise Adagrad has no torch counterpart
DDP_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "sparseadam": torch.optim.SparseAdam, "sgd": torch.optim.SGD}


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_ranks(shards_dir: str, out: str, config: TrainConfig, overwrite: bool = False, resume: bool = False) -> dict | None:
    """The body of each torchrun process; returns the run manifest on rank 0."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shards, out_p = Shards(shards_dir), Path(out)
    flags, err = torch.ones(2), None  # (rank 0 is ready, the run resumes from a checkpoint)
    if rank == 0:
        try:
            resuming = prepare_run(out_p, shards, config, overwrite=overwrite, resume=resume)
            if resuming:
                check_checkpoint(out_p, world)
            else:
                build_vocab(shards, config, out_p, None)
            flags[1] = float(resuming)
        except PipelineError as e:
            flags[0], err = 0.0, e
    dist.broadcast(flags, 0)  # the other ranks must not wait for a vocabulary that never comes
    if not flags[0].item():
        dist.destroy_process_group()
        raise err or RankZeroFailed("rank 0 could not prepare the run; see its message")
    v = vocab.Vocabulary.load(out_p / layout.VOCAB, layout.read_json(out_p / layout.VOCAB_STATS))
    torch.manual_seed(config.seed)
    model = build_model(config, v.rows, len(shards.class_names))
    opt_table = DDP_OPTIMIZERS[config.optimizer]([model.table.weight], lr=config.lr)
    opt_head = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("table.")], lr=config.head_lr)
    history: list[dict] = []
    best = {"epoch": 0, "val_accuracy": -1.0}
    start = 1
    if flags[1].item():  # every rank restores the same state from rank 0's checkpoint
        _, history, best, start = load_checkpoint(out_p, model, (opt_table, opt_head), torch.device("cpu"))
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    parts, labels, k = _my_bags(shards, v, config, rank, world)
    per_rank = max(1, config.batch_size // world)

    def train_epoch(epoch: int) -> dict:
        model.train()
        t0 = time.time()
        torch.manual_seed(_epoch_seed(config.seed, epoch, rank))  # patch dropout: a function of (seed, epoch, rank)
        order = np.random.default_rng([config.seed, epoch, rank]).permutation(len(parts))
        stats = torch.zeros(3)  # loss sum, correct, images (this rank)
        with ddp.join():
            for s in range(0, len(order), per_rank):
                idx = order[s : s + per_rank]
                b = concat_bags([parts[i] for i in idx], labels[idx], k)
                rows, offsets, counts, y = b.tensors(torch.device("cpu"))
                logits = ddp(rows, offsets, counts)
                loss = nn.functional.cross_entropy(logits, y)
                check_loss(loss.item(), epoch)
                opt_table.zero_grad()
                opt_head.zero_grad()
                (loss + model.penalty()).backward()
                opt_table.step()
                opt_head.step()
                stats += torch.tensor([loss.item() * len(y), float((logits.argmax(1) == y).sum()), float(len(y))])
        dist.all_reduce(stats)
        return {"epoch": epoch, "train_loss": float(stats[0] / stats[2]), "train_accuracy": float(stats[1] / stats[2]),
                "train_images": int(stats[2]), "seconds": round(time.time() - t0, 3), "processes": world}

    def validate() -> dict:
        return evaluate_bags(model, validation_bags(shards, v, config.val_fraction, vote=config.vote_variant(shards)), torch.device("cpu"))

    def agree(stop: bool) -> bool:
        flag = torch.tensor([float(stop)])
        dist.broadcast(flag, 0)  # rank 0's decision
        return bool(flag.item())

    def on_epoch(row: dict) -> None:
        print(json.dumps(row), flush=True)

    history, best = run_epochs(out_p, model, (opt_table, opt_head), config, start, history, best, train_epoch, validate,
                               lambda: {"processes": world}, on_epoch, master=rank == 0, agree=agree)
    manifest = None
    if rank == 0:
        state = run_files.load(out_p / layout.MODEL, "start the run again with --overwrite")
        model.load_state_dict(state)
        manifest = finish_run(out_p, shards, config, model, v, history, best)
        manifest["processes"] = world
        layout.write_json(out_p / layout.RUN_MANIFEST, manifest)
    dist.barrier()
    dist.destroy_process_group()
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description="One process of a torchrun training (see pipe train --nproc).")
    ap.add_argument("shards")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (same number of processes)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    try:
        train_ranks(a.shards, a.out, TrainConfig(**json.loads(a.config)), a.overwrite, a.resume)
    except RankZeroFailed:
        raise SystemExit(1) from None  # rank 0's line is the message
    except PipelineError as e:
        raise SystemExit(f"Error: {e}") from None
    # Everything is written and the process group is gone. Leave without the interpreter's teardown:
    # under load a worker thread of a native library still alive at exit can abort the process
    # ("terminate called without an active exception"), and torchrun then counts a finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(shards: str | Path, out: str | Path, config: TrainConfig, nproc: int, overwrite: bool = False, resume: bool = False) -> dict:
    """Run ``torchrun --standalone --nproc-per-node nproc -m pipeline.training.ddp`` and return the run manifest
    (``resume``: continue the interrupted run in ``out``, which rank 0 checks).

    Rank 0's epoch lines (one JSON object each) go to this process's stderr as they come. The
    processes' own stderr is kept in a log file: when they fail, a rank's one-line error becomes
    this function's :class:`PipelineError`; anything else names the log.
    """
    if nproc < 1:
        raise ParameterError("nproc", f"{nproc} must be at least 1")
    if config.optimizer not in DDP_OPTIMIZERS:
        raise ParameterError("optimizer", f"{config.optimizer} runs in one process only; use {', '.join(DDP_OPTIMIZERS)} with --nproc, or drop --nproc")
    default = TrainConfig()
    for name, flag in (("device", "--device"), ("cache_mb", "--cache-mb")):
        if getattr(config, name) != getattr(default, name) and not (name == "device" and config.device == "cpu"):
            raise PipelineError(f"{flag} goes with one process (--nproc runs on the CPU and keeps every bag in memory); leave it out or drop --nproc")
    sh = Shards(shards)  # a bad shard directory fails here with its one-line message
    config = config.for_shards(sh)
    o = Path(out)
    outputs.check_out(o, [shards])
    with outputs.locked(o, "pipe train"):
        # refused here, before any process starts (rank 0 checks again as it prepares the run)
        if check_run(o, sh, config, overwrite, resume):
            check_checkpoint(o, nproc)
        return _launch(shards, o, config, nproc, overwrite, resume)


def _launch(shards, o: Path, config: TrainConfig, nproc: int, overwrite: bool, resume: bool) -> dict:
    """:func:`launch` with ``o`` locked."""
    out = o
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline.training.ddp",
           str(shards), "--out", str(out), "--config", json.dumps(config.to_dict())]
    cmd += (["--overwrite"] if overwrite else []) + (["--resume"] if resume else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun warns when it has to choose
    with tempfile.NamedTemporaryFile("w+", prefix="patchhash-torchrun-", suffix=".log", delete=False) as log_file:
        r = subprocess.run(cmd, stdout=2, stderr=log_file, env=env)
    if r.returncode == 0 and (o / layout.RUN_MANIFEST).exists():
        os.unlink(log_file.name)
        return layout.read_json(o / layout.RUN_MANIFEST)
    errors = [ln[len("Error: "):] for ln in Path(log_file.name).read_text(errors="replace").splitlines() if ln.startswith("Error: ")]
    if errors:
        os.unlink(log_file.name)
        raise PipelineError(errors[0])
    raise PipelineError(f"the {nproc}-process training failed (exit {r.returncode}); its processes' messages are in {log_file.name}")


if __name__ == "__main__":
    main()
