"""Every benchmark still runs: its --smoke --json setting (seconds each), checked for the keys the docs read and,
where both sides should agree, for identical outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke(*args: str) -> list[dict]:
    r = subprocess.run([sys.executable, *args, "--smoke", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_codes_benchmark_smoke():
    rows = smoke("benchmarks/codes.py")
    assert [r["group"] for r in rows] == ["default", "views"]
    assert rows[0]["code_shapes"] == "4x4" and rows[1]["code_shapes"] == "none"
    # 8x8 digits: every rectangle up to 3x3 in two exact views (levels, grad), keyed by grid cell: 2 * 21^2;
    # the default adds the code view's 5 nearest atoms at each of the (8 - 4 + 1)^2 places of a 4x4 patch
    exact = 2 * sum(9 - h for h in range(1, 4)) ** 2
    assert (rows[0]["keys_per_image"], rows[1]["keys_per_image"]) == (exact + 5 * 5**2, exact) == (1007, 882)
    assert (rows[0]["augment"], rows[1]["augment"]) == ("auto", "none")  # auto: no copies of gray images
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and r["best_epoch"] == 1 and r["rows"] > 0 and r["peak_rss_mb"] > 0 and r["run_mb"] > 0


def test_extract_codes_benchmark_smoke():
    (r,) = smoke("benchmarks/extract.py", "--codes")
    # ours and the numpy baseline agree (weights to float32 sums in another order: the baseline uses every BLAS thread)
    assert r["same_atoms"] > 0.99 and r["max_weight_difference"] < 1e-2
    # 200 digits images, the defaults resolved for 8x8 gray (one 4x4 code shape, k 5) over one worker per core
    assert (r["code_images"], r["code_shapes"], r["code_k"], r["workers"]) == (200, ["4x4"], 5, len(os.sched_getaffinity(0)))
    assert r["ratio"] == pytest.approx(r["ours_images_per_s"] / r["numpy_images_per_s"], abs=0.01)
    # the share is the reported GFLOP/s' quotient, up to their rounding (to 0.01 and 0.1 GFLOP/s, and the share to 0.001)
    ours, mm = r["ours_gflops"], r["numpy_matmul_gflops"]
    assert (ours - 0.005) / (mm + 0.05) - 0.0005 <= r["share_of_matmul"] <= (ours + 0.005) / (mm - 0.05) + 0.0005
    # the GFLOP/s are the images/s times the products' FLOPs per image: 25 patches x 2 x 16 x (16 atoms + 16 whitening)
    per_image = 25 * 2 * 16 * (16 + 16) / 1e9
    assert r["one_process_gflops"] == pytest.approx(r["ours_images_per_s"] * per_image, rel=0.02)
    assert r["ours_gflops"] == pytest.approx(r["workers_images_per_s"] * per_image, rel=0.02)


def test_code_ceiling_benchmark_smoke():
    """The reference reads one weight per atom and quadrant (16 atoms x 4 cells on digits' 4x4 code) for
    the 270 training and 30 held-out originals; the trainer scores the same 30."""
    (r,) = smoke("benchmarks/code_ceiling.py")
    ref, tr = r["reference"], r["trainer"]
    assert (ref["features"], ref["train_images"], ref["val_images"], ref["epochs"]) == (1024 * 4, 270, 30, 2)
    assert tr["val_images"] == ref["val_images"] and tr["best_epoch"] in (1, 2)
    assert 0.5 < ref["val_accuracy"] <= 1 and 0.5 < tr["val_accuracy"] <= 1  # ten digit classes: both far above chance


@pytest.mark.parametrize("script", ["benchmarks/digits.py"])
def test_digits_defaults_smoke(script):
    (r,) = smoke(script, "--defaults")
    assert len(r["ours"]["per_seed"]) == 1 and r["ours"]["runs"][0]["test_images"] == 899


needs_cifar = pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz").exists(),
                                 reason="the shared CIFAR-10 archive is not here")


@needs_cifar
def test_extract_benchmark_smoke():
    (r,) = smoke("benchmarks/extract.py")
    assert r["outputs_identical"] and r["full_outputs_identical"]  # both sides wrote the same keys
    # 32x32 images, every rectangle up to 3x3 (then up to 32x32) at stride 1:
    # (the positions per side summed over the sides)^2 patches per image
    assert (r["images"], r["full_images"]) == (40, 4)
    assert r["patches"] == 40 * sum(33 - h for h in range(1, 4)) ** 2 == 345_960
    assert r["full_patches"] == 4 * sum(33 - h for h in range(1, 33)) ** 2 == 1_115_136
    for pre in ("", "full_"):  # the ratio is the two sides' rates over the same patches
        assert r[pre + "ratio"] == pytest.approx(r[pre + "ours_patches_per_s"] / r[pre + "baseline_patches_per_s"], rel=1e-6)
    assert set(r["workers"]) == {"1"} and r["workers"]["1"]["images"] == 80
    assert [x["images"] for x in r["rss_default"]] == [40] and [x["images"] for x in r["rss_full"]] == [4]


def test_train_benchmark_smoke():
    (r,) = smoke("benchmarks/train.py")
    # 200 digits (8x8), every rectangle up to 3x3 keyed without and with the grid cell, no copies
    assert (r["images"], r["epochs"]) == (200, 1) and r["keys_per_image"] == 2 * sum(9 - h for h in range(1, 4)) ** 2 == 882
    assert r["ratio"] == pytest.approx(r["ids_per_s"] / r["baseline_ids_per_s"], rel=1e-6)
    assert r["wall_ratio"] == pytest.approx(r["baseline_wall_seconds"] / r["wall_seconds"], rel=1e-6)
    assert r["wall_seconds"] > r["ours"]["train_seconds"]
    assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["baseline_val_accuracy"] <= 1


def test_storage_benchmark_smoke():
    (r,) = smoke("benchmarks/storage.py")
    # 40 digits (8x8), every rectangle up to 3x3: 21^2 patches each
    assert (r["images"], r["source"], r["patches"]) == (40, "digits", 40 * sum(9 - h for h in range(1, 4)) ** 2) == (40, "digits", 17_640)
    cells = [(row["layout"], row["codec"], row["dictionary"]) for row in r["rows"]]
    grid = [(layout, codec, False) for layout in ("list", "list_nonnull", "binary", "long") for codec in ("lz4", "snappy", "zstd:1", "zstd:-5", "none")]
    assert cells == grid + [("list_nonnull", "snappy", True), ("binary", "snappy", False), ("binary", "snappy", False), ("binary_allkeys", "snappy", False)]
    assert all(row["bytes_per_patch"] > 0 for row in r["rows"])


def test_query_benchmark_smoke():
    (r,) = smoke("benchmarks/query.py")
    assert r["curve"][0]["index"] == "Flat" and r["curve"][0]["recall_at_10"] == 1.0  # exact search is its own truth
    assert any(c["index"].startswith("IVF") for c in r["curve"]) and all(0 <= c["recall_at_10"] <= 1 for c in r["curve"])
    # a small run's own index is exact (auto: flat up to 100,000 patterns), so it finds the true 10 nearest
    assert r["vectors"] <= 100_000 and r["index"] == "Flat" and r["recall_at_10"] == 1.0
    assert r["speedup"] == pytest.approx(r["queries_per_s"] / r["exact_queries_per_s"], rel=1e-9)
    assert set(r["accuracy"]) >= {"drop", "compose", "nearest", "knn_vote"} and r["default_rule"] == "drop"
    assert r["compose_accuracy_delta"] == pytest.approx(r["accuracy"]["compose"] - r["accuracy"]["drop"], abs=1e-12)


def test_options_benchmark_smoke():
    rows = smoke("benchmarks/options.py")
    assert [(r["group"], r["change"]) for r in rows] == [("default", "(none)"), ("bag", "--bag sum")]
    assert rows[0]["rows"] == rows[1]["rows"] > 0 and rows[0]["table_mb"] == rows[1]["table_mb"]  # the bag changes no table row
    assert all(r["drop_rate"] is None for r in rows)  # a fixed rate (0) is not learned


def test_digits_readers_benchmark_smoke():
    (r,) = smoke("benchmarks/digits_readers.py")
    assert r["held_out_images"] == 298 and r["head"]["per_seed"] and "raw_pixels_svc" in r


@pytest.mark.parametrize("script", ["benchmarks/index_load.py", "benchmarks/pattern_coverage.py", "benchmarks/vocab_memory.py"])
def test_benchmarks_of_an_existing_run_smoke(script):
    (r,) = smoke(script)
    if "index_load" in script:
        assert r["memory_mapped"]["vectors"] == r["read_whole"]["vectors"] > 0
    elif "coverage" in script:
        from pipeline.data.split import is_validation

        # the smoke run: 200 digits with no flags, the held-out part chosen by the split rule
        held = int(is_validation(np.arange(200), 0.1).sum())
        assert (r["train_images"], r["validation_images"]) == (200 - held, held)
        assert 0 < r["train"] <= 1 and 0 <= r["validation"] <= 1
        # one group per view and shape: the 4x4 code patch, and every rectangle up to 3x3 in both exact views
        shapes = [f"{h}x{w}" for h in (1, 2, 3) for w in (1, 2, 3)]
        assert sorted(r["groups"]) == sorted(["code 4x4 grid"] + [f"{v} {s} grid" for v in ("grad", "levels") for s in shapes])
        assert all(0 <= g[p] <= 1 for g in r["groups"].values() for p in ("train", "validation"))
    else:
        assert r["keys"] > 0 and set(r["steps_mb"]) == {"start", "after_vocabulary", "after_pyarrow_release", "after_malloc_trim"}


def test_rss_trace_smoke():
    (r,) = smoke("benchmarks/rss_trace.py")
    assert r["exit_code"] == 0 and r["max_rss_mb"] >= 200 and r["samples"] > 0


@pytest.mark.slow
@needs_cifar
def test_engines_benchmark_smoke():
    (r,) = smoke("benchmarks/engines.py")
    assert set(r["extract_s"]) == {"local_1", "ray_1"} and set(r["folder_extract_s"]) == {"local_1"}
    assert set(r["train_s"]) == {"pipe_train"} and set(r["query_s"]) == {"local_1"} and 0 <= r["train_val_accuracy"]["pipe_train"] <= 1


def test_defaults_benchmark_smoke():
    (r,) = smoke("benchmarks/defaults.py")
    from pipeline.data.split import is_validation

    assert r["images"] == 200 and 0 <= r["val_accuracy"] <= 1 and r["rows"] > 0
    # no flags on 8x8 gray images: grid 3, one 4x4 code shape, levels and grad views, no copies
    e = r["extract"]
    assert (e["grid"], e["code_shapes"], e["views"], e["augment"], e["color"], e["max_h"], e["max_w"]) == (3, "4x4", "levels,grad", "none", "gray", 3, 3)
    assert r["val_images"] == int(is_validation(np.arange(200), 0.1).sum())
    assert abs(r["total_minutes"] - (r["extract_s"] + r["train_s"]) / 60) <= 0.051  # rounded to 0.1 from unrounded seconds
    assert r["extract_peak_rss_mb"] > 0 and r["train_peak_rss_mb"] > 0 and r["run_mb"] > 0 and r["shards_mb"] > 0


def test_factors_benchmark_smoke():
    (r,) = smoke("benchmarks/factors.py")
    assert [row["row"] for row in r["rows"]] == ["base", "atoms"]
    assert all(0 <= row["val_accuracy"] <= 1 and row["train"]["seconds"] > 0 and row["shards_mb"] > 0 for row in r["rows"])
    assert r["rows"][1]["extract_flags"] == ["--atoms", "64"] and "extract" in r["rows"][1]
    # 200 digits: 882 exact keys (2 views x 21^2 rectangles) + 5 atoms x 9 places of the base's 6x6 code patch per image, whatever the atoms
    per_image = 2 * sum(9 - h for h in range(1, 4)) ** 2 + 5 * 3**2
    for row in r["rows"]:
        assert row["extract"]["summary"].startswith(f"200 images (8x8, 1 channel(s)), {200 * per_image:,} patches ({200 * per_image:,} keys)")
        assert row["train_flags"] == ["--epochs", "1"] and row["best_epoch"] == row["epochs_run"] == 1
    assert r["rows"][0]["extract_flags"] == []


def test_small_data_benchmark_smoke():
    (r,) = smoke("benchmarks/small.py")
    (row,) = r["rows"]
    assert row["train_images"] == 100 and row["scored_images"] == 899
    assert 0 < row["ours"] <= 1 and 0 < row["logistic_regression"] <= 1 and 0 < row["nearest_neighbour"] <= 1
    assert row["beats_both"] == (row["ours"] > max(row["logistic_regression"], row["nearest_neighbour"]))


def test_the_results_page_is_the_rendering_of_the_committed_json():
    r = subprocess.run([sys.executable, "benchmarks/results_page.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    page = (ROOT / "docs" / "results.md").read_text()
    assert page.count("\n") <= 250 and "previous default" not in page and "earlier default" not in page


def test_query_latency_benchmark_smoke():
    (r,) = smoke("benchmarks/query_latency.py")
    assert r["single"]["images"] == 2 and r["single"]["median_s"] > 0 and r["single"]["peak_rss_mb"] > 0
    assert r["batch"]["images"] == 50 and r["in_process"]["warm_ms"] > 0
    # the ratio is the two rates' (how fast each side is depends on the machine, so no bound on it)
    assert abs(r["ratio"] - r["batch"]["images_per_s"] / r["single"]["images_per_s"]) < 0.1
    assert abs(r["batch_share_of_evaluate"] - r["batch"]["images_per_s"] / r["evaluate"]["images_per_s"]) < 0.01


def test_serve_benchmark_smoke():
    (r,) = smoke("benchmarks/serve.py")
    assert r["latency"]["requests"] == 20 and r["latency"]["p50_ms"] > 0
    for load in (r["load"], r["load_one_worker"]):
        assert load["clients"] == 5 and load["requests"] > 0 and load["errors"] == 0 and load["healthy_after"]
    assert r["throughput_ratio"] == round(r["load"]["requests_per_s"] / r["load_one_worker"]["requests_per_s"], 2)


def test_incremental_benchmark_smoke():
    (r,) = smoke("benchmarks/incremental.py")
    assert [s["classes"] for s in r["steps"]] == [["3", "8"], ["0", "6"]]
    first, last = r["steps"]
    assert set(first["steps"]["per_step_classes"]) == {"3/8"} and set(last["steps"]["per_step_classes"]) == {"3/8", "0/6"}
    # the first step is the same run for all three; the joint run is the last retrain
    assert first["steps"] == first["naive"] == {"seen": first["steps"]["seen"], "per_step_classes": first["steps"]["per_step_classes"]}
    assert r["final"]["joint"] == last["retrain"]["seen"] and "retrain" not in first
    assert r["final"]["steps"] == last["steps"]["seen"] and r["final"]["naive"] == last["naive"]["seen"]
    assert last["steps_train"]["peak_rss_mb"] > 0 and last["naive_train"]["seconds"] > 0


def test_familiarity_benchmark_smoke():
    (r,) = smoke("benchmarks/familiarity.py")
    assert r["reference"] == "held-out, before the refit" and r["images"] == 200 and r["threshold"] == 0.01
    assert set(r["kinds"]) == {"flat colours", "noise"}
    assert all(k["images"] == 60 and k["flagged"] == 1.0 and k["median"] == 0.0 for k in r["kinds"].values())


def test_pictures_benchmark_smoke():
    (r,) = smoke("benchmarks/pictures.py")
    assert r["images"] == 30 and r["top"] == 5 and r["code_patches"] > 50
    assert r["like_patch_mad"] < r["stored_mad"]  # drawn in the patch's brightness and contrast, the atom is nearer the patch


def test_teach_benchmark_smoke():
    (r,) = smoke("benchmarks/teach.py")
    for side in (r["ours"], r["plain"]):
        assert side["taught"] == 5 and side["taught_answered_as_taught"] >= 0.6 and side["others"] == 300  # a later lesson may undo an earlier one
        # a wrong answer can change to another wrong one, so the two kinds of change are at most all changes
        assert side["others_now_right"] + side["others_now_wrong"] <= side["others_changed"]
        after = side["others_accuracy_before"] + (side["others_now_right"] - side["others_now_wrong"]) / side["others"]
        assert abs(after - side["others_accuracy_after"]) < 1e-9
        assert side["patterns_moved_median"] > 0 and side["save_seconds"] > 0
