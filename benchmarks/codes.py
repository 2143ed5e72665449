"""The code view's settings on one CIFAR-10 subset: held-out accuracy, time, memory and size, one row each.

    python benchmarks/codes.py --out benchmarks/results/codes.json   # 500 images per class, every row
    python benchmarks/codes.py --per-class 300 --only grid --json
    python benchmarks/codes.py --smoke --json             # seconds: two tiny rows (what CI runs)

Each row is a full ``pipeline.extraction.stage`` + ``pipeline.train`` in a fresh child process
(so its peak RSS is its own) with today's defaults and one group of changes; the
accuracy is the best validation accuracy of the run, on the images the trainer holds
out (``pipeline.data.split.is_validation``), which the dictionary fit also leaves out.
Rows: exact views only / code view only / both, dictionary size, k nearest and the
weighting, whitening, the scaling of a patch (``--code-norm``), code shapes, grid cells, the head, and no augmentation (the
default mirrors colour images). ``--out FILE``
also writes the rows as JSON (benchmarks/results/codes.json is what docs/results.md shows).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, child_peak_rss_mb  # noqa: E402

# the defaults before the code view: exact views only, up to 3x3, no augmentation
EXACT_ONLY = {"code_shapes": "none", "views": "levels,grad", "max_h": 3, "max_w": 3, "grid": 4}
# (group, extract changes, train changes, augment); "auto" is pipe extract's default augmentation
ROWS: list[tuple[str, dict, dict, str]] = [
    ("default", {}, {}, "auto"),
    ("views", EXACT_ONLY, {}, "none"),
    ("views", {"views": "none"}, {}, "auto"),
    ("views", {"views": "levels,grad"}, {}, "auto"),
    ("atoms", {"atoms": 256}, {}, "auto"),
    ("atoms", {"atoms": 2048}, {}, "auto"),
    ("atoms", {"atoms": 4096}, {}, "auto"),
    ("k", {"code_k": 1}, {}, "auto"),
    ("k", {"code_k": 10}, {}, "auto"),
    ("k", {"code_weight": "hard"}, {}, "auto"),
    ("whiten", {"whiten": 0.0}, {}, "auto"),
    ("norm", {"code_norm": "none", "whiten": 0.01}, {}, "auto"),
    ("norm", {"code_norm": "none", "whiten": 0.001}, {}, "auto"),
    ("shapes", {"code_shapes": "4x4"}, {}, "auto"),
    ("shapes", {"code_shapes": "8x8"}, {}, "auto"),
    ("shapes", {"code_shapes": "4x4,6x6"}, {}, "auto"),
    ("shapes", {"code_shapes": "4x6,6x4"}, {}, "auto"),
    ("grid", {"grid": 2}, {}, "auto"),
    ("grid", {"grid": 3}, {}, "auto"),
    ("head", {}, {"lr": 0.3}, "auto"),
    ("augment", {}, {}, "none"),
]

CHILD = """
import json, shutil, time, pathlib, pipeline
from pipeline import ExtractConfig, TrainConfig
ex, tr, aug, src_path, per_class, limit, work = json.loads({args!r})
out = pathlib.Path(work)
src = pipeline.open_source(src_path, per_class=per_class, limit=limit)
t = time.time()
m = pipeline.extract(src, out / "shards", ExtractConfig(**ex), augment=aug, overwrite=True)
t_extract = time.time() - t
t = time.time()
r = pipeline.train(pipeline.open_shards(out / "shards"), out / "run", TrainConfig(**tr), overwrite=True)
t_train = time.time() - t
size = sum(f.stat().st_size for f in (out / "run").iterdir())
RESULT = dict(val_accuracy=r["final"]["val_accuracy"], train_accuracy=r["final"]["train_accuracy"], best_epoch=r["best_epoch"],
              extract_s=round(t_extract, 1), train_s=round(t_train, 1), rows=r["rows"], run_mb=round(size / 1e6, 1),
              keys_per_image=m["keys_per_image"], shards_mb=round(m["bytes"] / 1e6, 1), code_shapes=m["config"]["code_shapes"])
shutil.rmtree(out)
"""


def run_row(extract: dict, train: dict, augment: str, source: str, per_class: int | None, limit: int | None) -> dict:
    work = tempfile.mkdtemp(prefix="codes-bench-")
    try:
        return child_peak_rss_mb(CHILD.format(args=json.dumps([extract, train, augment, source, per_class, limit, work])))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(rows: list[dict]) -> str:
    """The rows as the markdown table docs/results.md shows."""
    out = ["| group | change from the defaults | held-out | train | extract s | train s | peak RSS MB | rows | run MB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = {**r["extract"], **r["train"], **({"augment": r["augment"]} if r["augment"] != "auto" else {})}
        what = ", ".join(f"{k}={v}" for k, v in change.items()) or "(defaults)"
        out.append(f"| {r['group']} | {what} | {r['val_accuracy']:.4f} | {r['train_accuracy']:.4f} | {r['extract_s']:.0f} | "
                   f"{r['train_s']:.0f} | {r['peak_rss_mb']:,.0f} | {r['rows']:,} | {r['run_mb']:,.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=500, help="images per class from the shared CIFAR-10 archive [500]")
    ap.add_argument("--epochs", type=int, default=None, help="train epochs [pipe train's default]")
    ap.add_argument("--only", default=None, help="only the rows of these groups, comma-separated (e.g. grid,k)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N rows (to continue a stopped run) [0]")
    ap.add_argument("--base", default="{}", help="extract changes applied under every row's own, as JSON (e.g. '{\"views\": \"none\"}') [none]")
    ap.add_argument("--smoke", action="store_true", help="two rows on 60 digits images: checks that the benchmark runs")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of a JSON file --out wrote, then stop")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(a.table.read_text())["rows"]))
        return
    rows = ROWS
    source, per_class, limit = str(CIFAR_TAR), a.per_class, None
    if a.smoke:
        rows = [ROWS[0], ROWS[1]]
        source, per_class, limit = "digits", None, 120
    elif not CIFAR_TAR.exists():
        sys.exit(f"benchmark data {CIFAR_TAR} is missing; it is the shared CIFAR-10 archive (see ../shared/data/README.md)")
    if a.only:
        rows = [r for r in rows if r[0] in a.only.split(",")]
    rows = rows[a.skip :]
    results = []
    base = json.loads(a.base)
    for group, ex, tr, aug in rows:
        ex = {**base, **ex}
        tr = dict(tr, **({"epochs": a.epochs} if a.epochs else {}), **({"epochs": 1} if a.smoke else {}))
        ex = dict(ex, **({"atoms": 16, "code_sample": 2000} if a.smoke else {}))
        if not a.smoke and "code_shapes" not in ex:
            ex["code_shapes"] = "6x6"  # the one code shape every CIFAR row was measured with (auto adds 6x6/2 now)
        res = dict(group=group, extract=ex, train=tr, augment=aug, **run_row(ex, tr, aug, source, per_class, limit))
        results.append(res)
        if a.json:
            print(json.dumps(res), flush=True)
        else:
            print(f"{group:8s} {json.dumps({**ex, **tr, **({'augment': aug} if aug != 'auto' else {})}):60s} "
                  f"val {res['val_accuracy']:.4f} train {res['train_accuracy']:.4f} extract {res['extract_s']:6.1f}s "
                  f"train {res['train_s']:6.1f}s rss {res['peak_rss_mb']:6.0f}MB rows {res['rows']:>9,} run {res['run_mb']:7.1f}MB", flush=True)
        if a.out:  # after every row, so a stopped run keeps what it measured
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"per_class": None if a.smoke else per_class, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
