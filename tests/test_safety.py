"""What a hostile tester tried: each failure reproduced, and the guard that now refuses it in one line.

Numbers in the test names refer to the items of docs/checks.md.
"""
from __future__ import annotations

import errno
import importlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline import ExtractConfig, PipelineError, TrainConfig, layout, outputs
from pipeline.data.images import encode_png

from .conftest import cli, digits_images, one_line_error

ROOT = Path(__file__).resolve().parents[1]
extract_mod = importlib.import_module("pipeline.extraction.stage")
trainer_mod = importlib.import_module("pipeline.training.loop")


SMALL = ["--levels", "2", "--max-size", "2", "--code-shapes", "none"]
QUICK = dict(epochs=1, dim=8)


def small_config(**kw) -> ExtractConfig:
    return ExtractConfig(levels=2, max_h=2, max_w=2, code_shapes="none", **kw)


def image_folder(root: Path, n: int = 12, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(encode_png(rng.integers(0, 256, (size, size, 1), dtype=np.uint8)))
    return root


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safety")
    pipeline.extract(pipeline.open_source("digits", limit=300), root / "s", small_config())
    pipeline.train(pipeline.open_shards(root / "s"), root / "r", TrainConfig(**QUICK))
    return root / "s", root / "r"


def copy_run(small_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(small_run[1], dst)
    return dst


# ------------------------------------------------------------------ 1. --overwrite removes only what pipe wrote

def test_1_overwrite_never_removes_the_input_or_the_working_directory(small_run, tmp_path, monkeypatch):
    shards, _ = small_run
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    one_line_error(cli("train", copy, "--out", copy, "--overwrite"), "is or holds the input")
    assert (copy / "manifest.json").exists() and pipeline.open_shards(copy).num_images == 300
    one_line_error(cli("train", copy, "--out", tmp_path, "--overwrite"), "is or holds the input")
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("extract", "digits", "--out", ".", "--overwrite", *SMALL), "current directory")
    one_line_error(cli("extract", "digits", "--out", tmp_path.parent, "--overwrite", *SMALL), "current directory")
    assert (copy / "manifest.json").exists()


def test_1_overwrite_refuses_a_directory_pipe_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line_error(cli("extract", "digits", "--limit", "50", "--out", mine, "--overwrite", *SMALL), "pipe did not write")
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a directory pipe wrote is replaced as before
    assert cli("extract", "digits", "--limit", "50", "--out", tmp_path / "s", *SMALL).exit_code == 0
    r = cli("extract", "digits", "--limit", "60", "--out", tmp_path / "s", "--overwrite", *SMALL)
    assert r.exit_code == 0, r.output
    assert pipeline.open_shards(tmp_path / "s").num_images == 60


# ------------------------------------------------------------------ 2. one writer per output

HOLD = """
import sys, time
from pathlib import Path
from pipeline import outputs
with outputs.locked(Path(sys.argv[1]), "pipe extract", file=sys.argv[2] == "file"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(path: Path, file: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "file" if file else "dir"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_2_a_second_writer_is_refused_and_a_dead_ones_lock_does_not_block(small_run, tmp_path):
    shards, run = small_run
    out = tmp_path / "s"
    holder = _holder(out)
    try:
        with pytest.raises(PipelineError, match=rf"being written by another pipe extract \(pid {holder.pid}\)"):
            pipeline.extract(pipeline.open_source("digits", limit=50), out, small_config())
        one_line_error(cli("train", shards, "--out", out, "--resume", "--epochs", "1"), "being written by another")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    m = pipeline.extract(pipeline.open_source("digits", limit=50), out, small_config())  # the kernel dropped the dead lock
    assert m["images"] == 50 and not (out / outputs.LOCK).exists()

    results = tmp_path / "results.parquet"
    holder = _holder(results, file=True)
    try:
        one_line_error(cli("query", run, "--batch", "digits", "--limit", "20", "--out", results), "being written by another")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli("query", run, "--batch", "digits", "--limit", "20", "--out", results).exit_code == 0
    assert not results.with_name("results.parquet.lock").exists()


SLOW_EXTRACT = """
import sys, time, importlib
import pipeline
ex = importlib.import_module("pipeline.extraction.stage")
real = ex.write_shard
def slow(task, progress=None):
    print("writing", flush=True)
    time.sleep(0.2)
    return real(task, progress)
ex.write_shard = slow
pipeline.extract(pipeline.open_source("digits", limit=20), sys.argv[1], pipeline.ExtractConfig(levels=2, max_h=2, max_w=2, code_shapes="none"),
                 images_per_shard=1, workers=1)  # in this process, where write_shard is the slow one
"""


@pytest.mark.slow
def test_2_two_real_extracts_into_one_directory(tmp_path):
    """Two extract processes at once: the second is refused in one line while the first writes, and
    the first finishes whole."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    a = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, str(tmp_path / "s")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert a.stdout.readline().strip() == "writing"
    b = subprocess.run([sys.executable, "-m", "cli.main", "extract", "digits", "--limit", "20", "--images-per-shard", "1",
                        "--out", str(tmp_path / "s"), *SMALL], cwd=ROOT, env=env, capture_output=True, text=True)
    a.communicate(timeout=120)
    assert b.returncode == 1 and b.stderr.count("\n") == 1 and "being written by another pipe extract" in b.stderr, b.stderr
    assert a.returncode == 0 and pipeline.open_shards(tmp_path / "s").num_images == 20


# ------------------------------------------------------------------ 3. resume after the source changed

def _npz(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y=np.arange(60) % 3)


def test_3_a_changed_source_is_not_mixed_into_a_resumed_extract(tmp_path, monkeypatch):
    src = tmp_path / "data.npz"
    _npz(src, 0)
    real = extract_mod.write_shard
    calls = []

    def dying(task, progress=None):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job stops with two shards written
        return real(task, progress)

    monkeypatch.setattr(extract_mod, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):  # one worker: write_shard runs in this process, where it is the dying one
        pipeline.extract(pipeline.open_source(str(src)), tmp_path / "s", small_config(), images_per_shard=10, workers=1)
    monkeypatch.setattr(extract_mod, "write_shard", real)
    _npz(src, 1)  # same name, same image count, other images
    with pytest.raises(PipelineError, match="has changed since an unfinished extract"):
        pipeline.extract(pipeline.open_source(str(src)), tmp_path / "s", small_config(), images_per_shard=10)
    m = pipeline.extract(pipeline.open_source(str(src)), tmp_path / "s", small_config(), images_per_shard=10, overwrite=True)
    fresh = pipeline.extract(pipeline.open_source(str(src)), tmp_path / "fresh", small_config(), images_per_shard=10)
    assert m["shards"] == fresh["shards"] and m["resumed_shards"] == 0


# ------------------------------------------------------------------ 4. truncated archives

def test_4_a_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    folder = image_folder(tmp_path / "f", n=20)
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        for p in sorted(folder.rglob("*.png")):
            tf.add(p, arcname=str(p.relative_to(folder)))
    assert len(pipeline.open_source(str(whole))) == 20
    with tarfile.open(whole) as tf:
        cut_at = tf.getmembers()[13].offset  # the header of member 13: what a partial download ends with
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(PipelineError, match="truncated"):
        pipeline.open_source(str(cut))
    one_line_error(cli("extract", cut, "--out", tmp_path / "s", *SMALL), "end-of-archive marker")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 5. workers die with the parent

@pytest.mark.slow
def test_5_extract_workers_die_with_a_killed_parent(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "cli.main", "extract", "digits", "--images-per-shard", "1", "--workers", "2",
           "--out", str(tmp_path / "s"), *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "s" / layout.PROGRESS_DIR
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (progress.is_dir() and len(list(progress.iterdir())) >= 5):
        time.sleep(0.01)
    workers = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
    assert len(workers) == 2, "the workers did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "extract workers outlived their parent"


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; it waits only for its (new) parent to reap it


# ------------------------------------------------------------------ 6. manifests and run files are checked

def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / layout.MANIFEST).read_text())
    edit(m)
    (root / layout.MANIFEST).write_text(json.dumps(m))


