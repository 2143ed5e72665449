"""docs/results.md, rendered from the benchmarks' committed JSON results (benchmarks/results/*.json).

    python benchmarks/results_page.py            # rewrite docs/results.md
    python benchmarks/results_page.py --check    # exit 1 when docs/results.md is not what the JSON gives

Every figure on the page is read from a JSON file a benchmark wrote; the page says which
command wrote it. tests/test_benchmarks.py checks that the committed page is this
rendering of the committed JSON, so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

sys.path.insert(0, str(ROOT))



def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def mps(v: float) -> str:
    return f"{v / 1e6:.1f}"


def cifar_defaults() -> str:
    d = load("cifar_defaults.json")
    t = d.get("train")
    train = (f", and `pipe train`'s to a table of dimension {t['dim']} learning at {t['lr']} with patch dropout {t['drop']},"
             f" batches of {t['batch_size']}, at most {t['epochs']} epochs"
             + (", each image scored with its mirror (`--vote mirror`)" if t.get("vote") == "mirror" else "") + " (docs/training.md)") if t else ""
    mirrored = " (closed under mirroring: the flipped copies' codes are their originals', mirrored)" if "flip" in d["extract"]["augment"] else ""
    kinds = " (in their grid cell and also without a location)" if d["extract"].get("code_position") == "both" else ""
    return f"""## CIFAR-10 with the defaults

