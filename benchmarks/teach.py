"""Teaching a run its mistakes one image at a time: are the taught images answered as taught, and
what happens to every other image's answer?

    python benchmarks/teach.py --run RUN --out benchmarks/results/teach.json

RUN is a run trained on the shared CIFAR-10 archive (the defaults). From the images its training
held out (``is_validation`` of their ids), the first ``--teach`` it answers wrong are taught, one
at a time, their true class (:func:`pipeline.teach.learn.learn`, the public API); the next
``--others`` held-out images (none of them taught) are answered before and after. Side by side,
each on a fresh load of RUN:

* ``ours``: each row's step divided by its pattern's training count (the default);
* ``plain``: plain gradient steps (``by_count=False``), a row's step in proportion to its share
  of the image alone.

Reported per side: the taught images answered as taught after the last lesson (earlier lessons
kept), the others' accuracy before and after and how many answers changed each way, the
patterns moved per lesson (median), a lesson's milliseconds (median, 90th percentile) and the
seconds :func:`pipeline.teach.save.save` takes to write the taught run.
``--smoke``: a small digits run, its test split (seconds).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, run_arguments, the_run  # noqa: E402


def held_out(run, source: str, limit: int, split: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` images the run's training held out (all of ``split`` when given), with labels."""
    import pipeline
    from pipeline.data.split import is_validation

    src = pipeline.open_source(source, split=split) if split else pipeline.open_source(source)
    imgs, labs = [], []
    for b in src.batches(1024, run.extract_config.channels):
        keep = slice(None) if split else is_validation(b.ids, run.train_config.val_fraction)
        imgs.append(b.images[keep])
        labs.append(b.labels[keep])
        if sum(len(x) for x in imgs) >= limit:
            break
    return np.concatenate(imgs)[:limit], np.concatenate(labs)[:limit]


def side(run_dir: Path, images: np.ndarray, labels: np.ndarray, teach: int, others: int, by_count: bool, work: Path) -> dict:
    import pipeline
    from pipeline.teach.learn import learn
    from pipeline.teach.save import save

    run = pipeline.load(run_dir)
    pred, _ = run.predict(images)
    wrong = np.flatnonzero(pred != labels)[:teach]
    rest = np.setdiff1d(np.arange(len(images)), wrong)[:others]
    lessons, ms = [], []
    for i in wrong:
        t = time.perf_counter()
        lessons.append(learn(run, images[i], run.class_names[int(labels[i])], f"held-out-{i}", by_count=by_count))
        ms.append(1000 * (time.perf_counter() - t))
    after, _ = run.predict(images)
    t = time.perf_counter()
    save(run, lessons, work / ("ours" if by_count else "plain"))
    save_s = time.perf_counter() - t
    before_ok, after_ok = pred[rest] == labels[rest], after[rest] == labels[rest]
    return {
        "taught": len(wrong), "taught_answered_as_taught": float((after[wrong] == labels[wrong]).mean()) if len(wrong) else None,
        "others": len(rest), "others_accuracy_before": float(before_ok.mean()), "others_accuracy_after": float(after_ok.mean()),
        "others_changed": int((after[rest] != pred[rest]).sum()), "others_now_right": int((~before_ok & after_ok).sum()),
        "others_now_wrong": int((before_ok & ~after_ok).sum()),
        "patterns_moved_median": float(np.median([les.rows for les in lessons])) if lessons else 0.0,
        "lesson_ms_median": float(np.median(ms)) if ms else 0.0, "lesson_ms_p90": float(np.percentile(ms, 90)) if ms else 0.0,
        "save_seconds": save_s,
    }


def main() -> None:
    ap = run_arguments(__doc__, "a small digits run and its test split")
    ap.add_argument("--teach", type=int, default=50, help="wrong held-out images taught, one at a time")
    ap.add_argument("--others", type=int, default=2000, help="other held-out images answered before and after")
    a = ap.parse_args()
    run_dir = the_run(ap, a, "teach")
    split = None
    if a.smoke:
        a.source, a.teach, a.others, split = "digits", 5, 300, "test"
    work = Path(tempfile.mkdtemp(prefix="teach-"))
    import pipeline

    images, labels = held_out(pipeline.load(run_dir), a.source, a.teach * 20 + a.others, split)
    res = {"run": str(run_dir), "images": "test split" if split else "held out by the run's training",
           "ours": side(run_dir, images, labels, a.teach, a.others, True, work),
           "plain": side(run_dir, images, labels, a.teach, a.others, False, work)}
    if emit(res, a.out, a.json):
        return
    for name in ("ours", "plain"):
        r = res[name]
        print(f"{name:<6} taught {r['taught']}: {r['taught_answered_as_taught']:.0%} answered as taught; others {r['others']}: "
              f"{r['others_accuracy_before']:.4f} -> {r['others_accuracy_after']:.4f} ({r['others_now_right']} now right, "
              f"{r['others_now_wrong']} now wrong); {r['patterns_moved_median']:.0f} patterns moved and "
              f"{r['lesson_ms_median']:.0f} ms per lesson (median); saved in {r['save_seconds']:.1f} s")


if __name__ == "__main__":
    main()
