"""How many held-out patches a trained run has a learned vector for, per patch shape and position mode.

    python benchmarks/pattern_coverage.py artifacts/cifar/run artifacts/cifar/shards

For each shape (h x w) and position mode: the share of the validation images'
patch occurrences whose key has its own vocabulary row (seen at least
``--min-count`` times in training), next to the same share for the training
images. Exact-match patterns can only help where this share is high; the gap
between the two columns is how much of what the model learned about a shape
fails to transfer to new images (docs/results.md, "where the gap comes from").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("shards")
    ap.add_argument("--images", type=int, default=2000, help="images of each part to count [2000]")
    args = ap.parse_args()

    import pipeline
    from pipeline.training.bags import part_batches

    run = pipeline.load(args.run)
    shards = pipeline.open_shards(args.shards)
    loc = run.plan.locate(np.arange(run.plan.keys_per_image))
    group = [f"{h}x{w} {'grid' if c >= 0 else 'none'}" for h, w, c in zip(loc["h"], loc["w"], loc["cell"])]
    names = sorted(set(group), key=lambda g: (int(g.split("x")[0]), int(g.split("x")[1].split()[0]), g))
    gid = np.array([names.index(g) for g in group])
    frac = run.train_config.val_fraction
    share = {}
    for part, val in (("train", False), ("validation", True)):
        hit = np.zeros(len(names))
        tot = np.zeros(len(names))
        n = 0
        for keys, _, _, _ in part_batches(shards, val, frac):
            keys = keys[: args.images - n]
            rows = run.vocab.rows_of(keys)
            own = (rows >= 0) & (rows < run.vocab.size)
            np.add.at(hit, np.broadcast_to(gid, own.shape)[own], 1)
            np.add.at(tot, np.broadcast_to(gid, own.shape).ravel(), 1)
            n += len(keys)
            if n >= args.images:
                break
        share[part] = (hit / tot, hit.sum() / tot.sum(), n)
    print(f"{args.run}: share of patch occurrences with a learned vector ({share['train'][2]} training, {share['validation'][2]} validation images)\n")
    print("| shape, position | training | validation |")
    print("| --- | --- | --- |")
    for i, g in enumerate(names):
        print(f"| {g} | {share['train'][0][i]:.3f} | {share['validation'][0][i]:.3f} |")
    print(f"| all | {share['train'][1]:.3f} | {share['validation'][1]:.3f} |")


if __name__ == "__main__":
    main()
