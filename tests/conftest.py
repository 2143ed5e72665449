"""Shared fixtures: small real data (digits), a trained digits run, and the shared CIFAR archive when present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import pipeline
from benchmarks.drive import free_port, start_server  # noqa: F401 (the one server driver, shared with the benchmarks)
from pipeline import ExtractConfig, TrainConfig
from pipeline.data.images import encode_png

ROOT = Path(__file__).resolve().parents[1]
# the CLI's progress lines would mix into the output the tests read (test_cli.py checks them on their own)
os.environ.setdefault("PIPE_PROGRESS", "off")
CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.tar.gz"


def digits_images(split: str = "train", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    src = pipeline.open_source("digits", split=split, limit=n)
    b = next(src.batches(len(src), 1))
    return b.images, b.labels


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    pipeline.extract(pipeline.open_source("digits"), out, ExtractConfig())
    return out


@pytest.fixture(scope="session")
def digits_run(digits_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_run") / "run"
    pipeline.train(pipeline.Shards(digits_shards), out, TrainConfig(epochs=4, dim=16))
    return out


def one_view_config(**kw) -> ExtractConfig:
    """One ``levels`` view with both position modes (the extract defaults before the ordinal
    view with grid keys became the default): what the hashing tests, their brute-force
    references and the golden keys are written for, without the code view, with the 4x4 grid and
    patches up to 3x3 that were the defaults then. ``kw`` overrides any field."""
    return ExtractConfig(**{"views": "levels", "position": "both", "code_shapes": "none", "max_h": 3, "max_w": 3, "grid": 4, **kw})


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, split: str | None = None) -> Path:
    """An image folder ROOT/[split/]<label>/<i>.png of the given images."""
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = root / split / str(lab) if split else root / str(lab)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(encode_png(img))
    return root


def cli(*args):
    """``pipe ARGS`` in process (click's runner), exceptions left to the test."""
    from click.testing import CliRunner

    from cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, pattern: str, code: int = 1) -> None:
    """A user mistake's answer: exit ``code``, one ``Error: ...`` line on stderr holding ``pattern``, no traceback."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


