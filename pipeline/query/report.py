"""Query results as plain dicts (what ``pipe query --json`` prints), built from a run and image files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import POSITION_MODES
from pipeline.errors import ParameterError
from pipeline.extraction.codes import brightness_contrast
from pipeline.familiarity import describe as describe_familiarity
from pipeline.query.run import PatchLookup, Run

MAX_K = 1024  # nearest patterns or images asked per patch or image


def check_counts(k: int, patches: int) -> None:
    """Refuse a --k or --patches that is out of range, before anything is loaded or written."""
    if not 1 <= k <= MAX_K:
        raise ParameterError("k", f"{k} must be between 1 and {MAX_K}")
    if patches < 0:
        raise ParameterError("patches", f"{patches} must be 0 or more")


FLAT = 4.0  # a patch whose pixels' standard deviation is under this (of 255) is flat: no edge inside it


def own_kind_first(kind: tuple[int, int, int], view: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The order that puts the patterns of a patch's ``kind`` (view, h, w) first, each group in the
    order given (nearest first)."""
    return np.argsort((view != kind[0]) | (h != kind[1]) | (w != kind[2]), kind="stable")


def cell_label(cell: int, mode: int) -> str:
    """`` cell N`` of a patch's place (its kind named when it is not the position grid's); empty without one."""
    if cell < 0:
        return ""
    kind = POSITION_MODES[mode]
    return f" {kind} cell {cell}" if kind != "grid" else f" cell {cell}"


def atom_label(sign_rank: int, pooled: bool, negative: bool = False) -> str:
    """A code slot's atom (:meth:`KeyPlan.sign_rank`): its id in a pooled code view, else which of the
    patch's nearest atoms (1 = nearest), named as its negative's where it is one."""
    return (f"atom {sign_rank}" if pooled else f"atom {sign_rank + 1}") + (" of -x" if negative else "")


def _patterns(run: Run, ids: np.ndarray, distances: np.ndarray, kinds: tuple[np.ndarray, ...] | None = None) -> list[list[dict]]:
    """The nearest-pattern entries of each row of ``ids`` / ``distances`` (S x k; id -1 = none),
    their metadata read once for all rows. With ``kinds`` (view, h, w of each row's patch) the
    patterns of the patch's own view and shape come first, each group nearest first."""
    ok = ids >= 0
    p = run.table.metadata_of(ids[ok])
    pos = np.cumsum(ok.ravel()).reshape(ids.shape) - 1  # row of p of each valid entry
    out = []
    for s in range(len(ids)):
        row = []
        found = np.flatnonzero(ok[s])
        if kinds is not None and len(found):
            i = pos[s, found]
            found = found[own_kind_first((kinds[0][s], kinds[1][s], kinds[2][s]), p["view"][i], p["h"][i], p["w"][i])]
        for j in found:
            i = pos[s, j]
            cc = p["class_counts"][i]
            row.append({
                "pattern_id": int(ids[s, j]),
                "distance": float(distances[s, j]),
                "key": f"{int(p['key'][i]):016x}",
                "view": run.view_name(int(p["view"][i])),
                "h": int(p["h"][i]),
                "w": int(p["w"][i]),
                "cell": int(p["cell"][i]),
                "count": int(p["count"][i]),
                "top_class": run.class_names[int(cc.argmax())] if cc.sum() else None,
            })
        out.append(row)
    return out


