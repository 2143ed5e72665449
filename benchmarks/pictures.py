"""Do the pictures of code patterns look like the patches they stand for?

    python benchmarks/pictures.py --run RUN --out benchmarks/results/pictures.json

For ``--images`` images the run's training held out (``is_validation`` of their ids, as training
chose them), the ``--top`` most decisive patches of each (``run.nearest_patterns(image, patches=...)``);
for every one of the code view, its own pattern (its nearest, d = 0) drawn two ways: as stored
(the atom stretched to 0..255) and given the patch's brightness and contrast (``run.pattern_pixels(ids,
like=...)``, what ``pipe query --png`` and the page show). Each picture is compared with the
patch's pixels by the mean absolute difference (0..255); the medians side by side.
``--smoke``: a small digits run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, run_arguments, the_run  # noqa: E402


def main() -> None:
    ap = run_arguments(__doc__, "a small digits run")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()

    import pipeline
    from pipeline.data.split import is_validation
    from pipeline.extraction.codes import brightness_contrast

    run = pipeline.load(the_run(ap, a, "pictures"))
    if a.smoke:
        a.source, a.images = "digits", 30
    images = []
    for b in pipeline.open_source(a.source).batches(512, run.extract_config.channels):
        images += list(b.images[is_validation(b.ids, run.train_config.val_fraction or 0.1)])
        if len(images) >= a.images:
            break
    stored, like, patches = [], [], 0
    for img in images[: a.images]:
        lk = run.nearest_patterns(img, k=1, patches=a.top)
        for r in range(len(lk.slots)):
            if run.view_name(int(lk.location["view"][r])) != "code" or lk.ids[r, 0] < 0 or lk.distances[r, 0] > 1e-6:
                continue
            y, x, h, w = (int(lk.location[c][r]) for c in ("y", "x", "h", "w"))
            patch = img[y : y + h, x : x + w].astype(np.float64)
            pid = lk.ids[r, :1]
            old = run.pattern_pixels(pid)[0]
            new = run.pattern_pixels(pid, like=brightness_contrast(patch))[0]
            stored.append(float(np.abs(old - patch).mean()))
            like.append(float(np.abs(new - patch).mean()))
            patches += 1
    res = {
        "run": str(run.root), "images": min(len(images), a.images), "top": a.top, "code_patches": patches,
        "stored_mad": float(np.median(stored)) if stored else None, "like_patch_mad": float(np.median(like)) if like else None,
        "like_patch_mad_p90": float(np.percentile(like, 90)) if like else None,
    }
    if emit(res, a.out, a.json):
        return
    print(f"{patches} decisive code patches of {res['images']} held-out images: mean absolute difference to the patch, median "
          f"{res['stored_mad']:.1f} (atom stretched) against {res['like_patch_mad']:.1f} (in the patch's brightness and contrast)")


if __name__ == "__main__":
    main()
