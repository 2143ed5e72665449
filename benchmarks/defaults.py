"""The defaults as a user meets them: ``pipe extract SOURCE`` then ``pipe train``, no flags.

    python benchmarks/defaults.py --out benchmarks/results/cifar_defaults.json   # all 50,000 shared CIFAR-10 images
    python benchmarks/defaults.py --keep /work/runs/cifar --out ...   # and keep the shards and the run
    python benchmarks/defaults.py --source digits --json
    python benchmarks/defaults.py --smoke --json      # seconds: 200 digits images (what CI runs)

Each stage runs as its own ``pipe`` process; the figures are its wall time and peak
resident memory (``getrusage`` of the reaped child), the sizes on disk of the shards and
of the run directory, and what ``run.json`` records: the held-out accuracy of the best
epoch (the images ``pipeline.is_validation`` holds out, never the test split), its
training accuracy, the table's rows and the epochs run.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, ROOT  # noqa: E402


def stage(args: list[str]) -> dict:
    """Run ``pipe ARGS`` (as ``python -m cli.main``): its wall seconds, peak RSS in MB (``os.wait4`` reaps
    the child, so ``ru_maxrss`` is its own) and last output line."""
    t = time.time()
    child = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipe {' '.join(args)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"seconds": round(time.time() - t, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "summary": out.strip().splitlines()[-1]}


def size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(CIFAR_TAR), help="what pipe extract reads [the shared CIFAR-10 archive]")
    ap.add_argument("--smoke", action="store_true", help="seconds: 200 digits images (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    ap.add_argument("--keep", type=Path, default=None, help="write shards/ and run/ into this folder and keep them (for query_latency.py and serve.py)")
    a = ap.parse_args()
    source, extra = ("digits", ["--limit", "200"]) if a.smoke else (a.source, [])
    with tempfile.TemporaryDirectory(prefix="defaults-") as work:
        base = a.keep or Path(work)
        shards, run = base / "shards", base / "run"
        ex = stage(["extract", source, "--out", str(shards), *extra, *(["--overwrite"] if a.keep and shards.exists() else [])])
        tr = stage(["train", str(shards), "--out", str(run), *(["--overwrite"] if a.keep and run.exists() else [])])
        manifest = json.loads((shards / "manifest.json").read_text())
        m = json.loads((run / "run.json").read_text())
        res = {
            "source": source if a.smoke else Path(source).name,
            "images": manifest["images"],
            "extract": {**manifest["config"], "augment": manifest["augment"]},
            "train": {k: m["train_config"].get(k) for k in ("lr", "drop", "dim", "batch_size", "epochs", "vote")},
            "val_accuracy": m["final"]["val_accuracy"],
            "train_accuracy": m["final"]["train_accuracy"],
            "val_images": m["final"]["val_images"],
            "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"],
            "rows": m["rows"],
            "extract_s": ex["seconds"],
            "train_s": tr["seconds"],
            "total_minutes": round((ex["seconds"] + tr["seconds"]) / 60, 1),
            "extract_peak_rss_mb": ex["peak_rss_mb"],
            "train_peak_rss_mb": tr["peak_rss_mb"],
            "shards_mb": size_mb(shards),
            "run_mb": size_mb(run),
            "cpus": os.cpu_count(),
        }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['images']} images of {res['source']}: held-out accuracy {res['val_accuracy']:.4f} (train {res['train_accuracy']:.4f}, "
              f"best epoch {res['best_epoch']} of {res['epochs_run']}); extract {res['extract_s']} s + train {res['train_s']} s; "
              f"peak RSS {res['extract_peak_rss_mb']} / {res['train_peak_rss_mb']} MB; shards {res['shards_mb']} MB, run {res['run_mb']} MB")


if __name__ == "__main__":
    main()