def query_one(run: Run, image: np.ndarray, name: str, k: int = 5, patches: int = 10, classifier: str = "head") -> tuple[dict, PatchLookup]:
    """Prediction, probabilities, patch counts, the ``patches`` most decisive patches with their k nearest
    patterns, and the k nearest training images; plus the :class:`PatchLookup` it came from.

    ``patches`` = 0 reports every patch; otherwise the ``patches`` distinct patterns, ranked by their
    contribution to the head's predicted class's logit summed over the patches holding them
    (``occurrences``), each reported at its first patch; patches with no vector (unseen, no seen
    parts) come last.
    ``classifier`` = ``knn`` predicts by a vote of the nearest training images instead.
    """
    if k < 1:
        raise ParameterError("k", f"{k} must be at least 1")
    keys, weights, vote_keys, vote_weights = run.scoring_keys(image)  # hashed and pooled once for every part of the answer
    # the prediction from ``voted`` (with the run's mirror vote, the image and its mirror); the patches explain it
    pooled, voted = run.classifier.pooled_own_and_all(vote_keys, weights=vote_weights)
    head = run.classifier.probabilities(voted)[0]
    lookup = run.lookup.lookup_keys(keys[0], head, k, patches or None, None if weights is None else weights[0])
    probs = head if classifier == "head" else run.classifier.probabilities(voted, classifier)[0]
    near = run.training_images.nearest(pooled, k)
    fam = run.familiarity_keys(keys, weights, pooled, near)
    order = np.argsort(-lookup.contribution, kind="stable")
    loc = lookup.location
    nearest = _patterns(run, lookup.ids[order], lookup.distances[order], (loc["view"][order], *run.plan.pattern_shape(lookup.slots[order])))
    decisive = []
    for n, s in enumerate(order):
        loc = {c: int(v[s]) for c, v in lookup.location.items()}
        negative, sign_rank = run.plan.sign_rank(loc["rank"])
        brightness, contrast = brightness_contrast(image[loc["y"] : loc["y"] + loc["h"], loc["x"] : loc["x"] + loc["w"]])
        decisive.append(
            {
                "slot": int(lookup.slots[s]),
                **loc,
                "key": f"{int(lookup.keys[s]):016x}",
                "seen": bool(lookup.seen[s]),
                "composed": bool(lookup.composed[s]),
                "contribution": float(lookup.contribution[s]),
                "occurrences": int(lookup.occurrences[s]),
                "view": run.view_name(int(lookup.location["view"][s])),
                "pooled": bool(run.plan.n_pool_cells) and int(lookup.location["view"][s]) == run.plan.code_view,  # rank is the atom, place its cell
                "negative": negative,  # an atom of the patch's negative (both signs)
                "sign_rank": sign_rank,  # the rank among its sign's atoms
                "weight": 1.0 if weights is None else float(weights[0][lookup.slots[s]]),  # its weight in the image's bag
                "brightness": round(brightness, 3),  # of the patch's pixels (mean): code patterns are drawn with it
                "contrast": round(contrast, 3),  # (standard deviation)
                "flat": bool(contrast < FLAT),
                "nearest": nearest[n],
            }
        )
    return {
        "image": name,
        "prediction": run.class_names[int(probs.argmax())],
        "probabilities": {c: float(p) for c, p in zip(run.class_names, probs)},
        "familiarity": None if fam is None else float(fam[0]),
        "patch_counts": lookup.counts,
        "patches": decisive,
        "background_only": bool(decisive) and all(p["flat"] for p in decisive),  # every decisive pattern is flat
        "nearest_images": [
            {"image_id": int(i), "row": int(r), "name": name, "label": run.class_names[int(c)], "distance": float(d)}
            for i, r, name, c, d in zip(near.image_ids[0], near.ids[0], near.names[0], near.labels[0], near.distances[0]) if i >= 0
        ],
    }, lookup


def short_name(name: str | None) -> str | None:
    """A training image's name for a terminal line: an archive member without the archive's path."""
    return None if name is None else name.rsplit(":", 1)[-1] if ".tar" in name else name


