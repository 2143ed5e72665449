"""The code view's factors on all the shared CIFAR-10 training images: one full run per row, a base with one change.

    python benchmarks/factors.py --out benchmarks/results/factors.json           # every row below
    python benchmarks/factors.py --only norm,atoms --out ...                      # some rows
    python benchmarks/factors.py --smoke --json                                   # seconds: digits, two rows (what CI runs)

Each row is ``pipe extract`` + ``pipe train`` as their own processes (``benchmarks/defaults.py``'s
``stage``: wall time and peak RSS of each), on all 50,000 images of the shared archive; a row that
changes only training reuses the default row's shards. The accuracy is the best epoch's on the
images the trainer holds out (never the official test split), with the training accuracy at that
epoch, the shard and run sizes. ``--out`` keeps finished rows: run again to add the missing ones.

The base is the defaults with 1,024 atoms (:data:`BASE`, given to every extract before the row's own
flags, which win) trained with ``--lr 1 --drop 0`` (:data:`TRAIN_BASE`, likewise). On 32x32 RGB images
the defaults are the ``4096 regularised`` row: ``--atoms auto`` resolves to 4,096 and ``pipe train``'s
automatic ``lr`` and ``drop`` to 0.3 and 0.3 (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR  # noqa: E402
from benchmarks.defaults import size_mb, stage  # noqa: E402

# every row's extract flags start with these: the code view keyed like the exact views and one full-resolution
# code shape, as every row was measured
BASE = ["--atoms", "1024", "--code-position", "same", "--code-shapes", "6x6"]
TRAIN_BASE = ["--lr", "1", "--drop", "0"]  # every row's train flags start with these
# (name, pipe extract flags, pipe train flags); an empty extract list reuses the base row's shards
ROWS: list[tuple[str, list[str], list[str]]] = [
    ("base", [], []),
    ("norm", ["--code-norm", "none", "--whiten", "0.01"], []),
    ("atoms", ["--atoms", "2048"], []),
    ("k", ["--code-k", "10"], []),
    ("head", [], ["--dim", "128"]),
    ("schedule", [], ["--epochs", "10", "--patience", "3", "--lr", "0.5"]),
    ("combined", ["--atoms", "2048", "--code-k", "10"], ["--epochs", "10", "--patience", "3", "--lr", "0.5"]),  # the rows that helped
    ("within budget", ["--atoms", "2048"], ["--epochs", "10", "--patience", "3", "--lr", "0.5"]),  # combined without k 10 (its shards pass 5 GB)
    ("hard", ["--code-weight", "hard"], []),
    ("whiten", ["--whiten", "0.01"], []),
    ("overlap", ["--position", "grid,offset"], []),  # a second key per patch: the cell of the grid moved by half a cell
    ("regularised", [], ["--lr", "0.3", "--drop", "0.3"]),
    ("atoms 4096", ["--atoms", "4096"], []),
    ("overlap 2048", ["--atoms", "2048", "--position", "grid,offset"], []),  # the two that helped most
    ("signs", ["--code-signs", "both"], []),  # the atoms nearest each patch's negative too (Thiry et al.'s second map)
    ("4096 regularised", ["--atoms", "4096"], ["--lr", "0.3", "--drop", "0.3"]),  # the best atoms row with the training that helped, within budget
    ("4096 whitened", ["--atoms", "4096", "--code-norm", "none", "--whiten", "0.001"], ["--lr", "0.3", "--drop", "0.3"]),  # Thiry et al.'s scaling and regulariser
    ("4096 k 10", ["--atoms", "4096", "--code-k", "10"], ["--lr", "0.3", "--drop", "0.3"]),
    ("4096 code overlap", ["--atoms", "4096", "--code-position", "grid,offset"], ["--lr", "0.3", "--drop", "0.3"]),  # overlapping cells on the code view alone
    ("4096 two shapes", ["--atoms", "4096", "--code-shapes", "4x4,6x6"], ["--lr", "0.3", "--drop", "0.3"]),  # a second, finer code scale
    ("8192 atoms", ["--atoms", "8192"], ["--lr", "0.3", "--drop", "0.3"]),  # a mirror-closed dictionary codes the flipped copies for free: twice the atoms at the same cost
    ("4096 mirrored", ["--atoms", "4096"], ["--lr", "0.3", "--drop", "0.3"]),  # 4096 regularised again, now with the mirror-closed dictionary: what the mirror alone changes
    ("8192 shared keys", ["--atoms", "8192", "--code-position", "both"], ["--lr", "0.3", "--drop", "0.3"]),  # the mirrored 8192 atoms with the defaults' location-free code keys
    ("4096 half scale", ["--atoms", "4096", "--code-shapes", "6x6,6x6/2"], ["--lr", "0.3", "--drop", "0.3"]),  # 4096 mirrored with a second code shape on the image averaged over 2x2 blocks
]
SMOKE_ROWS = [("base", [], ["--epochs", "1"]), ("atoms", ["--atoms", "64"], ["--epochs", "1"])]


def row(name: str, extract: list[str], train: list[str], source: str, work: Path, smoke: bool) -> dict:
    shards = work / ("shards" if not extract else f"shards-{name}")
    out: dict = {"row": name, "extract_flags": extract, "train_flags": train}
    if extract or not (shards / "manifest.json").exists():
        limit = ["--limit", "200"] if smoke else []
        out["extract"] = stage(["extract", source, "--out", str(shards), "--overwrite", *limit, *BASE, *extract])
    run = work / f"run-{name}"
    out["train"] = stage(["train", str(shards), "--out", str(run), "--overwrite", *TRAIN_BASE, *train])
    m = json.loads((run / "run.json").read_text())
    out.update(val_accuracy=m["final"]["val_accuracy"], train_accuracy=m["final"]["train_accuracy"], best_epoch=m["best_epoch"],
               epochs_run=m["epochs_run"], rows=m["rows"], run_mb=size_mb(run), shards_mb=size_mb(shards))
    shutil.rmtree(run)
    if extract:
        shutil.rmtree(shards)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(CIFAR_TAR))
    ap.add_argument("--only", default=None, help="only these rows, comma-separated (the base row is run first when another needs its shards)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 200 digits images, two rows of one epoch")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="write the rows here, keeping rows it already holds")
    a = ap.parse_args()
    rows = SMOKE_ROWS if a.smoke else ROWS
    source = "digits" if a.smoke else a.source
    if a.only:
        rows = [r for r in rows if r[0] in a.only.split(",")]
    done = {r["row"]: r for r in json.loads(a.out.read_text())["rows"]} if a.out and a.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="factors-") as work:
        for name, extract, train in rows:
            if name in done:
                continue
            done[name] = row(name, extract, train, source, Path(work), a.smoke)
            if a.out:
                a.out.write_text(json.dumps({"source": Path(source).name, "rows": list(done.values())}, indent=1) + "\n")
            if not a.json:
                r = done[name]
                print(f"{name:10s} held-out {r['val_accuracy']:.4f} train {r['train_accuracy']:.4f} "
                      f"extract {r.get('extract', {}).get('seconds', 0):.0f} s train {r['train']['seconds']:.0f} s", flush=True)
    if a.json:
        print(json.dumps({"source": Path(source).name, "rows": list(done.values())}))


if __name__ == "__main__":
    main()