def test_6_a_manifest_that_does_not_match_its_shards_is_refused(tmp_path):
    pipeline.extract(pipeline.open_source("digits", limit=60), tmp_path / "s", small_config(), images_per_shard=20)
    cases = {
        "the manifest says 60": lambda m: m["shards"].pop(),
        "outside": lambda m: m["shards"][0].update(file="../other/part-00000-of-00003.parquet"),
        "bytes, the manifest says": lambda m: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 1),
        "rows, the manifest says": lambda m: m["shards"][0].update(rows=21),
        "is damaged": lambda m: m.pop("height"),
    }
    for message, edit in cases.items():
        case = tmp_path / f"case{len(message)}"
        shutil.copytree(tmp_path / "s", case)
        _edit_manifest(case, edit)
        with pytest.raises(PipelineError, match=message):
            pipeline.open_shards(case)
    one_line_error(cli("train", case, "--out", tmp_path / "r"), "is damaged")


def test_6_a_flipped_bit_in_an_uncompressed_shard_is_an_error(tmp_path):
    pipeline.extract(pipeline.open_source("digits", limit=60), tmp_path / "s", small_config(), compression="none")
    shard = pipeline.open_shards(tmp_path / "s").files()[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the patch keys' data page
    shard.write_bytes(bytes(data))
    sh = pipeline.open_shards(tmp_path / "s")  # size and row count still match
    with pytest.raises(PipelineError, match="is damaged"):
        list(sh.iter_batches())
    one_line_error(cli("train", tmp_path / "s", "--out", tmp_path / "r", "--epochs", "1"), "is damaged")


def test_6_index_files_of_another_run_are_refused(small_run, tmp_path):
    shards, run = small_run
    other = tmp_path / "other"
    pipeline.train(pipeline.open_shards(shards), other, TrainConfig(**QUICK, seed=1))  # same sizes, other vectors
    image = digits_images("test", 1)[0][0]
    for name in (layout.PATTERN_INDEX, layout.IMAGE_INDEX):
        r = copy_run(small_run, tmp_path / name)
        shutil.copy(other / name, r / name)
        with pytest.raises(PipelineError, match="another run's file"):
            loaded = pipeline.load(r)
            loaded.nearest_patterns(image, 1) if name == layout.PATTERN_INDEX else loaded.nearest_images(image[None], 1)


# ------------------------------------------------------------------ 7. files that are not images, or too large ones

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is one empty compressed block)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 30000])  # past our bound; past Pillow's own bomb bound
def test_7_huge_images_are_refused_from_their_header(tmp_path, side, small_run):
    folder = image_folder(tmp_path / "f")
    (folder / "c0" / "bomb.png").write_bytes(_png_header(side, side))
    one_line_error(cli("extract", folder, "--out", tmp_path / "s", *SMALL), "bomb.png")
    r = cli("extract", folder, "--out", tmp_path / "s", "--skip-bad", *SMALL)
    assert r.exit_code == 0 and "1 unreadable file(s) skipped" in r.output, r.output
    one_line_error(cli("query", small_run[1], folder / "c0" / "bomb.png"), "pixels")


