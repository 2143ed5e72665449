"""Does the familiarity signal tell the images a run learned about from images of another kind?

    python benchmarks/familiarity.py --run RUN --out benchmarks/results/familiarity.json

RUN is a run trained on the shared CIFAR-10 archive (the defaults: ``pipe extract
../shared/data/cifar10-train-jpg.tar.gz --out S && pipe train S --out RUN``). Scored with
``Run.familiarity`` (the public API), through the run's own reference:

* **in distribution**: images the run's training held out (``is_validation`` of their ids, as
  training chose them), leaving out the first ``familiarity.REFERENCE_IMAGES`` of them in
  source order, which are the run's reference;
* **another kind**, ``--other`` images of each: flat colours (one random colour per image),
  uniform noise, and scikit-learn's 8x8 digits scaled (bilinear) to the run's size and
  channels.

It reports the AUROC of the familiarity (in distribution against each kind, and against all
three together; 1 = every held-out image scores above every other one) and the share of each
set under ``familiarity.UNFAMILIAR`` (the threshold below which an answer says so).
``--smoke``: a small digits run, its test split against flat colours and noise.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, run_arguments, the_run  # noqa: E402


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an inside score > an outside score), ties counting half (the Mann-Whitney statistic)."""
    s = np.concatenate([inside, outside])
    order = s.argsort(kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    uniq, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2
    ranks[order] = np.repeat(avg, counts)
    n, m = len(inside), len(outside)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def others(n: int, height: int, width: int, channels: int, digits: bool) -> dict[str, np.ndarray]:
    import pipeline
    from pipeline.data.images import resize_array

    rng = np.random.default_rng(0)
    out = {
        "flat colours": np.broadcast_to(rng.integers(0, 256, (n, 1, 1, channels), dtype=np.uint8), (n, height, width, channels)).copy(),
        "noise": rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8),
    }
    if digits:
        d = np.concatenate([b.images for b in pipeline.open_source("digits").batches(512, 1)])[:n]
        out["digits, scaled"] = np.stack([np.repeat(resize_array(x, (height, width)), channels, -1) for x in d])
    return out


def in_distribution(run, source: str, limit: int) -> np.ndarray:
    """Held-out images of the run's training source, after the first REFERENCE_IMAGES of them."""
    import pipeline
    from pipeline import familiarity
    from pipeline.data.split import is_validation

    skip, got = familiarity.REFERENCE_IMAGES, []
    for b in pipeline.open_source(source).batches(1024, run.extract_config.channels):
        held = b.images[is_validation(b.ids, run.train_config.val_fraction)]
        take = held[max(0, skip):]
        skip -= len(held)
        got.append(take)
        if sum(len(g) for g in got) >= limit:
            break
    return np.concatenate(got)[:limit]


def main() -> None:
    ap = run_arguments(__doc__, "a digits run against flat colours and noise")
    ap.add_argument("--images", type=int, default=3000, help="held-out images scored (after the reference's)")
    ap.add_argument("--other", type=int, default=500, help="images of each other kind")
    a = ap.parse_args()

    import pipeline
    from pipeline import familiarity

    run = pipeline.load(the_run(ap, a, "familiarity"))
    if a.smoke:
        inside = np.concatenate([b.images for b in pipeline.open_source("digits", split="test").batches(512, 1)])[:200]
        sets = others(60, run.height, run.width, run.extract_config.channels, digits=False)
        what = "digits test split (the smoke run)"
    else:
        inside = in_distribution(run, a.source, a.images)
        sets = others(a.other, run.height, run.width, run.extract_config.channels, digits=True)
        what = "held-out training images after the reference's"
    t = time.perf_counter()
    score_in = run.familiarity(inside)
    if score_in is None:
        raise SystemExit(f"{run.root} has no familiarity reference; train it again")
    scores = {k: run.familiarity(x) for k, x in sets.items()}
    seconds = time.perf_counter() - t
    everything = np.concatenate(list(scores.values()))
    res = {
        "run": str(run.root), "reference": run.familiarity_reference.source, "reference_images": run.familiarity_reference.images,
        "in_distribution": what, "images": len(inside), "threshold": familiarity.UNFAMILIAR,
        "flagged_in_distribution": float((score_in < familiarity.UNFAMILIAR).mean()),
        "auroc_all": auroc(score_in, everything),
        "kinds": {k: {"images": len(s), "auroc": auroc(score_in, s), "flagged": float((s < familiarity.UNFAMILIAR).mean()),
                      "median": float(np.median(s))} for k, s in scores.items()},
        "images_per_s": (len(inside) + len(everything)) / seconds,
    }
    if emit(res, a.out, a.json):
        return
    print(f"{res['images']} {what}: {res['flagged_in_distribution']:.1%} under {res['threshold']}")
    for k, r in res["kinds"].items():
        print(f"  {k:<16} AUROC {r['auroc']:.4f}  flagged {r['flagged']:.1%}  median {r['median']:.3f}")
    print(f"  all others       AUROC {res['auroc_all']:.4f}")


if __name__ == "__main__":
    main()
