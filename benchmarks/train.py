"""Training throughput and accuracy: our trainer against the plain EmbeddingBag loop, on the same CIFAR-10 shards.

    python benchmarks/train.py --json
    python benchmarks/train.py --per-class 200 --epochs 1
    python benchmarks/train.py --smoke --json      # seconds: 200 digits images (what CI runs)

Both sides train on the same shards (the first ``--per-class`` images of each
class of the shared archive, extract settings ``common.MEASURED_EXTRACT``: the
defaults when the first recorded figures were taken, and ``MEASURED_TRAIN``'s
learning rate; ``--current-defaults`` uses today's defaults) for the same number of
epochs, and are validated on the same held-out images (bags.is_validation).
Each side runs in its own process, so each peak memory is its own.

* baseline: the plain loop. ``EmbeddingBag(mode="mean", sparse=True)`` over each
  image's raw key list (hashing trick, 4M rows, dimension 64), SparseAdam for the
  table and Adam for the head, batch 128.
* ours: ``pipeline.train`` with the default TrainConfig (``--optimizer`` changes its
  table optimizer): a vocabulary of frequent keys, images as bags of distinct rows
  with counts, a reader thread.

``ids_per_s`` counts raw keys of training images per second of the inner
training loop (what the images hold, before any deduplication), the same unit for
both sides: ``ratio`` compares those. ``wall_ratio`` compares the whole of each
side's process instead (the baseline's wall time over ours): reading the shards,
our vocabulary pass, validation and, on our side, the look-up artifacts included.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, bench_augment, bench_config, bench_train, child_peak_rss_mb  # noqa: E402

BASELINE_ROWS = 1 << 22

_BASELINE = """
import sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
import pipeline
start = time.time()
sh = pipeline.open_shards({shards!r})

def part_batches(val):
    for b in sh.iter_batches():
        m = (pipeline.is_validation(b.image_ids, 0.1) == val) & (b.labels >= 0)
        yield b.keys[m], b.labels[m]

torch.manual_seed(0)
rng = np.random.default_rng(0)
rows = {rows}
table = torch.nn.EmbeddingBag(rows, 64, mode="mean", sparse=True)
torch.nn.init.normal_(table.weight, std=0.1)
head = torch.nn.Linear(64, len(sh.class_names))
o1 = torch.optim.SparseAdam(list(table.parameters()), lr=0.05)
o2 = torch.optim.Adam(head.parameters(), lr=0.01)
raw = 0; seconds = 0.0
for epoch in range({epochs}):
    keys = []; labels = []
    for k, y in part_batches(False):
        keys.append(k); labels.append(y)
    keys = np.concatenate(keys); labels = np.concatenate(labels)
    perm = rng.permutation(len(keys))
    t = time.time()
    for s in range(0, len(perm), 128):
        idx = perm[s:s + 128]
        x = torch.from_numpy((keys[idx] % np.uint64(rows)).astype(np.int64))
        loss = torch.nn.functional.cross_entropy(head(table(x)), torch.from_numpy(labels[idx]))
        o1.zero_grad(); o2.zero_grad(); loss.backward(); o1.step(); o2.step()
        raw += x.numel()
    seconds += time.time() - t
correct = n = 0
with torch.no_grad():
    for k, y in part_batches(True):
        x = torch.from_numpy((k % np.uint64(rows)).astype(np.int64))
        correct += (head(table(x)).argmax(1).numpy() == y).sum(); n += len(y)
RESULT = dict(ids_per_s=raw / seconds, train_seconds=seconds, wall_seconds=time.time() - start, val_accuracy=correct / n, val_images=n)
"""

_OURS = """
import sys, json, time
sys.path.insert(0, {root!r})
import pipeline
from pipeline import TrainConfig
t = time.time()
m = pipeline.train(pipeline.open_shards({shards!r}), {out!r}, TrainConfig(epochs={epochs}, patience=0, optimizer={optimizer!r}, lr={lr!r}))
wall = time.time() - t
rows = [json.loads(l) for l in open({out!r} + "/metrics.jsonl")]
seconds = sum(r["seconds"] for r in rows)
raw = sum(r["ids_per_s"] * r["seconds"] for r in rows)
RESULT = dict(ids_per_s=raw / seconds, train_seconds=seconds, wall_seconds=wall, val_accuracy=rows[-1]["val_accuracy"],
              val_images=rows[-1]["val_images"], vocabulary=m["vocabulary"], rows_per_image=rows[-1]["rows_per_image"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=500, help="images per class from the shared archive [500]")
    ap.add_argument("--epochs", type=int, default=2, help="epochs for both sides [2]")
    ap.add_argument("--current-defaults", action="store_true", help="extract with today's pipe extract defaults, not common.MEASURED_EXTRACT")
    ap.add_argument("--optimizer", default="adagrad", help="our side's table optimizer [adagrad]")
    ap.add_argument("--smoke", action="store_true", help="seconds: 200 digits images, 1 epoch (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.smoke:
        args.epochs = 1

    import pipeline

    root = str(Path(__file__).resolve().parents[1])
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.time()
        src = pipeline.open_source("digits", limit=200) if args.smoke else pipeline.open_source(str(CIFAR_TAR), per_class=args.per_class)
        m = pipeline.extract(src, tmp / "shards", bench_config(args.current_defaults), workers=2, augment=bench_augment(args.current_defaults))
        extract_seconds = time.time() - t
        shards = str(tmp / "shards")
        base = child_peak_rss_mb(_BASELINE.format(root=root, shards=shards, rows=1 << 14 if args.smoke else BASELINE_ROWS, epochs=args.epochs))
        ours = child_peak_rss_mb(_OURS.format(root=root, shards=shards, out=str(tmp / "run"), epochs=args.epochs, optimizer=args.optimizer,
                                                lr=bench_train(args.current_defaults).lr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "images": m["images"],
        "keys_per_image": m["keys_per_image"],
        "epochs": args.epochs,
        "extract": m["config"],
        "optimizer": args.optimizer,
        "ids_per_s": ours["ids_per_s"],
        "baseline_ids_per_s": base["ids_per_s"],
        "ratio": ours["ids_per_s"] / base["ids_per_s"],
        "wall_seconds": ours["wall_seconds"],
        "baseline_wall_seconds": base["wall_seconds"],
        "wall_ratio": base["wall_seconds"] / ours["wall_seconds"],
        "val_accuracy": ours["val_accuracy"],
        "baseline_val_accuracy": base["val_accuracy"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "baseline_peak_rss_mb": base["peak_rss_mb"],
        "ours": ours,
        "baseline": base,
        "extract_seconds": round(extract_seconds, 1),
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['images']} CIFAR images ({args.per_class} per class), {args.epochs} epoch(s), validation on {ours['val_images']} held-out images")
    print(f"  ours     {res['ids_per_s'] / 1e6:6.2f} M ids/s  val {res['val_accuracy']:.4f}  peak {res['peak_rss_mb']:.0f} MB")
    print(f"  baseline {res['baseline_ids_per_s'] / 1e6:6.2f} M ids/s  val {res['baseline_val_accuracy']:.4f}  peak {res['baseline_peak_rss_mb']:.0f} MB")
    print(f"  ratio {res['ratio']:.2f} (inner loop, ids/s); wall clock of the whole process: ours {res['wall_seconds']:.1f} s, "
          f"baseline {res['baseline_wall_seconds']:.1f} s, ratio {res['wall_ratio']:.2f}")


if __name__ == "__main__":
    main()
