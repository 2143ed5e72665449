"""Learning in steps: class-incremental CIFAR-10 with ``pipe extract --like`` / ``pipe train --from``.

    python benchmarks/incremental.py --out benchmarks/results/incremental.json   # the shared CIFAR-10 images
    python benchmarks/incremental.py --per-class 1000 --json                      # a smaller slice
    python benchmarks/incremental.py --scenario slices --out ...                  # new images of known classes
    python benchmarks/incremental.py --smoke --json                               # digits, two steps (what CI runs)

Each class keeps its last ``--held-out`` images (by file number) for evaluation; training steps
draw from the others (the first ``--per-class``). Scenario ``classes``: five steps of two classes
in a fixed order that is not the sorted one (cat,dog / airplane,ship / frog,horse /
automobile,truck / bird,deer). Scenario ``slices``: the ten classes in five equal slices of images.
Side by side in one run, after every step, on the held-out images of the classes seen so far:

* ``steps``: ``pipe extract --like`` the previous run, then ``pipe train --from`` it (defaults);
* ``naive``: the same steps with ``--replay 0 --distill 0`` (continuing on the new images only);
* ``retrain``: ``pipe extract`` + ``pipe train`` from scratch on everything seen so far, whose
  last step is the joint run (all images at once, same settings).

Reported per step: accuracy on all classes seen so far, accuracy on each step's classes (the
matrix), and each stage's wall seconds and peak RSS (its own ``pipe`` process).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402
from benchmarks.common import CIFAR_TAR  # noqa: E402
from benchmarks.defaults import stage  # noqa: E402

ORDER = [("cat", "dog"), ("airplane", "ship"), ("frog", "horse"), ("automobile", "truck"), ("bird", "deer")]
SMOKE_ORDER = [("3", "8"), ("0", "6")]


def split_source(source: str, per_class: int, held_out: int) -> tuple[dict, dict]:
    """{class: [images to train on]}, {class: [held-out images]}: per class, in file-number order,
    the last ``held_out`` are held out and the first ``per_class`` of the rest are for training."""
    src = pipeline.open_source(source)
    by_class: dict[str, list[tuple[int, np.ndarray]]] = {}
    for b in src.batches(1024, None):
        for img, lab, name in zip(b.images, b.labels, b.names):
            number = re.findall(r"\d+", Path(str(name)).name)
            by_class.setdefault(src.class_names[int(lab)], []).append((int(number[-1]) if number else len(by_class), img))
    train, test = {}, {}
    for c, items in by_class.items():
        items.sort(key=lambda t: t[0])
        imgs = [img for _, img in items]
        test[c] = imgs[len(imgs) - held_out:]
        train[c] = imgs[: min(per_class, len(imgs) - held_out)]
    return train, test


def write_folder(root: Path, images: dict[str, list[np.ndarray]]) -> Path:
    for c, imgs in images.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(root / c / f"{i:05d}.png")
    return root


def accuracy(run: Path, folder: Path) -> float:
    return float(pipeline.load(run).evaluate(pipeline.open_source(folder))["accuracy"])


def steps_of(scenario: str, train: dict, order: list[tuple[str, ...]]) -> list[dict[str, list]]:
    """The training images of each step."""
    if scenario == "classes":
        return [{c: train[c] for c in pair} for pair in order]
    n = len(order)
    return [{c: imgs[len(imgs) * i // n: len(imgs) * (i + 1) // n] for c, imgs in train.items()} for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(CIFAR_TAR))
    ap.add_argument("--scenario", choices=["classes", "slices"], default="classes")
    ap.add_argument("--per-class", type=int, default=4000, help="training images per class (the first, by file number)")
    ap.add_argument("--held-out", type=int, default=1000, help="held-out images per class (the last, by file number)")
    ap.add_argument("--no-retrain", action="store_true", help="leave out the retrain-from-scratch reference but its last step (the joint run)")
    ap.add_argument("--no-naive", action="store_true", help="leave out the naive side (continuing on the new images only)")
    ap.add_argument("--step-args", default="", help="more flags for the steps side's pipe train --from, e.g. '--distill 2'")
    ap.add_argument("--extract-args", default="", help="more flags for the first step's and the joint run's pipe extract (later steps copy them with --like), e.g. '--atoms 1024'")
    ap.add_argument("--train-args", default="", help="more flags for the first step's and the joint run's pipe train (later steps keep their run's), e.g. '--lr 1 --drop 0'")
    ap.add_argument("--smoke", action="store_true", help="digits, three steps of a few images (seconds)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    order = ORDER
    train_flags: list[str] = []
    if a.smoke:
        a.source, a.per_class, a.held_out, order, a.no_retrain = "digits", 25, 10, SMOKE_ORDER, True
        train_flags = ["--epochs", "1", "--dim", "8"]
    train_flags += shlex.split(a.train_args)
    with tempfile.TemporaryDirectory(prefix="incremental-") as work:
        result = run(a, order, train_flags, Path(work))
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(json.dumps(result) if a.json else json.dumps(result["final"], indent=2))


def run(a, order: list[tuple[str, ...]], train_flags: list[str], tmp: Path) -> dict:
    """Every step of the three sides; the result object."""
    train, test = split_source(a.source, a.per_class, a.held_out)
    if a.scenario == "slices":
        order = [tuple(sorted(train))] * len(order)
    steps = steps_of(a.scenario, train, order)
    seen_classes: list[str] = []
    rows = []
    for i, images in enumerate(steps):
        new_classes = [c for c in images if c not in seen_classes]
        seen_classes += new_classes
        folder = write_folder(tmp / f"step{i}", images)
        for j, pair in enumerate(order[: i + 1]):
            if not (tmp / f"test{j}").exists():
                write_folder(tmp / f"test{j}", {c: test[c] for c in pair})
        row: dict = {"step": i + 1, "classes": list(images), "images": sum(len(v) for v in images.values())}
        if i == 0:
            row["steps_extract"] = stage(["extract", str(folder), "--out", str(tmp / "s0"), *shlex.split(a.extract_args)])
            row["steps_train"] = stage(["train", str(tmp / "s0"), "--out", str(tmp / "r0"), *train_flags])
            (tmp / "n0").symlink_to(tmp / "r0")
        else:
            row["steps_extract"] = stage(["extract", str(folder), "--like", str(tmp / f"r{i - 1}"), "--out", str(tmp / f"s{i}")])
            row["steps_train"] = stage(["train", str(tmp / f"s{i}"), "--from", str(tmp / f"r{i - 1}"), "--out", str(tmp / f"r{i}"),
                                        *shlex.split(a.step_args)])
            if not a.no_naive:
                row["naive_train"] = stage(["train", str(tmp / f"s{i}"), "--from", str(tmp / f"n{i - 1}"), "--replay", "0", "--distill", "0",
                                            "--out", str(tmp / f"n{i}")])
        last = i == len(steps) - 1
        if not a.no_retrain or last:
            union = write_folder(tmp / f"union{i}", {c: [img for st in steps[: i + 1] for img in st.get(c, [])] for c in seen_classes})
            row["retrain_extract"] = stage(["extract", str(union), "--out", str(tmp / f"u{i}"), *shlex.split(a.extract_args)])
            row["retrain_train"] = stage(["train", str(tmp / f"u{i}"), "--out", str(tmp / f"j{i}"), *train_flags])
        for name, run in (("steps", tmp / f"r{i}"), ("naive", tmp / f"n{i}"), ("retrain", tmp / f"j{i}")):
            if not run.exists():
                continue
            groups = order[: i + 1] if a.scenario == "classes" else [order[0]]
            per = [accuracy(run, tmp / f"test{j}") for j in range(len(groups))]
            row[name] = {"seen": float(np.mean(per)), "per_step_classes": dict(zip(["/".join(g) for g in groups], per))}
        row["steps_seconds"] = round(row["steps_extract"]["seconds"] + row["steps_train"]["seconds"], 1)
        if "retrain_extract" in row:
            row["retrain_seconds"] = round(row["retrain_extract"]["seconds"] + row["retrain_train"]["seconds"], 1)
        rows.append(row)
        if not a.json:
            print(json.dumps({k: row[k] for k in ("step", "classes", "steps_seconds") if k in row}
                             | {n: row[n]["seen"] for n in ("steps", "naive", "retrain") if n in row}), flush=True)
    joint = rows[-1]["retrain"]["seen"]
    return {
        "source": Path(a.source).name,
        "scenario": a.scenario,
        "per_class": a.per_class,
        "held_out": a.held_out,
        "step_args": a.step_args,
        "extract_args": a.extract_args,
        "train_args": a.train_args,
        "order": ["/".join(p) for p in order],
        "steps": rows,
        "final": {"steps": rows[-1]["steps"]["seen"], "naive": rows[-1].get("naive", {}).get("seen"), "joint": joint,
                  "steps_minus_joint": rows[-1]["steps"]["seen"] - joint,
                  "first_classes_steps": rows[-1]["steps"]["per_step_classes"][next(iter(rows[-1]["steps"]["per_step_classes"]))],
                  "first_classes_joint": rows[-1]["retrain"]["per_step_classes"][next(iter(rows[-1]["retrain"]["per_step_classes"]))],
                  "last_step_seconds": rows[-1]["steps_seconds"], "joint_seconds": rows[-1]["retrain_seconds"],
                  "last_step_share_of_joint": rows[-1]["steps_seconds"] / rows[-1]["retrain_seconds"]},
        "smoke": a.smoke,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


if __name__ == "__main__":
    main()