`python benchmarks/defaults.py --out benchmarks/results/cifar_defaults.json`: `pipe extract` on the shared archive of the {d['images'] // (2 if d['extract']['augment'] == 'flip' else 1):,} CIFAR-10 training images and `pipe train`, no flags, each stage its own process on {d['cpus']} cores.
The accuracy is on the {d['val_images']:,} training images the trainer holds out (the dictionary fit leaves them out too); the official test split is not used here.

{table(["figure", "value", "bound"], [
    ["held-out accuracy (best epoch)", f"**{d['val_accuracy']:.4f}** (epoch {d['best_epoch']} of {d['epochs_run']})", "≥ 0.75"],
    ["training accuracy at that epoch", f"{d['train_accuracy']:.4f}", ""],
    ["extract + train", f"{d['extract_s']:.0f} s + {d['train_s']:.0f} s = {d['total_minutes']} min", "≤ 20 min"],
    ["peak RSS, extract / train", f"{d['extract_peak_rss_mb']:,} MB / {d['train_peak_rss_mb']:,} MB", "≤ 6 GB"],
    ["run directory", f"{d['run_mb']:,} MB", "≤ 1 GB"],
    ["shards / table rows", f"{d['shards_mb']:,} MB / {d['rows']:,}", ""],
])}

On 32×32 colour images the defaults resolve to views `{d['extract']['views']}` up to {d['extract']['max_h']}×{d['extract']['max_w']}, position `{d['extract']['position']}` on a {d['extract']['grid']}×{d['extract']['grid']} grid, the code view
`{d['extract']['code_shapes']}` with {d['extract']['atoms']:,} atoms{mirrored}, k = {d['extract']['code_k']}, whitening {d['extract']['whiten']}, its patches keyed `{d['extract'].get('code_position', 'same')}`{kinds}, `--augment {d['extract']['augment']}` (docs/extract.md gives the rules){train}.
"""


def digits() -> str:
    d = load("digits_defaults.json")
    t = load("digits_tuned.json")
    rows = [
        ["patchhash, no flags (`pipe extract digits` + `pipe train`, the head)", f"**{d['ours']['accuracy']:.4f}** ({', '.join(f'{a:.4f}' for a in d['ours']['per_seed'])})"],
        ["patchhash, benchmarks/digits.py's tuned settings, read with the 5-nearest vote", f"{t['ours']['accuracy']:.4f} ({', '.join(f'{a:.4f}' for a in t['ours']['per_seed'])})"],
        ["SVC (RBF, gamma 0.001)", f"{d['svc']:.4f}"],
        ["1-nearest neighbour", f"{d['nearest_neighbour']:.4f}"],
        ["logistic regression", f"{d['logistic_regression']:.4f}"],
    ]
    return f"""## Digits (the embedded default)

`python benchmarks/digits.py --defaults --json > benchmarks/results/digits_defaults.json` and `python benchmarks/digits.py --json >
benchmarks/results/digits_tuned.json`: train on `digits --split train` (898 images), score `--split test` (899); scikit-learn's
models see the raw pixels of the same images. Seeds 0, 1, 2: their mean (each seed in brackets). The code view's settings on a CIFAR subset (one change per row, 500 images per class, before the factors above): `python benchmarks/codes.py --out benchmarks/results/codes.json`.

{table(["model", "test accuracy"], rows)}
"""


def factors() -> str:
    if not (RESULTS / "factors.json").exists():
        return ""
    d = load("factors.json")
    base = next((r for r in d["rows"] if r["row"] == "base"), None)
    vs = (lambda acc: f"{100 * (acc - base['val_accuracy']):+.2f}" if base else "")  # points against the base row
    rows = []
    for r in d["rows"]:
        ex, tr = r.get("extract"), r["train"]
        change = " ".join(r["extract_flags"] + r["train_flags"]) or "(base)"
        rows.append([r["row"], f"`{change}`", f"{r['val_accuracy']:.4f}", vs(r["val_accuracy"]), f"{r['train_accuracy']:.4f}",
                     f"{ex['seconds']:.0f}" if ex else "(shared)", f"{tr['seconds']:.0f}",
                     f"{max(ex['peak_rss_mb'] if ex else 0, tr['peak_rss_mb']):,}", f"{r['shards_mb']:,.0f}", f"{r['run_mb']:,.0f}"])
    ext = load("cifar_defaults.json")["extract"]
    gap = (f" The base row is {base['val_accuracy']:.4f}; on these images `--atoms auto` resolves to {ext['atoms']:,} and `pipe train`'s automatic"
           " `--lr` and `--drop` to 0.3 and 0.3, the row `4096 regularised`; the rows named 4096 after it change it in one respect."
           " Every row keys the code view like the exact views (`--code-position same`), codes one shape (`--code-shapes 6x6`) unless it names"
           " others, and, up to `4096 two shapes`, was coded with a"
           " dictionary that is not closed under mirroring, the rows after it with the mirror-closed one" + (f"; the defaults (the first table) add `--code-position {ext['code_position']}`,"
           f" the code shapes `{ext['code_shapes']}` and the mirror-closed dictionary." if ext.get("code_position", "same") != "same" else ".")) if base else ""
    ceiling = ""
    if (RESULTS / "code_ceiling.json").exists():
        c = load("code_ceiling.json")
        ex, ref, tr = c["extract"], c["reference"], c["trainer"]
        rows.append(["pooled", f"`--code-pool coarse --atoms 1024 {' '.join(tr['flags'])}`", f"{tr['val_accuracy']:.4f}", vs(tr['val_accuracy']), f"{tr['train_accuracy']:.4f}", f"{ex['seconds']:.0f}",
                     f"{tr['train']['seconds']:.0f}", f"{max(ex['peak_rss_mb'], tr['train']['peak_rss_mb']):,}", f"{c['shards_mb']:,.0f}", ""])
        rows.append(["pooled, linear", "the same shards, standardised linear classifier", f"{ref['val_accuracy']:.4f}", vs(ref['val_accuracy']), f"{ref['train_accuracy']:.4f}",
                     "(shared)", f"{ref['seconds']:.0f}", "", "", ""])
        ceiling = (f" The last two rows are `python benchmarks/code_ceiling.py --out benchmarks/results/code_ceiling.json`: every atom of every"
                   f" patch summed per quadrant ({ref['features']:,} weights an image), scored by `pipe train` and by a linear classifier on the"
                   " same weights standardised per feature, the patch papers' way of scoring an encoding.")
    return f"""## The code view's factors on all of CIFAR-10

`python benchmarks/factors.py --out benchmarks/results/factors.json`: one `pipe extract` + `pipe train` per row on all 50,000 images, the base (the defaults with `--atoms 1024`, trained with `--lr 1 --drop 0`: every row's first flags) with one change; held-out part as above (one image is 0.02 points).{gap}{ceiling} Rows from `hard` on were measured after the coding's selection was made faster (CHANGELOG.md), so their extract times are not comparable with the rows above them.

{table(["row", "change", "held-out", "vs base, points", "train", "extract s", "train s", "peak RSS MB", "shards MB", "run MB"], rows)}
"""


def small_data() -> str:
    d = load("small.json")
    rows = [[r["slice"], f"{r['train_images']:,}", f"{r['scored_images']:,}", f"**{r['ours']:.4f}**" if r["beats_both"] else f"{r['ours']:.4f}",
             f"{r['logistic_regression']:.4f}", f"{r['nearest_neighbour']:.4f}"] for r in d["rows"]]
    return f"""## Small data

`python benchmarks/small.py --out benchmarks/results/small.json`: the defaults against logistic regression and 1-nearest-neighbour on the raw pixels of the same images; digits scored on `--split test`, CIFAR-10 on images 201-400 of each class (in sorted-name order). Bold: ours beats both.

{table(["slice", "train", "scored", "ours", "logistic regression", "1-NN"], rows)}
"""


def coding_speed() -> str:
    d = load("extract_codes.json")
    return f"""## Coding speed

`python benchmarks/extract.py --codes --json > benchmarks/results/extract_codes.json`: coding {d['code_images']:,} CIFAR
images ({', '.join(d['code_shapes'])}, {d['atoms']:,} atoms, k = {d['code_k']}), ours against the same coding in numpy (`argpartition`), and
over {d['workers']} workers as `pipe extract` runs it against a bare matmul of 4,096 patches by the atoms on all cores.

{table(["", "ours", "numpy"], [
    ["images/s, one process", f"{d['ours_images_per_s']:,}", f"{d['numpy_images_per_s']:,}"],
    ["GFLOP/s, one process", f"{d['one_process_gflops']}", ""],
    [f"GFLOP/s, {d['workers']} workers (bare matmul on all cores)", f"{d['ours_gflops']} ({100 * d['share_of_matmul']:.0f}%)", f"{d['numpy_matmul_gflops']}"],
])}

Ours is {d['ratio']}× the numpy coding; the same atoms for {d['same_atoms'] * 100:.4f}% of the patches (float32 near-ties), weights within {d['max_weight_difference']:.1e}.
"""


def extract_engine() -> str:
    d = load("extract.json")
    rows = [
        [f"{d['images']:,} images, patches up to 3×3 ({d['patches']:,} patches)", mps(d["ours_patches_per_s"]), mps(d["baseline_patches_per_s"]), f"{d['ratio']:.2f}", d["outputs_identical"]],
        [f"{d['full_images']:,} images, every rectangle up to 32×32 ({d['full_patches']:,} patches)", mps(d["full_ours_patches_per_s"]), mps(d["full_baseline_patches_per_s"]), f"{d['full_ratio']:.2f}", d["full_outputs_identical"]],
    ]
    workers = "; ".join(f"{w} worker(s) {v['images_per_s']:.0f} images/s, {mps(v['patches_per_s'])} M patches/s ({v['speedup']:.2f}×)" for w, v in d["workers"].items())
    rss = "; ".join(f"{r['images']:,} → {r['peak_rss_mb']:.0f} MB" for r in d["rss_default"] + d["rss_full"])
    return f"""## Extract engine

`python benchmarks/extract.py --json > benchmarks/results/extract.json`: the exact views' hashing (one `levels` view, no code view), ours (prefix-sum rolling hash
compiled with numba) against `torch.Tensor.unfold` per shape and a wrapping dot product (the same hash, so the keys must match), both writing the same shards, one core each.

{table(["input", "ours M patches/s", "baseline M patches/s", "ratio", "identical keys"], rows)}

The whole stage from the archive (decode included), by worker processes: {workers}. Peak RSS of
a separate extract process does not grow with the number of images (3×3, then full
enumeration): {rss}.
"""


def training() -> str:
    d = load("train.json")
    return f"""## Training throughput

`python benchmarks/train.py --current-defaults --json > benchmarks/results/train.json`: {d['images']:,} CIFAR images with today's extract defaults, {d['epochs']} epochs each side, each side
in its own process. Baseline: the plain loop, `EmbeddingBag(mode="mean", sparse=True)` over each image's raw keys hashed into 4M rows, SparseAdam + Adam, batch 128.
Ours: `pipeline.train` with the defaults. `ids/s` counts the images' raw keys per second of the inner loop; wall clock is the whole process (reading, our vocabulary pass, validation, our look-up artifacts).

{table(["", "ours", "baseline", "ratio"], [
    ["M ids/s, inner loop", mps(d['ids_per_s']), mps(d['baseline_ids_per_s']), f"{d['ratio']:.2f}"],
    ["wall clock s, whole process", f"{d['wall_seconds']:.1f}", f"{d['baseline_wall_seconds']:.1f}", f"{d['wall_ratio']:.2f}"],
    ["held-out accuracy", f"{d['val_accuracy']:.4f}", f"{d['baseline_val_accuracy']:.4f}", ""],
    ["peak RSS MB", f"{d['peak_rss_mb']:.0f}", f"{d['baseline_peak_rss_mb']:.0f}", ""],
])}
"""


def storage() -> str:
    d = load("storage.json")
    rows = [[r["layout"], r["codec"], "yes" if r["dictionary"] else "", f"{r['rows_per_group']:,}", mps(r["write_patches_per_s"]),
             mps(r["read_patches_per_s"]), f"{r['bytes_per_patch']:.2f}"] for r in d["rows"] if r["codec"] == "snappy" or (r["layout"] == "binary" and r["codec"] in ("zstd:1", "none"))]
    return f"""## Shard storage

`python benchmarks/storage.py --json > benchmarks/results/storage.json`: the keys of {d['images']:,} CIFAR images
({d['patches']:,} patches) stored in each layout and codec, read back the way training reads
them, one thread, best of three (the JSON has the other layouts with lz4, zstd and no codec too). Ours is `binary` with
snappy: one fixed-size blob of keys per image.

{table(["layout", "codec", "dictionary", "rows/row group", "write M patches/s", "read M patches/s", "bytes/patch"], rows)}
"""


def query() -> str:
    d = load("query.json")
    shown = {"", "nprobe=1", "nprobe=4", "nprobe=16", "nprobe=32", "nprobe=128", "ef_search=16", "ef_search=64", "ef_search=256"}
    curve = [[c["index"], c["setting"] or "", f"{c['recall_at_10']:.4f}", f"{c['queries_per_s']:,.0f}", f"{c['queries_per_s'] / d['exact_queries_per_s']:.1f}"]
             for c in d["curve"] if (c["setting"] or "") in shown]
    acc = d["accuracy"]
    return f"""## Nearest-pattern search and unseen patches

`python benchmarks/query.py --current-defaults --kinds ivf,hnsw --json > benchmarks/results/query.json`:
a run on a CIFAR subset (the command's default `--per-class`) with today's defaults ({d['vectors']:,} patterns of dimension
{d['dim']}); queries are the composed vectors of {d['queries']:,} unseen held-out patches, recall against
exact search (the JSON has more settings). The run's own index (`{d['index']}`) answers at recall@10 {d['recall_at_10']:.4f}.

{table(["index", "setting", "recall@10", "queries/s", "× exact"], curve)}

Held-out accuracy of the same run by what unseen patches do (and the 5-nearest-training-images
vote), each against `drop` on the same images, with the images only one side gets right:

{table(["reader", "images", "accuracy", "drop on the same images", "only drop / only the rule"], [
    [name, f"{pr['images']:,}", f"{acc[name]:.4f}", f"{pr['drop_accuracy_same_images']:.4f}", f"{pr['drop_only']} / {pr['rule_only']}"]
    for name, pr in d["paired"].items()
])}

The default rule is `{d['default_rule']}`; the most any other reader gains over it is {max(pr['rule_only'] - pr['drop_only'] for pr in d['paired'].values())} image(s).
"""


def answering() -> str:
    d = load("query_latency.json")
    s, b, w, e = d["single"], d["batch"], d["in_process"], d["evaluate"]
    return f"""## Answering one image

`python benchmarks/query_latency.py --run RUN --json --out benchmarks/results/query_latency.json`, RUN the
full-CIFAR default run of the first section ({d['patterns']:,} patterns, {d['run_mb']:,.0f} MB on disk), images {d['image']} from
the shared archive, written as PNG files:

{table(["", "images", "wall", "peak RSS", "images/s"], [
    ["`pipe query RUN IMAGE --json`, one process per image", f"{s['images']}", f"median {s['median_s']:.2f} s (max {s['max_s']:.2f} s)", f"{s['peak_rss_mb']:,} MB", f"{s['images_per_s']:.2f}"],
    ["`pipe query RUN --batch FOLDER`, one process", f"{b['images']:,}", f"{b['wall_s']:.1f} s", f"{b['peak_rss_mb']:,} MB", f"{b['images_per_s']:.1f}"],
    ["`pipe evaluate RUN FOLDER`, one process", f"{e['images']:,}", f"{e['wall_s']:.1f} s", f"{e['peak_rss_mb']:,} MB", f"{e['images_per_s']:.1f}"],
])}

The batch answers {d['ratio']:.0f}× the images per second of a loop of single queries and {d['batch_share_of_evaluate']:.0%} of what
`evaluate` scores (the rest: each image's decisive patterns and nearest training images, looked up and written). In one
process, after loading: an answer costs {w['warm_ms']:.0f} ms (median of {w['images']}); the nearest patterns of every patch of an
image (`run.nearest_patterns`) {w['all_patches_first_ms']:,.0f} ms for the first image, {w['all_patches_ms']:,.0f} ms (median of the later
half) once the run has met the common patterns (one search per distinct pattern; a learned pattern's answer is kept).
"""


def serving() -> str:
    d = load("serve.json")
    lat, ld, one = d["latency"], d["load"], d["load_one_worker"]
    return f"""## Serving

`python benchmarks/serve.py --run RUN --json --out benchmarks/results/serve.json` (RUN as above, {d['patterns']:,} patterns,
{d['image']} images): `pipe serve` on 127.0.0.1 with its default workers (one per core), asked from another process
whose client threads (PNG upload, JSON parsing) run on the same two cores.

{table(["", "requests", "requests/s", "p50", "p95", "max"], [
    ["one image per request, one client, warm", f"{lat['requests']}", "", f"{lat['p50_ms']:.0f} ms", f"{lat['p95_ms']:.0f} ms", f"{lat['max_ms']:.0f} ms"],
    [f"{ld['clients']} clients at once for {ld['seconds']:.0f} s", f"{ld['requests']:,}", f"{ld['requests_per_s']:.0f}", f"{ld['p50_ms']:,.0f} ms", f"{ld['p95_ms']:,.0f} ms", f"{ld['max_ms']:,.0f} ms"],
    ["the same, `--workers 1`", f"{one['requests']:,}", f"{one['requests_per_s']:.0f}", f"{one['p50_ms']:,.0f} ms", f"{one['p95_ms']:,.0f} ms", f"{one['max_ms']:,.0f} ms"],
])}

Under load the default answers {d['throughput_ratio']:.2f}× the requests of one worker, {ld['errors'] + one['errors']} errors; server memory (the
processes summed, shared pages counted in each) {ld['rss_start_mb']:,} → {ld['rss_end_mb']:,} MB (at most {ld['rss_max_mb']:,}), one worker
{one['rss_start_mb']:,} → {one['rss_end_mb']:,} MB. One `pipe query` process: {d['cli_single_s']:.1f} s.
"""


def pictures() -> str:
    if not (RESULTS / "pictures.json").exists():
        return ""
    d = load("pictures.json")
    return f"""## Pictures of code patterns

`python benchmarks/pictures.py --run RUN --out benchmarks/results/pictures.json` (RUN as above): the {d['code_patches']:,} decisive
code patches (top {d['top']}) of {d['images']} held-out images, each against the picture of its own pattern (d = 0). Mean absolute
difference to the patch's pixels (0-255), median: **{d['like_patch_mad']:.1f}** drawn in the patch's brightness and contrast (what
`pipe query --png` and the page show; 90th percentile {d['like_patch_mad_p90']:.1f}), {d['stored_mad']:.1f} with the atom stretched to 0-255.
"""


def familiarity() -> str:
    if not (RESULTS / "familiarity.json").exists():
        return ""
    d = load("familiarity.json")
    rows = [[k, f"{r['images']:,}", f"**{r['auroc']:.4f}**", f"{r['flagged']:.1%}", f"{r['median']:.3f}"] for k, r in d["kinds"].items()]
    rows.append(["all three", "", f"**{d['auroc_all']:.4f}**", "", ""])
    return f"""## Familiarity

`python benchmarks/familiarity.py --run RUN --out benchmarks/results/familiarity.json` (RUN as above; docs/query.md says what
the familiarity is): {d['images']:,} held-out CIFAR images not in the run's reference ({d['reference_images']:,} {d['reference']} images)
against images of other kinds. AUROC: the chance that a held-out image scores above an image of that kind. Under
{d['threshold']}: {d['flagged_in_distribution']:.1%} of the held-out images; {d['images_per_s']:,.0f} images/s.

{table(["other kind", "images", "AUROC", f"under {d['threshold']}", "median"], rows)}
"""


def incremental() -> str:
    d = load("incremental.json")
    ref = load("incremental_references.json")  # naive and retrain: they do not depend on --replay
    f, steps, pairs = d["final"], d["steps"], d["order"]
    rows = []
    for r, o in zip(steps, ref["steps"]):
        per = r["steps"]["per_step_classes"]
        rows.append([f"{r['step']}: {'/'.join(r['classes'])}", f"{r['steps']['seen']:.4f}", *(f"{o[s]['seen']:.4f}" if s in o else "" for s in ("naive", "retrain")),
                     " ".join(f"{per[p]:.2f}" for p in pairs if p in per),
                     f"{r['steps_seconds']:.0f} s, {max(r['steps_extract']['peak_rss_mb'], r['steps_train']['peak_rss_mb']):,} MB"])
    joint = steps[-1]["retrain"]["per_step_classes"]
    rows[-1][3] = f"{steps[-1]['retrain']['seen']:.4f} (joint, {steps[-1]['retrain_seconds']:.0f} s; per pair " + " ".join(f"{joint[p]:.2f}" for p in pairs) + ")"
    slices = ""
    if (RESULTS / "incremental_slices.json").exists():
        sl_all = load("incremental_slices.json")
        sl, sl_args = sl_all["final"], sl_all.get("extract_args", "")
        slices = (f" New images of known classes (`--scenario slices --no-naive --no-retrain --extract-args \"{sl_args}\" --train-args \"--lr 1 --drop 0\" --out benchmarks/results/incremental_slices.json`:"
                  f" the ten classes in five slices of their images): the last run {sl['steps']:.4f} against the joint run {sl['joint']:.4f};"
                  f" its last step took {100 * sl['last_step_share_of_joint']:.0f}% of the joint run's time.")
    return f"""## Learning in steps

`python benchmarks/incremental.py --no-naive --no-retrain --out benchmarks/results/incremental.json`: CIFAR-10, {d['per_class']:,} training and {d['held_out']:,} held-out images per class (first and last by file number), five steps of two classes. **steps**: `pipe extract --like` + `pipe train --from` the previous run (defaults); the joint run learns all images at once (same settings). **naive** (`--replay 0 --distill 0`) and **retrain** (from scratch on everything seen so far) come from the same benchmark's full run with `--step-args "--replay 1000" --extract-args "{ref.get('extract_args', '')}" --train-args "--lr 1 --drop 0"` (`incremental_references.json`; neither depends on `--replay`; its extracts had 1,024 atoms and its runs trained at `--lr 1 --drop 0`, where the defaults give these images 4,096 atoms, `--lr 0.3 --drop 0.3`, so they sit below the steps' figures; its joint run scored {ref['final']['joint']:.4f}, this run's {f['joint']:.4f}; its steps ended at {ref['final']['steps']:.4f}). Accuracy on the held-out images of the classes seen so far, then of each step's pair. After five steps: {f['steps']:.4f} against the joint {f['joint']:.4f} ({100 * f['steps_minus_joint']:+.2f} points), cat/dog {f['first_classes_steps']:.2f} against {f['first_classes_joint']:.2f}; the last step took {100 * f['last_step_share_of_joint']:.1f}% of the joint run's extract + train time.{slices}

{table(["step", "steps", "naive", "retrain", "steps, per pair", "steps: time, peak RSS"], rows)}
"""


def teach() -> str:
    d = load("teach.json")
    o, p = d["ours"], d["plain"]
    return f"""## Teaching from the page

`python benchmarks/teach.py --run RUN --out benchmarks/results/teach.json` (RUN: the CIFAR default run): {o['taught']} held-out images it got wrong taught their class one at a time, then {o['others']:,} other held-out images answered again. Each row's step divided by its training count (ours): {o['taught_answered_as_taught']:.0%} of the taught images answered as taught after the last lesson, the others {o['others_accuracy_before']:.4f} → {o['others_accuracy_after']:.4f} ({o['others_now_right']} now right, {o['others_now_wrong']} now wrong), {o['lesson_ms_median']:.0f} ms and {o['patterns_moved_median']:,.0f} patterns moved per lesson (median), the taught run saved in {o['save_seconds']:.1f} s. Plain gradient steps: {p['taught_answered_as_taught']:.0%}, the others {p['others_accuracy_before']:.4f} → {p['others_accuracy_after']:.4f} ({p['others_now_right']} now right, {p['others_now_wrong']} now wrong).
"""


BUDGET = {"seconds": 1200, "peak_rss_mb": 6000, "shards_mb": 5000, "run_mb": 1000}  # issue 25's budget for a default run


def factors_limit() -> str:
    """The limitations line on the gap to the patch papers, from the factors table."""
    text = ("- The soft-code papers reach 79.6% (Coates et al. 2011, 4,000 atoms) and 82% (Thiry et al. 2021: 2,048 atoms, both signs, "
            "overlapping pooling cells, a batch-normalised low-rank head trained 80 epochs with crops).")
    if not (RESULTS / "factors.json").exists():
        return text
    rows = load("factors.json")["rows"]

    def fits(r: dict) -> bool:
        secs = r["train"]["seconds"] + (r.get("extract") or {}).get("seconds", 0)
        peak = max(r["train"]["peak_rss_mb"], (r.get("extract") or {}).get("peak_rss_mb", 0))
        return secs <= BUDGET["seconds"] and peak <= BUDGET["peak_rss_mb"] and r["shards_mb"] <= BUDGET["shards_mb"] and r["run_mb"] <= BUDGET["run_mb"]

    best = max(rows, key=lambda r: r["val_accuracy"])
    within = max((r for r in rows if fits(r)), key=lambda r: r["val_accuracy"])
    budget = "the default's budget (20 min, 6 GB, 5 GB of shards, a 1 GB run)"
    which = (f" the best row, `{best['row']}` at {best['val_accuracy']:.4f}, fits {budget}" if best is within else
             f" the best row is `{best['row']}` at {best['val_accuracy']:.4f}, the best within {budget} `{within['row']}` at {within['val_accuracy']:.4f}")
    d = load("cifar_defaults.json")
    default = next((r for r in rows if r["val_accuracy"] == d["val_accuracy"]), None)
    if default is within:
        which += f"; `{within['row']}` is what the defaults do on these images"
    elif default is not None:
        se = 100 * math.sqrt(d["val_accuracy"] * (1 - d["val_accuracy"]) / d["val_images"])  # one standard error of a held-out accuracy
        above = [r for r in rows if r["val_accuracy"] > default["val_accuracy"]]
        dearer = all(r["train"]["peak_rss_mb"] > default["train"]["peak_rss_mb"] and r["train"]["seconds"] > default["train"]["seconds"] for r in above)
        names = ", ".join(f"`{r['row']}`" for r in above)
        which += (f"; the defaults do `{default['row']}` ({default['val_accuracy']:.4f}): the rows above it ({names})"
                  f" are at most {100 * (best['val_accuracy'] - default['val_accuracy']):.2f} points ahead, against one standard error of"
                  f" {se:.2f} points on {d['val_images']:,} held-out images" + (", and train slower in more memory" if dearer else ""))
    return (text + f" Of the factors measured here on all the images{which}."
            " None of the rows changes the kind of model: ours is a table over sparse keys whose training accuracy runs ahead of the held-out"
            " one from its second epoch, where the papers fit a normalised linear classifier on dense pooled codes to convergence with"
            " crops; a dense pooled code under our trainer or under a plain linear classifier (the pooled rows) scores below the sparse"
            " keys, so the rest of the gap is not in the encoding alone.")


def limitations() -> str:
    d = load("cifar_defaults.json")
    return f"""## Limitations

- At its best epoch the CIFAR run's training accuracy is {d['train_accuracy']:.4f} against {d['val_accuracy']:.4f} held out.
{factors_limit()}
- One 2-core machine, with other work on it at times: compare ratios within a run, not seconds across runs.
- How each default was chosen, and every earlier figure, is in CHANGELOG.md.
"""


def render() -> str:
    parts = [
        "# Results\n\nEvery figure below is read from a JSON file in `benchmarks/results/`, written by the command "
        "named in its section on the project's reference machine (2 cores, 24 GiB, no GPU); this page is "
        "rendered from them by `python benchmarks/results_page.py`. Rerun a command to check a figure.\n",
        cifar_defaults(), factors(), digits(), small_data(), coding_speed(), extract_engine(), training(), storage(), query(), answering(), pictures(), familiarity(), serving(),
        *([incremental()] if (RESULTS / "incremental.json").exists() else []),
        *([teach()] if (RESULTS / "teach.json").exists() else []), limitations(),
    ]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that docs/results.md is up to date")
    a = ap.parse_args()
    page = render()
    if a.check:
        if PAGE.read_text() != page:
            sys.exit("docs/results.md is not the rendering of benchmarks/results/*.json; run python benchmarks/results_page.py")
        return
    PAGE.write_text(page)
    print(f"wrote {PAGE} ({page.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
