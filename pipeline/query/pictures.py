"""PNG pictures of a query: the image with its most decisive patches outlined and, beside each
patch, its nearest learned patterns drawn from their example pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline import layout

from pipeline.query.run import PatchLookup, Run

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"]


def _show(ax, pixels: np.ndarray | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if pixels is None:
        ax.text(0.5, 0.5, "no pixels", ha="center", va="center", fontsize=6, transform=ax.transAxes)
        return
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(pixels, interpolation="nearest")


def query_png(run: Run, image: np.ndarray, lookup: PatchLookup, path: Path | str, title: str = "") -> None:
    """Write one PNG: the image with ``lookup``'s patches outlined, and per patch a row of
    [the patch itself, its k nearest learned patterns] labelled with distance, count and top class."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    n = len(lookup.slots)
    k = lookup.ids.shape[1] if n else 0
    fig = Figure(figsize=(3.2 + 1.1 * (k + 1), max(3.2, 1.0 * n + 0.6)))
    grid = fig.add_gridspec(max(n, 1), k + 2, width_ratios=[3] + [1] * (k + 1))
    main = fig.add_subplot(grid[:, 0])
    _show(main, img)
    probs = lookup.probabilities
    main.set_title(f"{title}\n{run.class_names[int(probs.argmax())]} ({probs.max():.2f})", fontsize=8)
    pats = run.patterns
    flat_ids = lookup.ids[lookup.ids >= 0]
    pix = dict(zip(flat_ids.tolist(), run.pattern_pixels(flat_ids))) if len(flat_ids) else {}
    for r in range(n):
        color = COLORS[r % len(COLORS)]
        y, x, h, w = (int(lookup.location[c][r]) for c in ("y", "x", "h", "w"))
        main.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=color, linewidth=2))
        main.text(x - 0.5, y - 0.7, str(r + 1), color=color, fontsize=7, fontweight="bold")
        own = fig.add_subplot(grid[r, 1])
        _show(own, img[y : y + h, x : x + w])
        state = "seen" if lookup.seen[r] else ("composed" if lookup.composed[r] else "unmatched")
        view = run.view_name(int(lookup.location["view"][r]))
        own.set_title(f"#{r + 1} {view} {h}x{w} {state}\n{lookup.contribution[r]:+.3f}", fontsize=6, color=color)
        for j in range(k):
            ax = fig.add_subplot(grid[r, j + 2])
            pid = int(lookup.ids[r, j])
            if pid < 0:
                ax.axis("off")
                continue
            _show(ax, pix.get(pid))
            cc = pats["class_counts"][pid]
            top = run.class_names[int(cc.argmax())] if cc.sum() else "-"
            atom = int(pats["atom"][pid]) if "atom" in pats else -1
            what = f"atom {atom}" if atom >= 0 else f"x{int(pats['count'][pid])}"
            ax.set_title(f"d={lookup.distances[r, j]:.2f}\n{what} {top}", fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with layout.atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