def text_lines(res: dict, label: str) -> list[str]:
    """What ``pipe query`` prints for one answer of :func:`query_one` (``label``: the first line's
    start, the image's path): the top classes, the familiarity, the patch counts, one line per
    place of the decisive patterns with each pattern found there, and the nearest training images."""
    probs = sorted(res["probabilities"].items(), key=lambda kv: -kv[1])[:3]
    c = res["patch_counts"]
    out = [f"{label}: {res['prediction']}  ({', '.join(f'{n} {p:.3f}' for n, p in probs)})" + (f"  -> {res['png']}" if "png" in res else ""),
           f"  {describe_familiarity(res['familiarity'])}",
           f"  patches: {c['total']} ({c['seen']} seen, {c['composed']} unseen composed from parts, {c['unmatched']} unmatched)"]
    if res.get("background_only"):
        out.append("  every decisive pattern is flat (no edge inside it): the answer rests on brightness and colour, not on a shape")
    places: dict[tuple, list] = {}
    for i, p in enumerate(res["patches"]):
        places.setdefault((p["y"], p["x"], p["h"], p["w"]), []).append((i, p))
    for (y, x, h, w), items in places.items():
        first = items[0][1]
        out.append(f"  {h}x{w} at row {y} col {x}" + cell_label(first["cell"], first["mode"]) + (" (flat)" if first["flat"] else ""))
        for i, p in items:
            what = p["view"] + (f" {atom_label(p['sign_rank'], p['pooled'], p['negative'])} weight {p['weight']:.2f}" if p["view"] == "code" else "")
            what += f", {p['occurrences']} places" if p["occurrences"] > 1 else ""
            state = "seen" if p["seen"] else ("unseen, composed" if p["composed"] else "unseen, unmatched")
            near = ", ".join(f"#{n['pattern_id']} d={n['distance']:.3f} seen {n['count']} {n['top_class']}" for n in p["nearest"])
            out.append(f"    #{i + 1} {what:<30} {state:<17} {p['contribution']:+.4f}  nearest: {near}")
    out.append("  nearest training images: " + ", ".join(
        f"{short_name(n['name']) or '#' + str(n['image_id'])} {n['label']} d={n['distance']:.3f}" for n in res["nearest_images"]))
    return out


def info_lines(s: dict) -> list[str]:
    """What ``pipe info`` prints for a run's :meth:`~pipeline.query.run.Run.summary` ``s``."""
    out: list[str] = []
    acc = f"{s['val_accuracy']:.4f}" if s["val_accuracy"] is not None else "n/a"
    ex, tr = s["extract_config"], s["train_config"]
    out.append(f"{s['run']}: {len(s['classes'])} classes ({', '.join(s['classes'][:10])}{', ...' if len(s['classes']) > 10 else ''}), "
               f"{s['image']['height']}x{s['image']['width']} images with {s['image']['channels']} channel(s)")
    out.append(f"  held-out accuracy {acc} at epoch {s['best_epoch']} of {s['epochs_run']} (train {s['train_accuracy']:.4f}); "
               f"{s['patterns']:,} patterns, {s['rows']:,} table rows of dimension {tr['dim']}; index {s['index']}; unseen patches: {s['unseen']}")
    out.append(f"  extracted with views {ex['views']} up to {ex['max_h']}x{ex['max_w']}, position {ex['position']}, grid {ex['grid']}, "
               f"code shapes {ex['code_shapes']}" + (f" ({ex['atoms']} atoms, k {ex['code_k']})" if ex["code_shapes"] != "none" else "")
               + f"; trained {tr['epochs']} epochs max, lr {tr['lr']}, bag {tr['bag']}; from {s['shards']}")
    if s["refit"]:
        out.append(f"  then trained again on all {s['refit']['images']:,} images for those {s['refit']['epochs']} epoch(s) (--refit auto): nothing is held out")
    if s["lineage"]:
        out.append("  grown in steps: " + " -> ".join(f"{e['shards']}" + (f" (on top of {e['run']})" if e["run"] else "") for e in s["lineage"]))
    if s["taught"]:
        taught = s["taught"]["images"]
        out.append(f"  taught {len(taught)} image(s) on top of {s['taught']['from']}: "
                   + ", ".join(f"{t['name']} as {t['class']}" for t in taught[:5]) + (", ..." if len(taught) > 5 else ""))
    out.append(f"  on disk {s['bytes'] / 1e6:.1f} MB: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in s["files_bytes"].items()))
    return out


def png_names(paths) -> dict:
    """One PNG file name per query image: its stem, made unique (``name-2.png``, ...) where two
    inputs share one, so no picture overwrites another."""
    names, used = {}, set()
    for p in paths:
        stem = Path(p).stem
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        names[p] = name
    return names
