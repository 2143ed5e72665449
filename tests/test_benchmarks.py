"""The code view's benchmarks still run (their --smoke modes, seconds each) and print what the docs read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and r["rows"] > 0 and r["peak_rss_mb"] > 0 and r["run_mb"] > 0


def test_extract_codes_benchmark_smoke():
    (r,) = smoke("benchmarks/extract.py", "--codes")
    assert r["same_atoms"] > 0.99 and r["max_weight_difference"] < 1e-3  # ours and the numpy baseline agree
    assert r["ours_gflops"] > 0 and r["numpy_matmul_gflops"] > 0 and r["ratio"] > 0


@pytest.mark.parametrize("script", ["benchmarks/digits.py"])
def test_digits_defaults_smoke(script):
    (r,) = smoke(script, "--defaults")
    assert len(r["ours"]["per_seed"]) == 1 and r["ours"]["runs"][0]["test_images"] == 899