def test_7_fifos_and_devices_are_refused_not_read(tmp_path):
    folder = image_folder(tmp_path / "f")
    os.mkfifo(folder / "c0" / "pipe.jpg")
    os.symlink("/dev/zero", folder / "c1" / "zero.png")
    r = subprocess.run([sys.executable, "-m", "cli.main", "extract", str(folder), "--out", str(tmp_path / "s"), *SMALL],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr, r.stderr
    r = cli("extract", folder, "--out", tmp_path / "s", "--skip-bad", *SMALL)
    assert r.exit_code == 0 and "2 unreadable file(s) skipped" in r.output, r.output


# ------------------------------------------------------------------ 8. labels

def test_8_unknown_labels_are_kept_for_query_and_left_out_of_training(tmp_path):
    x, y = digits_images("train", 200)
    y = y.copy()
    y[::4] = -1
    np.savez(tmp_path / "d.npz", x=x[..., 0], y=y)
    r = cli("extract", tmp_path / "d.npz", "--out", tmp_path / "s", *SMALL)
    assert r.exit_code == 0 and "50 image(s) without a label" in r.output, r.output
    m = pipeline.train(pipeline.open_shards(tmp_path / "s"), tmp_path / "r", TrainConfig(**QUICK))
    labelled = int((y >= 0).sum())
    assert m["final"]["train_images"] + m["final"]["val_images"] == labelled
    res = pipeline.query_batch(pipeline.load(tmp_path / "r"), pipeline.open_shards(tmp_path / "s"), tmp_path / "q.parquet")
    assert res["images"] == 200 and res["labelled"] == labelled


@pytest.mark.parametrize("labels, message", [
    (np.full(20, 10), "past only 10 class names"),
    (np.full(20, -2), "the label -2"),
    (np.arange(20) / 3, "not whole numbers"),
    (np.full(20, 10**9), "past the most this tool takes"),
    (np.array(["a"] * 20), "<U1 labels"),
    (np.zeros((20, 2), int), "1-D"),
    (np.array([object()] * 20), "cannot read y"),
])
def test_8_bad_labels_are_refused_at_extract(tmp_path, labels, message):
    x = np.zeros((20, 8, 8), np.uint8)
    extra = {"class_names": np.array([str(i) for i in range(10)])} if "class names" in message else {}
    np.savez(tmp_path / "d.npz", x=x, y=labels, **extra)
    one_line_error(cli("extract", tmp_path / "d.npz", "--out", tmp_path / "s", *SMALL), message)
    assert not (tmp_path / "s").exists()


def test_8_a_malformed_cifar_batch_is_one_line(tmp_path):
    import pickle

    root = tmp_path / "cifar"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}))  # no labels
    one_line_error(cli("extract", root, "--out", tmp_path / "s", *SMALL), "has no 'labels' entry")
    (root / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    one_line_error(cli("extract", root, "--out", tmp_path / "s", *SMALL), "not a CIFAR batch dict")


# ------------------------------------------------------------------ 9. numbers

@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--head-lr", "nan"], "--head-lr nan"),
    (["--init-std", "nan"], "--init-std nan"),
    (["--dim", "100000000"], "--dim 100000000"),
    (["--buckets", "1000000000000"], "GiB to train"),
])
def test_9_training_numbers_are_checked_before_anything_is_written(small_run, tmp_path, args, message):
    one_line_error(cli("train", small_run[0], "--out", tmp_path / "r", *args), message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--augment", "shift:100"], "quarter of their side"),
    (["--audit-images", "0"], "--audit-images goes with --audit"),
    (["--audit", "--audit-images", "0"], "must be at least 1"),
    (["--resize", "100000x100000"], "past 8192"),
])
def test_9_extract_numbers(tmp_path, args, message):
    one_line_error(cli("extract", "digits", "--out", tmp_path / "s", *SMALL, *args), message)
    assert not (tmp_path / "s").exists()


