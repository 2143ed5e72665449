"""A run's files under attack: planted links, FIFOs, devices, damaged tables, a full disk, other
commands writing into a run. Each is one line (``Error: ...``, exit 1), never a traceback, a hang
or a write outside the run."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.extraction import codes
from tests.conftest import ROOT, digits_images
from tests.test_safety import cli, copy_run, one_line_error, small_run  # noqa: F401 (small_run is a fixture)
from pipeline.data.images import encode_png


@pytest.fixture()
def image(tmp_path) -> Path:
    p = tmp_path / "x.png"
    p.write_bytes(encode_png(digits_images("test", 1)[0][0]))
    return p


# ------------------------------------------------------------------ 6. nobody writes into a run but its owner

def test_6_no_command_writes_into_a_run_or_shard_directory(small_run, tmp_path, image):
    shards, run0 = small_run
    run = copy_run(small_run, tmp_path)
    before = (run / layout.PATTERNS).read_bytes()
    one_line_error(cli("query", run, "--batch", "digits", "--limit", "5", "--out", run / layout.PATTERNS), "a directory pipe extract or pipe train wrote")
    one_line_error(cli("query", run, "--batch", "digits", "--limit", "5", "--out", shards / "results.parquet"), "only they write there")
    one_line_error(cli("query", run, image, "--png", run / "pictures"), "is inside")
    assert (run / layout.PATTERNS).read_bytes() == before and not (run / "pictures").exists()
    assert cli("query", run, image).exit_code == 0


# ------------------------------------------------------------------ 8. temporary files never follow a link

def test_8_a_link_planted_at_a_temporary_name_is_not_followed(small_run, tmp_path):
    run = copy_run(small_run, tmp_path)
    outside = tmp_path / "outside.bin"
    os.symlink(outside, run / (layout.PATTERN_INDEX + ".tmp"))
    assert cli("index", run, "--index", "hnsw").exit_code == 0
    assert not outside.exists()
    assert not (run / (layout.PATTERN_INDEX + ".tmp")).exists()
    # and a link to an existing file is removed, not written through
    outside.write_bytes(b"keep me")
    os.symlink(outside, run / (layout.RUN_MANIFEST + ".tmp"))
    assert cli("index", run, "--index", "flat").exit_code == 0
    assert outside.read_bytes() == b"keep me"


# ------------------------------------------------------------------ 18. a commit point reaches the disk in order

def test_18_an_atomic_write_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("sync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    layout.write_json(tmp_path / layout.MANIFEST, {"a": 1})
    assert events == ["sync file", "rename", "sync dir"]
    assert json.loads((tmp_path / layout.MANIFEST).read_text()) == {"a": 1}


# ------------------------------------------------------------------ 9. damaged run files are one line

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _object_vocab(run: Path) -> None:
    with np.load(run / layout.VOCAB) as z:
        arrays = dict(z)
    arrays["keys"] = np.array([object()] * 3, dtype=object)
    with open(run / layout.VOCAB, "wb") as f:
        np.savez(f, **arrays)


def _fewer_patterns(run: Path) -> None:
    t = pq.read_table(run / layout.PATTERNS)
    pq.write_table(t.slice(0, len(t) - 1), run / layout.PATTERNS)


def _huge_image(run: Path) -> None:
    m = json.loads((run / layout.RUN_MANIFEST).read_text())
    m["height"] = 100000
    (run / layout.RUN_MANIFEST).write_text(json.dumps(m))


DAMAGE = {
    "vocab.npz is not a readable vocabulary": lambda r: _truncate(r / layout.VOCAB),
    "vocab.npz is not a readable vocabulary (ValueError: Object arrays": _object_vocab,
    "patterns.parquet is not a readable Parquet file": lambda r: _truncate(r / layout.PATTERNS),
    "images.parquet is not a readable Parquet file": lambda r: (r / layout.IMAGES).write_bytes(b"not parquet at all" * 10),
    "rows but the run has": _fewer_patterns,
    "is damaged (images of 100000x8": _huge_image,
}


@pytest.mark.parametrize("message", list(DAMAGE))
def test_9_damaged_run_files_are_one_line(small_run, tmp_path, image, message):
    run = copy_run(small_run, tmp_path)
    DAMAGE[message](run)
    one_line_error(cli("query", run, image), message)
    one_line_error(cli("info", run), message)


def test_9_fifos_and_devices_in_a_run_are_refused_without_reading(small_run, tmp_path):
    """Each in its own process with a time limit: a regression here would hang, not fail."""
    cases = {}
    for name in (layout.RUN_MANIFEST, layout.VOCAB, layout.PATTERNS, layout.PATTERN_INDEX, layout.WEIGHTS):
        run = copy_run(small_run, tmp_path / name)
        (run / name).unlink()
        os.mkfifo(run / name)
        cases[name] = run
    run = copy_run(small_run, tmp_path / "zero")
    (run / layout.RUN_MANIFEST).unlink()
    os.symlink("/dev/zero", run / layout.RUN_MANIFEST)
    cases["/dev/zero"] = run
    procs = {name: subprocess.Popen([sys.executable, "-m", "cli.main", "info", str(run)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, run in cases.items()}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"pipe info hangs on a {name} that is not a regular file")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and "is not a regular file" in lines[0], (name, err)


# ------------------------------------------------------------------ 10. a full disk while the weights are written

def test_10_a_full_disk_while_the_weights_are_written_is_one_line_on_a_real_tmpfs(tmp_path):
    import torch

    from pipeline.training import run_files

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        with pytest.raises(PipelineError, match=r"cannot write .*model.safetensors .*is the disk full\?"):
            run_files.save_weights({"table.weight": torch.zeros(1 << 20)}, mnt / layout.WEIGHTS)
        assert list(mnt.iterdir()) == []  # nothing half-written under any name
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------------------------ 11. dictionaries are checked

@pytest.fixture(scope="session")
def a_dictionary(tmp_path_factory) -> Path:
    import pipeline
    from tests.test_safety import small_config

    out = tmp_path_factory.mktemp("dict") / "s"
    pipeline.extract(pipeline.open_source("digits", limit=60), out, pipeline.ExtractConfig(levels=2, max_h=2, max_w=2, code_shapes="4x4", atoms=16))
    return out / layout.DICTIONARY


def _damaged(src: Path, dst: Path, change) -> Path:
    d = codes.Dictionary.load(src)
    change(d)
    d.save(dst)
    return dst


@pytest.mark.parametrize("what,change,message", [
    ("nan", lambda d: d.shapes[0].atoms.__setitem__((0, 0), np.nan), "not all finite"),
    ("whiten", lambda d: setattr(d.shapes[0], "whiten", d.shapes[0].whiten[:-1]), "have shapes"),
    ("atoms", lambda d: setattr(d.shapes[0], "atoms", d.shapes[0].atoms[:, :-1]), "have shapes"),
])
def test_11_a_damaged_dictionary_is_one_line(a_dictionary, tmp_path, what, change, message):
    bad = _damaged(a_dictionary, tmp_path / f"{what}.npz", change)
    one_line_error(cli("extract", "digits", "--limit", "20", "--levels", "2", "--max-size", "2", "--code-shapes", "4x4",
                       "--dictionary", bad, "--out", tmp_path / "o"), "is not a patchhash dictionary")
    one_line_error(cli("extract", "digits", "--limit", "20", "--levels", "2", "--max-size", "2", "--code-shapes", "4x4",
                       "--dictionary", bad, "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o" / layout.MANIFEST).exists()


def test_11_shapes_with_different_atom_counts_are_refused(a_dictionary, tmp_path):
    d = codes.Dictionary.load(a_dictionary)
    s = d.shapes[0]
    two = codes.Dictionary([s, codes.ShapeCode(s.h, s.w, s.mean, s.whiten, np.concatenate([s.atoms, s.atoms[:1]]))], d.channels)
    two.save(tmp_path / "two.npz")
    with pytest.raises(PipelineError, match=r"atoms per shape \[16, 17\]"):
        codes.Dictionary.load(tmp_path / "two.npz")


def test_11_a_fifo_as_dictionary_is_refused(tmp_path):
    os.mkfifo(tmp_path / "d.npz")
    with pytest.raises(PipelineError, match="is not a regular file"):
        codes.Dictionary.load(tmp_path / "d.npz")
