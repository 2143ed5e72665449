"""Small data: the defaults against logistic regression and 1-nearest-neighbour on the raw pixels of the same images.

    python benchmarks/small.py --out benchmarks/results/small.json   # every slice below
    python benchmarks/small.py --smoke --json                        # seconds: one tiny digits slice (what CI runs)

Slices:

* digits: the first 100, 300 and 898 images of ``digits --split train`` (898 is the whole
  split), scored on ``--split test`` (899 images, other writers);
* CIFAR-10: the first 50, 100 and 200 images of each class of the shared training archive
  (by file order), scored on images 201-400 of each class (never in any slice).

Ours is ``pipeline.extract`` + ``pipeline.train`` with no settings (what ``pipe extract``
and ``pipe train`` do with no flags), scored by ``Run.evaluate`` (the head, as ``pipe
evaluate``). The baselines are scikit-learn's ``LogisticRegression`` (pixels scaled to
[0, 1], ``max_iter`` 2000) and ``KNeighborsClassifier(n_neighbors=1)`` on the same training
and scoring images. Each slice's row says whether ours beats both.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, emit  # noqa: E402

DIGITS_SLICES = (100, 300, 898)
CIFAR_SLICES = (50, 100, 200)  # images per class
CIFAR_SCORED = 200  # scored images per class: the last of the first 400 of each class


def baselines(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    a = x_train.reshape(len(x_train), -1).astype(np.float64) / 255
    b = x_test.reshape(len(x_test), -1).astype(np.float64) / 255
    return {
        "logistic_regression": float(LogisticRegression(max_iter=2000).fit(a, y_train).score(b, y_test)),
        "nearest_neighbour": float(KNeighborsClassifier(n_neighbors=1).fit(a, y_train).score(b, y_test)),
    }


def ours(x_train, y_train, x_test, y_test, names: list[str], epochs: int | None = None) -> dict:
    import pipeline
    from pipeline import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        pipeline.extract(pipeline.from_arrays(x_train, y_train, class_names=names), Path(d) / "s")
        m = pipeline.train(pipeline.open_shards(Path(d) / "s"), Path(d) / "r", TrainConfig(**({"epochs": epochs} if epochs else {})))
        res = pipeline.load(Path(d) / "r").evaluate(pipeline.from_arrays(x_test, y_test, class_names=names))
        return {"accuracy": res["accuracy"], "val_images": m["final"]["val_images"], "best_epoch": m["best_epoch"],
                "seconds": round(time.time() - t, 1)}


def row(name: str, x_train, y_train, x_test, y_test, names, epochs=None) -> dict:
    base = baselines(x_train, y_train, x_test, y_test)
    us = ours(x_train, y_train, x_test, y_test, names, epochs)
    return {"slice": name, "train_images": len(x_train), "scored_images": len(x_test), "ours": us["accuracy"], **base,
            "beats_both": us["accuracy"] > max(base.values()), "details": us}


def digits_rows(sizes, epochs=None) -> list[dict]:
    import pipeline

    def digits(split):
        b = next(pipeline.open_source("digits", split=split).batches(2000, 1))
        return b.images, b.labels

    xtr, ytr = digits("train")
    xte, yte = digits("test")
    names = [str(i) for i in range(10)]
    return [row(f"digits first {n}", xtr[:n], ytr[:n], xte, yte, names, epochs) for n in sizes]


def cifar_rows(per_class_sizes, source: Path = CIFAR_TAR) -> list[dict]:
    import pipeline

    if not source.exists():
        raise SystemExit(f"benchmark data {source} is missing; it is the shared CIFAR-10 archive (see ../shared/data/README.md)")
    take = max(per_class_sizes) + CIFAR_SCORED
    src = pipeline.open_source(str(source), per_class=take)  # the first images of each class, in sorted-name order
    batches = list(src.batches(1024, 3))
    images, labels = np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    scored = rank >= take - CIFAR_SCORED
    out = []
    for n in per_class_sizes:
        pick = rank < n
        out.append(row(f"CIFAR-10 {n} per class", images[pick], labels[pick], images[scored], labels[scored], src.class_names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: one digits slice of 100 images, one epoch")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    ap.add_argument("--no-cifar", action="store_true", help="digits slices only")
    ap.add_argument("--source", type=Path, default=CIFAR_TAR, help="the CIFAR-10 archive [the shared one]")
    a = ap.parse_args()
    if a.smoke:
        rows = digits_rows((100,), epochs=1)
    else:
        rows = digits_rows(DIGITS_SLICES) + ([] if a.no_cifar else cifar_rows(CIFAR_SLICES, a.source))
    res = {"command": "python benchmarks/small.py" + (" --smoke" if a.smoke else ""), "rows": rows,
           "all_beat_both": all(r["beats_both"] for r in rows)}
    if emit(res, a.out, a.json):
        return
    print(f"{'slice':28s} {'train':>6s} {'ours':>7s} {'logreg':>7s} {'1-NN':>7s}")
    for r in rows:
        print(f"{r['slice']:28s} {r['train_images']:6d} {r['ours']:7.4f} {r['logistic_regression']:7.4f} {r['nearest_neighbour']:7.4f}"
              f"{'' if r['beats_both'] else '   (does not beat both)'}")


if __name__ == "__main__":
    main()
