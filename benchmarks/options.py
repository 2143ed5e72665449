"""Every training option on one CIFAR-10 subset: validation accuracy, training time and table size, one row each.

    python benchmarks/options.py                       # 600 images per class, 3 epochs, markdown table
    python benchmarks/options.py --per-class 300 --epochs 2 --only drop
    python benchmarks/options.py --smoke --json       # seconds: the first two rows on 200 digits images (what CI runs)

Each row changes one thing from ``MEASURED_EXTRACT`` (the extract defaults before the
"candidate" rows became the defaults: ``--views levels --position both``) and the
``pipe train`` defaults with ``MEASURED_TRAIN`` (``--lr 0.5``, the default until the
``--lr 1.0`` row won) and trains on the same images for the same number of epochs
(patience 0, so every row runs them all); the figure is the best validation
accuracy over those epochs, on the held-out images ``bags.is_validation`` picks.
Rows that change the extract settings get their own shards. The table printed
is what docs/results.md shows; ``--json`` prints one JSON object per row.
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

from benchmarks.common import CIFAR_TAR, MEASURED_EXTRACT, bench_train, measured_config  # noqa: E402

# (group, extract flags, train flags): one change per row from MEASURED_EXTRACT (the extract defaults
# before issue 4 made the "candidate" rows the defaults; fixed so the table stays reproducible) and
# the train defaults with MEASURED_TRAIN (--lr 0.5, the default before --lr 1.0)
ROWS: list[tuple[str, dict, dict]] = [
    ("default", {}, {}),
    ("bag", {}, {"bag": "sum"}),
    ("bag", {}, {"bag": "sqrt"}),
    ("dim", {}, {"dim": 32}),
    ("head", {}, {"hidden": 256}),
    ("drop", {}, {"drop": "0.3"}),
    ("drop", {}, {"drop": "0.6"}),
    ("drop", {}, {"drop": "auto"}),
    ("drop", {}, {"pooled_dropout": 0.5}),
    ("optimizer", {}, {"optimizer": "sparseadam", "lr": 0.01}),
    ("optimizer", {}, {"optimizer": "sgd", "lr": 20.0}),
    ("vocabulary", {}, {"min_count": 5}),
    ("position", {"position": "none"}, {}),
    ("position", {"position": "grid"}, {}),
    ("shapes", {"shapes": "square"}, {}),
    ("shapes", {"max_size": 4}, {}),
    ("levels", {"levels": 6}, {}),
    ("views", {"views": "levels,norm:3"}, {}),
    ("views", {"views": "levels,levels:2"}, {}),
    ("views", {"views": "levels,grad"}, {}),
    ("augment", {"augment": "flip"}, {}),
    # candidates for the defaults: the ordinal view at the default's keys per image (grid keys only)
    ("candidate", {"views": "levels,grad", "position": "grid"}, {}),
    ("candidate", {"views": "levels,grad", "position": "grid"}, {"min_count": 3}),
    ("candidate", {"views": "levels,grad", "position": "grid"}, {"optimizer": "rowwise-adagrad"}),
    ("candidate", {"views": "levels,grad", "position": "grid"}, {"lr": 1.0}),
    ("candidate", {"views": "levels,grad", "position": "grid"}, {"optimizer": "rowwise-adagrad", "lr": 1.0}),
    # position kinds on top of the defaults: a 2x2 pyramid level, the grid moved by half a cell
    ("pyramid", {"views": "levels,grad", "position": "grid,coarse"}, {}),
    ("pyramid", {"views": "levels,grad", "position": "grid,offset"}, {}),
    # the grid's fineness on today's defaults (--lr 1.0): digits gained from --grid 3 on held-out writers
    ("grid", {"views": "levels,grad", "position": "grid", "grid": 3}, {"lr": 1.0}),
    ("grid", {"views": "levels,grad", "position": "grid", "grid": 6}, {"lr": 1.0}),
    ("grid", {"views": "levels,grad", "position": "grid", "grid": 8}, {"lr": 1.0}),
]


def _flags(d: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())


def _extract_config(flags: dict):
    f = {k: v for k, v in flags.items() if k != "augment"}
    if "max_size" in f:
        n = f.pop("max_size")
        f["max_h"] = f["max_w"] = n
    return measured_config(**f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=600, help="images per class from the shared archive [600]")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per row [3]")
    ap.add_argument("--only", help="run only the rows of this group (default, bag, dim, head, drop, ...)")
    ap.add_argument("--smoke", action="store_true", help="seconds: the first two rows on 200 digits images, 1 epoch")
    ap.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    args = ap.parse_args()

    import pipeline

    rows = [r for r in ROWS if args.only in (None, r[0]) or r[0] == "default"]
    if args.smoke:
        rows, args.epochs = rows[:2], 1
    tmp = Path(tempfile.mkdtemp())
    shards: dict[str, Path] = {}
    results = []
    try:
        for group, ex, tr in rows:
            key = json.dumps(ex, sort_keys=True)
            if key not in shards:
                shards[key] = tmp / f"shards{len(shards)}"
                src = pipeline.open_source("digits", limit=200) if args.smoke else pipeline.open_source(str(CIFAR_TAR), per_class=args.per_class)
                pipeline.extract(src, shards[key], _extract_config(ex), workers=2, augment=ex.get("augment", "none"))
            t = time.time()
            cfg = bench_train(False, **{"epochs": args.epochs, "patience": 0, **tr})
            m = pipeline.train(pipeline.open_shards(shards[key]), tmp / "run", cfg, overwrite=True)
            wall = time.time() - t
            hist = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
            res = {
                "group": group,
                "change": " ".join(x for x in (_flags(ex), _flags(tr)) if x) or "(none)",
                "val_accuracy": max(h["val_accuracy"] for h in hist),
                "best_epoch": m["best_epoch"],
                "train_accuracy": hist[m["best_epoch"] - 1]["train_accuracy"],
                "train_seconds": round(sum(h["seconds"] for h in hist), 1),
                "wall_seconds": round(wall, 1),
                "ids_per_s": round(sum(h["ids_per_s"] * h["seconds"] for h in hist) / sum(h["seconds"] for h in hist)),
                "rows": m["rows"],
                "table_mb": round(m["rows"] * cfg.dim * 4 / 2**20, 1),
                "drop_rate": hist[-1].get("drop_rate"),
            }
            results.append(res)
            if args.json:
                print(json.dumps(res), flush=True)
            else:
                print(f"... {res['change']}: {res['val_accuracy']:.4f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        return
    print(f"CIFAR-10, {args.per_class} images per class, {args.epochs} epochs; one change per row from {_flags(MEASURED_EXTRACT)}\n")
    print("| change (`pipe extract` / `pipe train` flag) | validation accuracy | best epoch | train accuracy | train s | M ids/s | table rows | table MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        extra = f" (learned rate {r['drop_rate']:.3f})" if r["drop_rate"] is not None else ""
        print(
            f"| `{r['change']}`{extra} | {r['val_accuracy']:.4f} | {r['best_epoch']} | {r['train_accuracy']:.4f} | "
            f"{r['train_seconds']} | {r['ids_per_s'] / 1e6:.1f} | {r['rows']:,} | {r['table_mb']} |"
        )


if __name__ == "__main__":
    main()
