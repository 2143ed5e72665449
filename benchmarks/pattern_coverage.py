"""How many held-out patches a trained run has a learned vector for, per patch shape and position mode.

    python benchmarks/pattern_coverage.py artifacts/cifar/run artifacts/cifar/shards
    python benchmarks/pattern_coverage.py --smoke --json     # seconds: a tiny digits run made first (what CI runs)

For each shape (h x w) and position mode: the share of the validation images'
patch occurrences whose key has its own vocabulary row (seen at least
``--min-count`` times in training), next to the same share for the training
images. Exact-match patterns can only help where this share is high; the gap
between the two columns is how much of what the model learned about a shape
fails to transfer to new images (docs/results.md, "where the gap comes from").
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import smoke_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("shards", nargs="?")
    ap.add_argument("--images", type=int, default=2000, help="images of each part to count [2000]")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny digits run made first (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if (args.run is None or args.shards is None) != args.smoke:
        ap.error("give RUN and SHARDS, or --smoke")
    with tempfile.TemporaryDirectory() as work:
        if args.smoke:
            args.shards, args.run = smoke_run(Path(work))
        res = coverage(args.run, args.shards, args.images)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.run}: share of patch occurrences with a learned vector ({res['train_images']} training, {res['validation_images']} validation images)\n")
    print("| view, shape, position | training | validation |")
    print("| --- | --- | --- |")
    for g, r in res["groups"].items():
        print(f"| {g} | {r['train']:.3f} | {r['validation']:.3f} |")
    print(f"| all | {res['train']:.3f} | {res['validation']:.3f} |")


def coverage(run_dir, shards_dir, images: int) -> dict:
    import pipeline

    run = pipeline.load(run_dir)
    shards = pipeline.open_shards(shards_dir)
    loc = run.plan.locate(np.arange(run.plan.keys_per_image))
    group = [f"{run.view_name(int(v))} {h}x{w} {'grid' if c >= 0 else 'none'}" for v, h, w, c in zip(loc["view"], loc["h"], loc["w"], loc["cell"])]
    names = sorted(set(group))
    gid = np.array([names.index(g) for g in group])
    frac = run.train_config.val_fraction
    share = {}
    for part, val in (("train", False), ("validation", True)):
        hit = np.zeros(len(names))
        tot = np.zeros(len(names))
        n = 0
        for b in shards.iter_batches():
            keys = b.keys[(pipeline.is_validation(b.image_ids, frac) == val) & (b.labels >= 0)][: images - n]
            rows = run.vocab.rows_of(keys)
            own = (rows >= 0) & (rows < run.vocab.size)
            np.add.at(hit, np.broadcast_to(gid, own.shape)[own], 1)
            np.add.at(tot, np.broadcast_to(gid, own.shape).ravel(), 1)
            n += len(keys)
            if n >= images:
                break
        share[part] = (hit / np.maximum(tot, 1), float(hit.sum() / max(tot.sum(), 1)), n)
    return {
        "train_images": share["train"][2], "validation_images": share["validation"][2],
        "train": share["train"][1], "validation": share["validation"][1],
        "groups": {g: {"train": float(share["train"][0][i]), "validation": float(share["validation"][0][i])} for i, g in enumerate(names)},
    }


if __name__ == "__main__":
    main()