def test_9_query_and_index_numbers(small_run, tmp_path):
    run = copy_run(small_run, tmp_path)
    image = tmp_path / "x.png"
    image.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    one_line_error(cli("index", run, "--index", "flat", "--nprobe", "-4"), "--nprobe -4")
    assert pipeline.load(run).table.index_info.nprobe is None  # nothing was saved
    one_line_error(cli("query", run, image, "--patches", "-1"), "--patches -1")
    one_line_error(cli("query", run, image, "--k", "1000000000"), "--k 1000000000")
    one_line_error(cli("query", run, image, "--nprobe", "0"), "--nprobe 0")


def test_9_a_diverging_loss_stops_training_in_one_line(small_run, tmp_path, monkeypatch):
    real = trainer_mod.nn.functional.cross_entropy
    monkeypatch.setattr(trainer_mod.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    one_line_error(cli("train", small_run[0], "--out", tmp_path / "r", "--epochs", "1"), "training diverged in epoch 1")
    assert not (tmp_path / "r" / layout.RUN_MANIFEST).exists()


# ------------------------------------------------------------------ 10. options that would do nothing

def test_10_options_that_do_nothing_are_refused(small_run, tmp_path):
    shards, run = small_run
    image = tmp_path / "x.png"
    image.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    for flag in (["--limit", "10"], ["--split", "test"], ["--per-class", "3"], ["--skip-bad"]):
        one_line_error(cli("evaluate", run, shards, *flag), "is a shard directory")
        one_line_error(cli("query", run, "--batch", shards, "--out", tmp_path / "q.parquet", *flag), "is a shard directory")
    one_line_error(cli("query", run, "--batch", "digits", "--workers", "2", "--out", tmp_path / "q.parquet"), "goes with --engine ray")
    one_line_error(cli("query", run, image, "--workers", "2"), "go with --batch")
    one_line_error(cli("evaluate", run), "nothing to score: give SOURCE")
    one_line_error(cli("evaluate", run, shards, "--validation"), "not both")
    assert repr(pipeline.load(run)) == f"Run({str(run)!r}: 10 classes, 8x8x1 images, {pipeline.load(run).vocab.size:,} patterns)"
    one_line_error(cli("train", shards, "--out", tmp_path / "r", "--nproc", "2", "--cache-mb", "10"), "--cache-mb goes with one process")
    one_line_error(cli("train", shards, "--out", tmp_path / "r", "--nproc", "2", "--device", "cuda"), "--device goes with one process")


# ------------------------------------------------------------------ 11. a full disk and damaged files: one line, nothing half-written

def test_11_a_full_disk_is_one_line_and_leaves_nothing_that_looks_complete(small_run, tmp_path, monkeypatch):
    real = layout.write_json

    def full(path, obj):
        if Path(path).name == layout.MANIFEST:
            with open(layout.tmp_path(Path(path)), "w") as f:
                f.write("{")  # part of the file got out before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(layout.tmp_path(Path(path))))
        return real(path, obj)

    monkeypatch.setattr(layout, "write_json", full)
    one_line_error(cli("extract", "digits", "--limit", "40", "--out", tmp_path / "s", *SMALL), "No space left on device")
    assert not (tmp_path / "s" / layout.MANIFEST).exists()
    monkeypatch.setattr(layout, "write_json", real)

    import faiss

    def failing(*a, **k):
        raise RuntimeError("Error in faiss::FileIOWriter::operator() at impl/io.cpp:94: Error 'basic_ios::clear' writing")

    monkeypatch.setattr(faiss, "write_index", failing)
    one_line_error(cli("train", small_run[0], "--out", tmp_path / "r", "--epochs", "1", "--dim", "8"), "basic_ios::clear")
    assert not (tmp_path / "r" / layout.RUN_MANIFEST).exists() and not list((tmp_path / "r").glob("*.faiss.tmp"))
    monkeypatch.undo()

    import torch

    def torch_full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK")  # what got out before the disk filled
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_full)
    one_line_error(cli("train", small_run[0], "--out", tmp_path / "r2", "--epochs", "1", "--dim", "8"), "is the disk full?")
    assert not list((tmp_path / "r2").glob("*.pt")) and not list((tmp_path / "r2").glob("*.tmp"))


