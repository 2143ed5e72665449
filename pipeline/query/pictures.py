"""PNG pictures of a query: the image with its most decisive patches outlined and, beside each
patch, its nearest learned patterns drawn from their example pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline import layout, outputs

from pipeline.extraction.codes import brightness_contrast
from pipeline.query.report import FLAT, atom_label, cell_label, own_kind_first
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


EXPLAINED = (
    "Outlines: the places of the most decisive distinct patterns (one colour per place; its patterns' rows share it). Row title: "
    "view (code: which nearest atom and its weight), size, place (row, col of its top-left pixel), flat = no edge inside, seen or not, "
    "push on the predicted class (xN: the pattern fills N places).\n"
    "Under each nearest learned pattern: d = squared distance between learned vectors (0 = the same pattern), its view, "
    "seen N = occurrences in training (code view: its atom), and the class it occurred with most.\n"
    "A code pattern is drawn as its dictionary atom given the brightness and contrast of the row's patch, so the two compare. "
    "Dashed lines: the grid of position cells (numbered); a patch belongs to the cell holding its centre."
)


def query_png(run: Run, image: np.ndarray, lookup: PatchLookup, path: Path | str, title: str = "") -> None:
    """Write one PNG: the image with ``lookup``'s patches outlined, and per patch a row of
    [the patch itself, its k nearest learned patterns] labelled with distance, view, count and top class."""
    outputs.check_file_out(Path(path), "the picture")
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    n = len(lookup.slots)
    k = lookup.ids.shape[1] if n else 0
    keys, weights = run.encode(img)
    near = run.training_images.nearest(run.classifier.pooled(keys, weights=weights), max(k, 1))
    rows = near.ids[0][near.ids[0] >= 0]
    thumbs = run.training_images.thumbnails(rows) if len(rows) else []
    fig = Figure(figsize=(3.2 + 1.15 * (k + 1), max(3.2, 1.45 * (n + 1) + 1.1)))
    grid = fig.add_gridspec(max(n, 1) + 1, k + 2, width_ratios=[3] + [1] * (k + 1))
    main = fig.add_subplot(grid[:-1, 0])
    _show(main, img)
    g = run.plan.config.grid
    if "grid" in run.plan.config.position_modes and g > 1:  # the cells of "cell N": a patch is in the cell of its centre
        for i in range(1, g):
            main.axhline(i * run.height / g - 0.5, color="white", linewidth=0.6, linestyle=(0, (2, 2)), alpha=0.8)
            main.axvline(i * run.width / g - 0.5, color="white", linewidth=0.6, linestyle=(0, (2, 2)), alpha=0.8)
        for c in range(g * g):
            main.text((c % g) * run.width / g, (c // g) * run.height / g, str(c), color="white", fontsize=5, va="top", ha="left",
                      bbox={"facecolor": "black", "alpha": 0.4, "pad": 0.5, "linewidth": 0})
    probs = lookup.probabilities
    main.set_title(f"{title}\n{run.class_names[int(probs.argmax())]} ({probs.max():.2f})", fontsize=8)
    flat_ids = lookup.ids[lookup.ids >= 0]
    meta = run.table.metadata_of(flat_ids) if len(flat_ids) else {}
    row_of = {pid: i for i, pid in enumerate(flat_ids.tolist())}
    places: dict[tuple[int, int, int, int], int] = {}  # one colour and one outline per place; its patterns' rows share them
    for r in range(n):
        y, x, h, w = (int(lookup.location[c][r]) for c in ("y", "x", "h", "w"))
        first = (y, x, h, w) not in places
        g = places.setdefault((y, x, h, w), len(places))
        color = COLORS[g % len(COLORS)]
        if first:
            inset = 0.12 * (g % 4)  # overlapping places: nested outlines, none hidden under another
            main.add_patch(Rectangle((x - 0.5 + inset, y - 0.5 + inset), w - 2 * inset, h - 2 * inset, fill=False, edgecolor=color, linewidth=1.5))
        own = fig.add_subplot(grid[r, 1])
        patch = img[y : y + h, x : x + w]
        _show(own, patch)
        own.set_adjustable("datalim")  # a square box like its neighbours': a tall place (a pooled cell) widens its margins instead of
        own.set_box_aspect(1)  # growing into the next row's title
        nearby = lookup.ids[r][lookup.ids[r] >= 0]
        look = brightness_contrast(patch)
        pix = dict(zip(nearby.tolist(), run.pattern_pixels(nearby, like=look))) if len(nearby) else {}
        for side in own.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2)
        state = "seen" if lookup.seen[r] else ("composed" if lookup.composed[r] else "unmatched")
        view = run.view_name(int(lookup.location["view"][r]))
        times = f" x{int(lookup.occurrences[r])}" if lookup.occurrences[r] > 1 else ""
        cell = int(lookup.location["cell"][r])
        where = f"row {y} col {x}" + cell_label(cell, int(lookup.location["mode"][r]))
        pooled = bool(run.plan.n_pool_cells)
        negative, sign_rank = run.plan.sign_rank(int(lookup.location["rank"][r]))
        atom = f" {atom_label(sign_rank, pooled, negative)} w{weights[0][lookup.slots[r]]:.2f}" if view == "code" and weights is not None else ""
        flat = " flat" if look[1] < FLAT else ""
        own.set_title(f"#{r + 1} {view}{atom}\n{h}x{w} {where}{flat}\n{state}, push {lookup.contribution[r]:+.3f}{times}", fontsize=6, color=color)
        found = np.flatnonzero(lookup.ids[r] >= 0)  # the patch's own view and shape first, each group nearest first
        at = np.array([row_of[int(pid)] for pid in lookup.ids[r, found]], np.int64)
        if len(found):
            shape = run.plan.pattern_shape(lookup.slots[r])  # a pooled code slot's place is a cell, its patterns the code shape
            found = found[own_kind_first((int(lookup.location["view"][r]), int(shape[0]), int(shape[1])), meta["view"][at], meta["h"][at], meta["w"][at])]
        for col in range(k):
            ax = fig.add_subplot(grid[r, col + 2])
            if col >= len(found):
                ax.axis("off")
                continue
            j = found[col]
            pid = int(lookup.ids[r, j])
            _show(ax, pix.get(pid))
            i = row_of[pid]
            cc = meta["class_counts"][i]
            top = run.class_names[int(cc.argmax())] if cc.sum() else "-"
            atom = int(meta["atom"][i]) if "atom" in meta else -1
            if atom >= 0:  # a code pattern: its atom, named as a negative's where it is one
                negative, own = run.plan.atom_sign(atom)
                what = atom_label(own, True, negative)
            else:
                what = f"seen {int(meta['count'][i])}"
            ax.set_title(f"d={lookup.distances[r, j]:.1f} {run.view_name(int(meta['view'][i]))}\n{what} {top}", fontsize=6)
    label = fig.add_subplot(grid[-1, 0])
    label.axis("off")
    label.text(1.0, 0.5, "nearest training images\n(pooled vectors)", ha="right", va="center", fontsize=7, transform=label.transAxes)
    for j in range(k + 1):
        ax = fig.add_subplot(grid[-1, j + 1])
        if j >= len(rows):
            ax.axis("off")
            continue
        _show(ax, thumbs[j])
        name = str(near.names[0][j] or f"#{near.image_ids[0][j]}").rsplit("/", 1)[-1]
        ax.set_title(f"{run.class_names[int(near.labels[0][j])]}\n{name} d={near.distances[0][j]:.2f}", fontsize=6)
    fig.text(0.01, 0.005, EXPLAINED, fontsize=5.5, color="#444444", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with layout.atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
