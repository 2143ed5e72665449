"""How far the pooled code view carries: a standardised linear classifier on the pooled code weights, beside the trainer on the same shards.

    python benchmarks/code_ceiling.py --out benchmarks/results/code_ceiling.json   # all shared CIFAR-10 images
    python benchmarks/code_ceiling.py --shards DIR                                 # shards already extracted with --code-pool
    python benchmarks/code_ceiling.py --smoke --json                               # seconds: 300 digits images (what CI runs)

``pipe extract --code-pool coarse --atoms 1024`` (every one of 1,024 atoms for every 6x6 patch, triangle weights summed per
quadrant: the features of Coates, Lee & Ng 2011) writes one weight per (atom, cell) for each image
and its mirror. The reference reads those weights back from the shards and fits a linear
classifier on them alone, each feature standardised by its mean and standard deviation over the
training part (Adam, cosine schedule, batches of 256), the way the patch papers score an
encoding. It trains on the images ``pipe train`` trains on (the originals outside the held-out
hash and their mirrors) and is scored on the same held-out originals, at its last epoch (nothing
is chosen on them). ``pipe train`` on the same shards with its defaults and ``--epochs 10`` runs
beside it (its best epoch, as a run reports it). The gap between the two is what the trainer's
pooling (a mean over every key's weight, no per-key scale) leaves on the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, emit  # noqa: E402
from benchmarks.defaults import size_mb, stage  # noqa: E402
from benchmarks.factors import TRAIN_BASE  # noqa: E402  the factors' training, so the rows compare

EXTRACT = ["--code-pool", "coarse", "--atoms", "1024"]  # 1,024 atoms: 4,096 weights an image on 32x32


def pooled_weights(shards_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code weights N x slots, labels, image ids, whether each is an original) read from the shards."""
    import pipeline
    from pipeline.data import augment

    sh = pipeline.open_shards(shards_dir)
    if not sh.config.code_pooled:
        raise SystemExit(f"{shards_dir} was extracted without --code-pool; extract it with {' '.join(EXTRACT)}")
    w, y, ids = [], [], []
    for b in sh.iter_content():
        w.append(b.weights)
        y.append(b.labels)
        ids.append(b.image_ids)
    ids = np.concatenate(ids)
    return np.concatenate(w), np.concatenate(y), ids, augment.base_ids(ids) == ids


def linear_reference(x: np.ndarray, y: np.ndarray, train: np.ndarray, scored: np.ndarray, epochs: int, seed: int = 0) -> dict:
    """Held-out accuracy of a linear classifier on standardised features (fitted on ``train``)."""
    import torch

    torch.manual_seed(seed)
    xt = torch.from_numpy(x[train])
    mean, std = xt.mean(0), xt.std(0)
    std = std + 0.01 * std.mean() + 1e-8  # features that barely vary are not blown up
    xt = (xt - mean) / std
    xs = (torch.from_numpy(x[scored]) - mean) / std
    yt, ys = torch.from_numpy(y[train]), torch.from_numpy(y[scored])
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        right = 0
        for s in range(0, len(xt), 256):
            idx = perm[s : s + 256]
            out = lin(xt[idx])
            loss = torch.nn.functional.cross_entropy(out, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            right += int((out.argmax(1) == yt[idx]).sum())
        sched.step()
    with torch.no_grad():
        acc = float((lin(xs).argmax(1) == ys).float().mean())
    return {"val_accuracy": round(acc, 4), "train_accuracy": round(right / len(xt), 4), "features": int(x.shape[1]),
            "train_images": int(train.sum()), "val_images": int(scored.sum()), "epochs": epochs, "seconds": round(time.time() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(CIFAR_TAR), help="what pipe extract reads [the shared CIFAR-10 archive]")
    ap.add_argument("--shards", type=Path, default=None, help="use these shards (extracted with --code-pool) instead of extracting")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of the linear reference [60]")
    ap.add_argument("--smoke", action="store_true", help="seconds: 300 digits images, 2 epochs each side")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    a = ap.parse_args()
    import pipeline

    epochs = 2 if a.smoke else a.epochs
    with tempfile.TemporaryDirectory(prefix="ceiling-") as work:
        res: dict = {"source": "digits" if a.smoke else Path(a.source).name}
        shards = a.shards or Path(work) / "shards"
        if a.shards is None:
            # on CIFAR, the one code shape the rows were measured with (auto adds 6x6/2 now)
            source, extra = ("digits", ["--limit", "300"]) if a.smoke else (a.source, ["--code-shapes", "6x6"])
            res["extract"] = stage(["extract", source, "--out", str(shards), *EXTRACT, *extra])
        res["shards_mb"] = size_mb(shards)
        x, y, ids, original = pooled_weights(shards)
        held = pipeline.is_validation(ids, pipeline.TrainConfig().val_fraction)
        res["reference"] = linear_reference(x, y, ~held, held & original, epochs)
        del x
        run = Path(work) / "run"
        res["trainer"] = {"flags": ["--epochs", str(10 if not a.smoke else epochs)]}
        res["trainer"]["train"] = stage(["train", str(shards), "--out", str(run), "--epochs", str(10 if not a.smoke else epochs), "--refit", "off",
                                           *TRAIN_BASE])
        m = json.loads((run / "run.json").read_text())
        res["trainer"].update(val_accuracy=round(m["final"]["val_accuracy"], 4), train_accuracy=round(m["final"]["train_accuracy"], 4),
                              best_epoch=m["best_epoch"], val_images=m["final"]["val_images"])
    if not emit(res, a.out, a.json):
        r, t = res["reference"], res["trainer"]
        print(f"pooled code view, {r['features']:,} weights per image, {r['train_images']:,} training images, {r['val_images']:,} held out")
        print(f"  standardised linear classifier: {r['val_accuracy']:.4f} held-out (train {r['train_accuracy']:.4f}, {r['epochs']} epochs)")
        print(f"  pipe train --epochs {t['flags'][1]}:            {t['val_accuracy']:.4f} held-out (train {t['train_accuracy']:.4f}, best epoch {t['best_epoch']})")


if __name__ == "__main__":
    main()