def test_11_damaged_run_files_are_one_line(small_run, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    cases = {
        "not a readable FAISS index": lambda r: (r / layout.PATTERN_INDEX).write_bytes(b"garbage" * 100),
        "model.safetensors is damaged or truncated (its header length": lambda r: (r / layout.WEIGHTS).write_bytes(_pickled_object()),
        "model.safetensors is damaged or truncated (tensor": lambda r: (r / layout.WEIGHTS).write_bytes((r / layout.WEIGHTS).read_bytes()[:-100]),
        "does not fit this run's vocabulary and settings (table.weight": _shrink_table,
        "is not valid JSON": lambda r: (r / layout.RUN_MANIFEST).write_text("{"),
        "is damaged (KeyError": lambda r: _edit_manifest_file(r / layout.RUN_MANIFEST, lambda m: m.pop("class_names")),
        "is damaged (ValueError": lambda r: _edit_manifest_file(r / layout.RUN_MANIFEST, lambda m: m.update(height="tall")),
    }
    for i, (message, damage) in enumerate(cases.items()):
        run = copy_run(small_run, tmp_path / str(i))
        damage(run)
        one_line_error(cli("query", run, image), message)


def _shrink_table(run: Path) -> None:
    from safetensors.numpy import save_file

    from pipeline.table import weights

    w = {k: np.array(v) for k, v in weights.load(run / layout.WEIGHTS, "").items()}
    w["table.weight"] = w["table.weight"][:-1]
    save_file(w, str(run / layout.WEIGHTS))


def test_11_a_checkpoint_holding_objects_is_refused_unread(tmp_path):
    from pipeline.training import run_files

    (tmp_path / layout.CHECKPOINT).write_bytes(_pickled_object())
    with pytest.raises(PipelineError, match="holds objects other than tensors, which are never loaded"):
        run_files.load(tmp_path / layout.CHECKPOINT, "start again")


def _edit_manifest_file(path: Path, edit) -> None:
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _pickled_object() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"table.weight": _Payload()}, buf)
    return buf.getvalue()


# ------------------------------------------------------------------ 12. advice that leads somewhere

def test_12_a_run_killed_before_its_first_checkpoint_starts_again(small_run, tmp_path, monkeypatch):
    shards, _ = small_run

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(pipeline.open_shards(shards), tmp_path / "r", TrainConfig(**QUICK))
    monkeypatch.undo()
    assert (tmp_path / "r" / layout.TRAIN_JOB).exists() and not (tmp_path / "r" / layout.CHECKPOINT).exists()
    one_line_error(cli("train", shards, "--out", tmp_path / "r", "--epochs", "1", "--dim", "8", "--resume"), "without --resume")
    r = cli("train", shards, "--out", tmp_path / "r", "--epochs", "1", "--dim", "8")  # what the message says
    assert r.exit_code == 0, r.output


def test_12_a_failed_device_leaves_nothing_that_blocks_a_rerun(small_run, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    shards, _ = small_run
    one_line_error(cli("train", shards, "--out", tmp_path / "r", "--device", "cuda", "--epochs", "1"), "no CUDA device")
    assert not (tmp_path / "r").exists()
    assert cli("train", shards, "--out", tmp_path / "r", "--epochs", "1", "--dim", "8").exit_code == 0
