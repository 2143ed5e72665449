"""Nearest-pattern search and the unseen-patch rule, measured on a model trained on CIFAR-10.

    python benchmarks/query.py --json
    python benchmarks/query.py --per-class 200 --epochs 2 --kinds ivf      # a quick look

One run: extract the first ``--per-class`` images of each class of the shared archive
(``common.MEASURED_EXTRACT``, or today's defaults with ``--current-defaults``), train
with the default settings (``common.MEASURED_TRAIN``'s learning rate unless
``--current-defaults``; index ``auto``), then

* **search**: the queries are what ``pipe query`` searches for: the composed vectors of
  unseen patches of held-out images (``--queries`` of them, at random). Exact search
  (``IndexFlatL2``, both cores) over all pattern vectors gives the true 10 nearest; every
  index kind is built over the same vectors and swept over its query-time knob
  (``nprobe`` / ``efSearch``), giving recall@10 against exact and queries per second.
  The run's own index at its recorded setting is the headline (``index``, ``recall_at_10``,
  ``queries_per_s`` on the second pass over the queries; ``cold_queries_per_s`` is the first,
  while the memory-mapped index is paged in); ``curve`` holds every point (each after one
  warm-up pass) and ``--png`` draws it.
* **unseen patches**: accuracy of the held-out images with each rule (drop, compose;
  nearest on the first ``--nearest-images``, since it searches once per unseen patch)
  and with the nearest-training-images vote; ``oov_accuracy_delta`` is nearest minus drop
  on the same images (the question of issue 5), ``compose_accuracy_delta`` compose minus
  drop; ``paired`` counts the images only one side gets right.

An existing ``--work`` folder with ``shards/`` and ``run/`` is measured as it is, e.g. the
full CIFAR run: ``python benchmarks/query.py --work /tmp/full --kinds ivf --nearest-images 200``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_augment, bench_config, bench_train, cifar_source  # noqa: E402


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, truth)]))


def _timed_search(idx, q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    _, ids = idx.search(q, k)
    return len(q) / (time.perf_counter() - t), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=500, help="training images per class (500 gives about 1.7M patterns)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=None, help="held-out images (a random sample) scored with drop, compose and the vote [all]")
    ap.add_argument("--nearest-images", type=int, default=500, help="of those, how many are also scored with the nearest rule (one search per unseen patch: 600-1,300 per CIFAR image)")
    ap.add_argument("--kinds", default="ivf,ivfpq,hnsw", help="index kinds swept for the curve (hnsw builds slowly on 2 cores)")
    ap.add_argument("--work", type=Path, default=None, help="keep shards and run here [a temporary folder]")
    ap.add_argument("--png", type=Path, default=None, help="write the recall / throughput curve here")
    ap.add_argument("--current-defaults", action="store_true", help="extract with today's pipe extract defaults, not common.MEASURED_EXTRACT")
    ap.add_argument("--smoke", action="store_true", help="seconds: 300 digits images, 1 epoch, the ivf sweep only (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.epochs, a.queries, a.eval_images, a.nearest_images, a.kinds = 1, 100, 40, 20, "ivf"

    import faiss
    import torch

    import pipeline
    from pipeline.table import index as pidx
    from pipeline.query.classify import DEFAULT_UNSEEN, find_unseen

    work = a.work or Path(tempfile.mkdtemp(prefix="query-bench-"))
    try:
        shards_dir, run_dir = work / "shards", work / "run"
        if not (shards_dir / "manifest.json").exists():
            src = pipeline.open_source("digits", limit=300) if a.smoke else cifar_source(None, per_class=a.per_class)
            pipeline.extract(src, shards_dir, bench_config(a.current_defaults), overwrite=True, augment=bench_augment(a.current_defaults))
        sh = pipeline.open_shards(shards_dir)
        if not (run_dir / "run.json").exists():  # an existing run in --work is measured as it is
            # refit off: the held-out images measured below must stay out of training
            pipeline.train(sh, run_dir, bench_train(a.current_defaults, epochs=a.epochs, refit="off"), overwrite=True)
        run = pipeline.load(run_dir)
        vectors = np.ascontiguousarray(run.table.vectors[: run.vocab.size], np.float32)
        info = run.table.index_info

        # held-out images: their keys, labels, and the composed vectors of their unseen patches
        keys, labels = [], []
        for b in sh.iter_batches():
            m = pipeline.is_validation(b.image_ids, run.train_config.val_fraction) & (b.labels >= 0)
            keys.append(b.keys[m])
            labels.append(b.labels[m])
        keys, labels = np.concatenate(keys), np.concatenate(labels)
        # a random sample: shards hold images in source order, which for an image folder or tar is class by class
        pick = np.random.default_rng(0).permutation(len(keys))[: a.eval_images]
        keys, labels = keys[pick], labels[pick]
        u = find_unseen(run.plan, run.vocab.rows_of(keys[: a.nearest_images]), run.vocab.size)
        comp = u.vectors(run.table.vectors)[u.has]
        rng = np.random.default_rng(0)
        q = np.ascontiguousarray(comp[rng.choice(len(comp), min(a.queries, len(comp)), replace=False)])

        flat = faiss.IndexFlatL2(vectors.shape[1])
        flat.add(vectors)
        exact_qps, truth = _timed_search(flat, q, 10)
        del flat

        curve = [{"index": "Flat", "setting": None, "recall_at_10": 1.0, "queries_per_s": exact_qps, "build_s": 0.0}]
        sweeps = {"ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128]), "ivfpq": ("nprobe", [4, 16, 64]), "hnsw": ("ef_search", [16, 32, 64, 128, 256])}
        for kind in [k for k in a.kinds.split(",") if k]:
            knob, values = sweeps[kind]
            path = work / f"{kind}.faiss"
            built = pidx.build(vectors, path, kind)
            idx = pidx.load(path, built, gpu=False)
            idx.search(q, 10)  # page the memory-mapped index in, as for the run's index below
            for v in values:
                pidx.apply_params(idx, **{knob: v})
                qps, ids = _timed_search(idx, q, 10)
                curve.append({"index": built.factory, "setting": f"{knob}={v}", "recall_at_10": _recall(ids, truth), "queries_per_s": qps, "build_s": built.build_s})
            del idx

        # the run's own index at its recorded setting, loaded memory-mapped: the first pass pages
        # the lists in from disk (cold), the second is what a running service sees (warm)
        cold_qps, _ = _timed_search(run.table.index, q, 10)
        qps, ids = _timed_search(run.table.index, q, 10)
        chosen = {"recall_at_10": _recall(ids, truth), "queries_per_s": qps}

        def right(rule: str, classifier: str = "head", n: int | None = None) -> np.ndarray:
            """Which of the first n held-out images are classified right, scored 256 at a time."""
            kk = keys[:n]
            pred = np.concatenate([run.classifier.predict_keys(kk[i : i + 256], rule, classifier).argmax(1) for i in range(0, len(kk), 256)])
            return pred == labels[: len(kk)]

        base = right("drop")
        scored = {"compose": right("compose"), "knn_vote": right("drop", "knn"), "knn_vote_compose": right("compose", "knn")}
        m = min(a.nearest_images, len(keys))
        scored["nearest"] = right("nearest", n=m)
        acc = {"drop": float(base.mean()), **{k: float(v.mean()) for k, v in scored.items()}}
        # paired: images only one of the two gets right (what decides between two readers of the same images)
        paired = {k: {"images": int(len(v)), "drop_only": int((base[: len(v)] & ~v).sum()), "rule_only": int((~base[: len(v)] & v).sum()),
                      "drop_accuracy_same_images": float(base[: len(v)].mean())} for k, v in scored.items()}

        res = {
            "vectors": int(len(vectors)),
            "dim": int(vectors.shape[1]),
            "index": info.factory,
            "setting": {"nprobe": info.nprobe, "ef_search": info.ef_search},
            "index_build_s": info.build_s,
            "recall_at_10": chosen["recall_at_10"],
            "queries_per_s": chosen["queries_per_s"],
            "cold_queries_per_s": cold_qps,
            "exact_queries_per_s": exact_qps,
            "speedup": chosen["queries_per_s"] / exact_qps,
            "queries": int(len(q)),
            "eval_images": int(len(keys)),
            "nearest_images": int(m),
            "unseen_patches_per_image": float(len(u.slot) / min(len(keys), a.nearest_images)),
            "unseen_with_seen_parts": float(u.has.mean()) if len(u.slot) else 0.0,
            "accuracy": acc,
            "paired": paired,
            "oov_accuracy_delta": acc["nearest"] - paired["nearest"]["drop_accuracy_same_images"],
            "compose_accuracy_delta": acc["compose"] - acc["drop"],
            "default_rule": DEFAULT_UNSEEN,
            "threads": faiss.omp_get_max_threads(),
            "torch_threads": torch.get_num_threads(),
            "curve": curve,
        }
        if a.png:
            _plot(curve, exact_qps, a.png)
        if a.json:
            print(json.dumps(res))
        else:
            for c in curve:
                print(f"{c['index']:<16} {str(c['setting']):<14} recall@10 {c['recall_at_10']:.4f}  {c['queries_per_s']:>10,.0f} q/s  ({c['queries_per_s'] / exact_qps:6.1f}x exact)")
            print({k: v for k, v in res.items() if k != "curve"})
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _plot(curve: list[dict], exact_qps: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in dict.fromkeys(c["index"] for c in curve):
        pts = [c for c in curve if c["index"] == name]
        ax.plot([p["queries_per_s"] / exact_qps for p in pts], [p["recall_at_10"] for p in pts], "o-", label=name)
        for p in pts:
            if p["setting"]:
                ax.annotate(p["setting"].split("=")[1], (p["queries_per_s"] / exact_qps, p["recall_at_10"]), fontsize=6)
    ax.axhline(0.95, color="gray", ls=":", lw=1)
    ax.axvline(20, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="queries/s relative to exact search", ylabel="recall@10", title="nearest-pattern search (CIFAR patterns)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
