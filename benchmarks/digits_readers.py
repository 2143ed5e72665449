"""Digits: other ways to read a trained run, scored on held-out writers only (never the test split).

    python benchmarks/digits_readers.py --json
    python benchmarks/digits_readers.py --json --set position=grid,offset   # other settings, same readers
    python benchmarks/digits_readers.py --json --folds 3                    # every image held out once
    python benchmarks/digits_readers.py --smoke --json                      # seconds: one seed, 2 epochs (what CI runs)

Trains ``benchmarks/digits.py``'s settings (EXTRACT, TRAIN) on the first 600 images of
the train split with each of ``--seeds`` and scores the last 298 (other writers, the
same shift as the test split; see ``digits.py --search``). With ``--folds N`` the train
split's 898 images are cut into N contiguous blocks of writers instead; each block is
scored by runs trained on the others, so every image is held out once and a figure
rests on 898 images rather than 298. The readers:

* ``head`` / ``knn5``: the run's linear head, and the vote of the 5 nearest training
  images by pooled vector (what ``digits.py`` reports);
* ``*_shift_tta``: the same, summed over the image and its 8 one-pixel shifts
  (test-time augmentation, edges repeated as ``--augment shift:1`` does);
* ``knn5_shifted_index``: the vote over the training images plus their 8 shifts;
* ``knn5_cosine``: the vote by cosine instead of L2 distance;
* ``head_plus_knn5``: head probabilities plus vote shares;
* ``knn5_all_labelled``: the vote over every labelled image, the run's validation part included;
* ``svc_pooled`` / ``logreg_pooled``: scikit-learn's RBF SVC (C = 1) and logistic regression
  (C = 1, on vectors scaled by their standard deviation) fitted to the training images'
  pooled vectors;
* ``ensemble_*``: the sum over the seeds' runs;
* ``raw_pixels_svc`` / ``raw_pixels_1nn``: ``digits.py``'s SVC and 1-NN baselines on the raw
  pixels of the same 600 / 298 images, for scale.

``--set KEY=VALUE`` (repeatable) changes one of EXTRACT or TRAIN for every seed.

Each figure is the share of the 298 images read correctly; one image is 0.34 points.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.digits import EXTRACT, HELD_OUT, TRAIN, extract_config  # noqa: E402
from pipeline import TrainConfig  # noqa: E402


def _vote(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, cosine: bool = False) -> np.ndarray:
    import faiss

    if cosine:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    _, nn = index.search(np.ascontiguousarray(queries, np.float32), k)
    votes = np.zeros((len(queries), 10))
    for j in range(k):
        np.add.at(votes, (np.arange(len(queries)), labels[nn[:, j]]), 1 - 1e-6 * j)
    return votes / votes.sum(1, keepdims=True)


def readers(seed: int, x: np.ndarray, y: np.ndarray, held: np.ndarray, work: Path, extract: dict, train: dict) -> dict[str, np.ndarray]:
    """Class scores of the ``held`` images under each reader, for one seed's run on the labelled images ``x``, ``y``."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    import pipeline
    from pipeline.data.augment import variants

    names = [str(c) for c in range(10)]
    cfg = extract_config(extract)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        pipeline.extract(pipeline.from_arrays(x, y, names), shards, cfg, augment=extract["augment"])
    pipeline.train(pipeline.open_shards(shards), work / f"run{seed}", TrainConfig(seed=seed, **train))
    run = pipeline.load(work / f"run{seed}")

    def pooled(imgs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(run.classifier.pooled(run.images_to_keys(imgs), None))

    def head(p: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(run.model.head(p), 1).numpy()

    def shifts(imgs: np.ndarray) -> list[np.ndarray]:
        per_image = [variants(im, "shift:1") for im in imgs]
        return [np.stack([v[j] for v in per_image]) for j in range(8)]

    p = pooled(held)
    shifted = [pooled(s) for s in shifts(held)]
    train_ids, train_labels = run.training_images.metadata["image_id"], run.training_images.metadata["label"]  # the run's training images
    tv = pooled(x[train_ids]).numpy()
    tv_shifted = np.concatenate([tv] + [pooled(s).numpy() for s in shifts(x[train_ids])])
    out = {
        "head": head(p),
        "knn5": _vote(tv, train_labels, p.numpy(), 5),
        "head_shift_tta": head(p) + sum(head(s) for s in shifted),
        "knn5_shift_tta": _vote(tv, train_labels, p.numpy(), 5) + sum(_vote(tv, train_labels, s.numpy(), 5) for s in shifted),
        "knn5_shifted_index": _vote(tv_shifted, np.tile(train_labels, 9), p.numpy(), 5),
        "knn5_cosine": _vote(tv, train_labels, p.numpy(), 5, cosine=True),
    }
    out["head_plus_knn5"] = out["head"] + out["knn5"]
    every = pooled(x).numpy()
    out["knn5_all_labelled"] = _vote(every, y, p.numpy(), 5)
    eye = np.eye(10)
    out["svc_pooled"] = eye[SVC(C=1.0, gamma="scale").fit(tv, train_labels).predict(p.numpy())]
    sd = tv.std()
    out["logreg_pooled"] = LogisticRegression(C=1.0, max_iter=3000).fit(tv / sd, train_labels).predict_proba(p.numpy() / sd)
    assert np.allclose(out["knn5"], run.classifier.probabilities(p.numpy(), "knn", 5), atol=1e-5)  # our vote is the run's
    return out


def writer_folds(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, held-out) indices of the train split's images. The images come in writer order,
    so a contiguous block holds writers the rest does not. One fold: the last ``HELD_OUT``
    images, as ``digits.py --search`` scores; N folds: N contiguous blocks, each held out once."""
    idx = np.arange(n)
    if folds == 1:
        return [(idx[: n - HELD_OUT], idx[n - HELD_OUT:])]
    return [(np.setdiff1d(idx, block), block) for block in np.array_split(idx, folds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change EXTRACT or TRAIN, e.g. position=grid,offset")
    ap.add_argument("--folds", type=int, default=1, help="1: score the last 298 images; N > 1: each of N blocks of writers in turn (all 898)")
    ap.add_argument("--smoke", action="store_true", help="seconds: one seed, 2 epochs (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.seeds, a.set = "0", a.set + ["epochs=2", "patience=0"]
    if a.folds < 1:
        ap.error(f"--folds {a.folds}: use 1 or more")
    extract, train = dict(EXTRACT), dict(TRAIN)
    for item in a.set:
        key, _, value = item.partition("=")
        fields = TrainConfig.__dataclass_fields__
        if key in extract:
            extract[key] = type(extract[key])(value)
        elif key in fields:
            train[key] = type(fields[key].default)(value)
        else:
            ap.error(f"--set {item}: {key!r} is not a setting of EXTRACT or TRAIN")
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    d = load_digits()
    x = np.rint(d.images[:898] * 255 / 16).astype(np.uint8)[..., None]
    y = d.target[:898]
    raw = d.data[:898]  # for scikit-learn's baselines of digits.py, on the same held-out writers
    seeds = [int(s) for s in a.seeds.split(",")]
    scores = [dict() for _ in seeds]  # per seed: reader -> class scores of every held-out image, folds in order
    truth, svc, nn1 = [], [], []
    for train_idx, held_idx in writer_folds(len(y), a.folds):
        truth.append(y[held_idx])
        with tempfile.TemporaryDirectory() as tmp:
            for per_seed, seed in zip(scores, seeds):
                for name, p in readers(seed, x[train_idx], y[train_idx], x[held_idx], Path(tmp), extract, train).items():
                    per_seed.setdefault(name, []).append(p)
        svc.append(SVC(gamma=0.001).fit(raw[train_idx], y[train_idx]).predict(raw[held_idx]))
        nn1.append(KNeighborsClassifier(n_neighbors=1).fit(raw[train_idx], y[train_idx]).predict(raw[held_idx]))
    truth = np.concatenate(truth)
    scores = [{name: np.concatenate(ps) for name, ps in per_seed.items()} for per_seed in scores]

    def acc(p: np.ndarray) -> float:
        return round(float(((p.argmax(1) if p.ndim == 2 else p) == truth).mean()), 4)

    res = {"seeds": seeds, "folds": a.folds, "held_out_images": len(truth), "changes": a.set}
    for name in scores[0]:
        per_seed = [acc(s[name]) for s in scores]
        res[name] = {"per_seed": per_seed, "mean": round(float(np.mean(per_seed)), 4)}
    res["raw_pixels_svc"] = acc(np.concatenate(svc))
    res["raw_pixels_1nn"] = acc(np.concatenate(nn1))
    res["ensemble_head"] = acc(sum(s["head"] for s in scores))
    res["ensemble_knn5"] = acc(sum(s["knn5"] for s in scores))
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
