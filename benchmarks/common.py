"""Helpers shared by the benchmarks: the shared CIFAR-10 images, timing, and peak memory of a child process."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"

# The extract settings the figures of train.py, query.py, engines.py and options.py in the docs
# were measured with: the defaults before issue 4 made the ordinal view with grid keys the
# default (--views levels,grad --position grid). Kept explicit so those figures stay reproducible.
# No code view, the 4x4 grid, patches up to 3x3 and no augmentation were the defaults then too.
MEASURED_EXTRACT = {"views": "levels", "position": "both", "code_shapes": "none", "grid": 4, "max_h": 3, "max_w": 3}
MEASURED_AUGMENT = "none"
# and the pipe train setting those figures (and options.py's table) were measured with, before
# --lr 1.0 became the default
MEASURED_TRAIN = {"lr": 0.5}


def measured_config(**changes):
    """ExtractConfig of MEASURED_EXTRACT with ``changes`` applied."""
    from pipeline import ExtractConfig

    return ExtractConfig(**{**MEASURED_EXTRACT, **changes})


def bench_train(current: bool, **changes):
    """TrainConfig of today's defaults (``current``) or of MEASURED_TRAIN, with ``changes`` applied
    (a change may override MEASURED_TRAIN's own settings)."""
    from pipeline import TrainConfig

    return TrainConfig(**{**({} if current else MEASURED_TRAIN), **changes})


def bench_augment(current: bool) -> str:
    """The ``augment`` of pipeline.extraction.stage for today's defaults (``current``) or the measured figures."""
    return "auto" if current else MEASURED_AUGMENT


def bench_config(current: bool, **changes):
    """Today's ExtractConfig defaults (``current``, a benchmark's ``--current-defaults``) or
    :func:`measured_config`, with ``changes`` applied."""
    from pipeline import ExtractConfig

    return ExtractConfig(**changes) if current else measured_config(**changes)


def emit(res: dict, out: Path | None, as_json: bool) -> bool:
    """Write a benchmark's result to ``out`` (when given) and print it as one JSON line with
    ``as_json``; True when printed (the caller's text table is then left out)."""
    if out:
        out.write_text(json.dumps(res, indent=1) + "\n")
    if as_json:
        print(json.dumps(res))
    return as_json


def cifar_source(n: int | None, path: Path = CIFAR_TAR, **kw):
    import pipeline

    if not path.exists():
        sys.exit(f"benchmark data {path} is missing; it is the shared CIFAR-10 archive (see ../shared/data/README.md)")
    return pipeline.open_source(str(path), limit=n, **kw)


def cifar_images(n: int, path: Path = CIFAR_TAR) -> tuple[np.ndarray, np.ndarray, float]:
    """The first ``n`` images of the archive as N x 32 x 32 x 3 uint8, their labels, and decode images/s."""
    src = cifar_source(n, path)
    t = time.perf_counter()
    batches = list(src.batches(1024, 3))
    dt = time.perf_counter() - t
    return np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]), n / dt


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Smallest wall time of ``repeat`` calls (the least disturbed by other load), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def proc_status_kb(pid: int | str = "self") -> dict[str, int] | None:
    """The memory fields (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``, ...) of ``/proc/PID/status``
    in kB; None once the process is gone or where there is no /proc."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines if ":" in line) if v.strip().endswith("kB")}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not count the parent's before exec)."""
    status = proc_status_kb()
    if status and "VmHWM" in status:
        return status["VmHWM"] / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_rss_mb(code: str) -> dict:
    """Run ``code`` in a fresh Python; it must print one JSON object. Adds the child's peak RSS in MB."""
    wrapper = code + "\nimport json as _j\nfrom benchmarks.common import peak_rss_mb as _p\nprint(_j.dumps(dict(RESULT, peak_rss_mb=_p())))\n"
    r = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def smoke_run(work: Path, images: int = 200) -> tuple[Path, Path]:
    """A tiny shard directory and run under ``work`` (digits, 1 epoch), for a benchmark's ``--smoke``
    setting that measures an existing run."""
    import pipeline
    from pipeline import TrainConfig

    pipeline.extract(pipeline.open_source("digits", limit=images), work / "shards")
    pipeline.train(pipeline.open_shards(work / "shards"), work / "run", TrainConfig(epochs=1, dim=16))
    return work / "shards", work / "run"


def run_arguments(doc: str, smoke: str) -> argparse.ArgumentParser:
    """The parser of a benchmark that measures a trained run: ``--run``, ``--source`` (the images it
    was trained on), ``--out``, ``--smoke`` (``smoke`` says what it measures) and ``--json``; the
    benchmark adds its own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run trained on --source")
    ap.add_argument("--source", default=str(CIFAR_TAR), help="the images the run was trained on")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--smoke", action="store_true", help=f"seconds: {smoke}")
    ap.add_argument("--json", action="store_true")
    return ap


def the_run(ap: argparse.ArgumentParser, a: argparse.Namespace, name: str, images: int = 400) -> Path:
    """The run a benchmark of :func:`run_arguments` measures: with ``--smoke`` a small digits run of
    ``images`` images made now (under a temporary folder named after ``name``), else ``--run``."""
    if a.smoke:
        return smoke_run(Path(tempfile.mkdtemp(prefix=f"{name}-")), images)[1]
    if a.run is None:
        ap.error("--run is required (or --smoke)")
    return a.run
