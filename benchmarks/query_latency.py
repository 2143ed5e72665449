"""What one answer costs: a single-image ``pipe query`` (a fresh process: start, load, answer), a
loop of them, and ``pipe query --batch`` over a folder of the same kind of images.

    python benchmarks/query_latency.py --run /work/runs/cifar_run --json --out benchmarks/results/query_latency.json
    python benchmarks/query_latency.py --smoke --json     # seconds: a tiny digits run (what CI runs)

The images are the first ``--batch-images`` of ``--source`` (default: the shared CIFAR-10 archive),
written as PNG files into an image folder (``label/name.png``). Side by side from one run:

* **single**: ``pipe query RUN IMAGE --json`` for each of the first ``--singles`` images, one
  process each: wall seconds (median, max) and peak resident memory (``os.wait4`` of the child);
  the loop's images/s is their count over the summed walls;
* **batch**: ``pipe query RUN --batch FOLDER`` over all of them, one process: wall seconds
  (loading included) and images/s; ``ratio`` = batch images/s over the loop's;
* **evaluate**: ``pipe evaluate RUN FOLDER`` over the same folder, one process: images/s, and
  ``batch_share_of_evaluate`` = the batch's images/s over it (the batch also looks up each
  image's decisive patterns and nearest training images, and writes them);
* **in process**: ``pipeline.load`` once, then the same answer per image as a library call
  (``warm_ms`` median, after one warm-up); and ``run.nearest_patterns`` of every patch of an
  image (``all_patches_ms``: the first image's, then the median of the last half, when the run
  remembers the nearest patterns of the learned patterns it met before).

Only ``pipe`` commands and ``pipeline``'s public API are used.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, ROOT, smoke_run  # noqa: E402


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of ``pipe ARGS`` in a fresh process."""
    t = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipe {' '.join(args)} failed")
    return wall, usage.ru_maxrss / 1024, out


def write_images(source: str, n: int, folder: Path, resize: tuple[int, int] | None) -> list[Path]:
    """The first ``n`` images of ``source`` as PNG files FOLDER/label/i.png (an image folder source)."""
    import pipeline
    from PIL import Image

    src = pipeline.open_source(source, limit=n)
    paths = []
    for b in src.batches(256, None, resize):
        for img, lab, i in zip(b.images, b.labels, b.ids):
            d = folder / src.class_names[lab]
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{i:06d}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
            paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="the trained run to ask (the full-CIFAR default run for the docs)")
    ap.add_argument("--source", default=str(CIFAR_TAR), help="where the query images come from [the shared CIFAR-10 archive]")
    ap.add_argument("--singles", type=int, default=10, help="single-image pipe query processes")
    ap.add_argument("--batch-images", type=int, default=1000, help="images in the --batch folder")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny digits run, 2 singles, 50 batch images")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.smoke:
            _, run = smoke_run(tmp / "work")
            a.source, a.singles, a.batch_images = "digits", 2, 50
        elif a.run is None:
            sys.exit("give --run RUN (a trained run directory), or --smoke")
        else:
            run = a.run
        import pipeline
        from pipeline.query.report import query_one

        r = pipeline.load(run)
        paths = write_images(a.source, a.batch_images, tmp / "images", (r.height, r.width))
        singles = []
        for p in paths[: a.singles]:
            wall, rss, out = timed(["query", str(run), str(p), "--json"])
            json.loads(out.strip().splitlines()[-1])
            singles.append((wall, rss))
        walls = np.array([s[0] for s in singles])
        bwall, brss, _ = timed(["query", str(run), "--batch", str(tmp / "images"), "--out", str(tmp / "results.parquet")])
        ewall, erss, _ = timed(["evaluate", str(run), str(tmp / "images")])
        read = [r.read_image(p) for p in paths[: max(a.singles, 20)]]
        fresh = pipeline.load(run)
        every = []
        for img in read:
            t = time.perf_counter()
            fresh.nearest_patterns(img, k=5)
            every.append(time.perf_counter() - t)
        query_one(r, read[0], "warm-up")
        warm = []
        for img in read:
            t = time.perf_counter()
            query_one(r, img, "x")
            warm.append(time.perf_counter() - t)
        loop_ips = len(walls) / walls.sum()
        batch_ips = len(paths) / bwall
        res = {
            "run": str(run), "run_mb": round(sum(f.stat().st_size for f in Path(run).iterdir() if f.is_file()) / 1e6, 1),
            "patterns": r.vocab.size, "image": f"{r.height}x{r.width}x{r.extract_config.channels}",
            "single": {"images": len(walls), "median_s": round(float(np.median(walls)), 3), "max_s": round(float(walls.max()), 3),
                       "peak_rss_mb": round(max(s[1] for s in singles)), "images_per_s": round(loop_ips, 3)},
            "batch": {"images": len(paths), "wall_s": round(bwall, 2), "peak_rss_mb": round(brss), "images_per_s": round(batch_ips, 2)},
            "ratio": round(batch_ips / loop_ips, 1),
            "evaluate": {"images": len(paths), "wall_s": round(ewall, 2), "peak_rss_mb": round(erss), "images_per_s": round(len(paths) / ewall, 2)},
            "batch_share_of_evaluate": round(bwall and ewall / bwall, 3),
            "in_process": {"images": len(warm), "warm_ms": round(1000 * float(np.median(warm)), 1),
                           "all_patches_first_ms": round(1000 * every[0], 1),
                           "all_patches_ms": round(1000 * float(np.median(every[len(every) // 2:])), 1)},
        }
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.json:
        print(json.dumps(res))
        return
    s, b = res["single"], res["batch"]
    print(f"single pipe query: median {s['median_s']} s (max {s['max_s']} s), peak {s['peak_rss_mb']} MB; loop {s['images_per_s']} images/s")
    print(f"pipe query --batch: {b['images']} images in {b['wall_s']} s = {b['images_per_s']} images/s ({res['ratio']}x the loop)")
    e, w = res["evaluate"], res["in_process"]
    print(f"pipe evaluate: {e['images_per_s']} images/s; the batch answers {res['batch_share_of_evaluate']:.0%} of that")
    print(f"in process: {w['warm_ms']} ms per image (warm); every patch's nearest patterns {w['all_patches_first_ms']} ms first, "
          f"{w['all_patches_ms']} ms later")


if __name__ == "__main__":
    main()
