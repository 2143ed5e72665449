"""The extract engine: shard contents, workers, resume after a real kill, settings checks, the collision audit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import ExtractConfig, PipelineError
from pipeline.extraction.audit import audit, expected_collisions
from pipeline.extraction.hashing import KeyPlan
from pipeline.extraction.hashing import symbols
from pipeline.data.sources import from_arrays

from .conftest import digits_images, one_view_config

ROOT = Path(__file__).resolve().parents[1]


def _tables(d: Path) -> list:
    return [pq.read_table(f) for f in sorted(d.glob("part-*.parquet"))]


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_shards_hold_one_content_key_per_patch_and_read_back_as_keys(tmp_path):
    imgs, labels = digits_images("train", 40)
    cfg = one_view_config(color="gray", shapes="1x1,2x3,3x2", stride=2, position="both")
    m = pipeline.extract(from_arrays(imgs, labels), tmp_path / "s", cfg, images_per_shard=16)
    plan = KeyPlan(cfg, 8, 8)
    assert m["shapes"] == [[1, 1], [2, 3], [3, 2]] and m["stride"] == 2
    assert m["patches_per_image"] == 16 + 4 * 3 * 2 and [s["rows"] for s in m["shards"]] == [16, 16, 8]
    sh = pipeline.open_shards(tmp_path / "s")
    content = np.concatenate([b.keys for b in sh.iter_content()])
    assert np.array_equal(content, plan.content_keys(symbols(imgs, cfg.levels)))
    batches = list(sh.iter_batches())
    assert np.array_equal(np.concatenate([b.keys for b in batches]), plan.image_keys(imgs))
    assert np.array_equal(np.concatenate([b.labels for b in batches]), labels)
    assert m["bytes"] == sum(f.stat().st_size for f in (tmp_path / "s").glob("part-*.parquet"))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json"] + [s["file"] for s in m["shards"]]


def test_a_pass_over_the_shards_holds_one_shard_open_at_a_time(tmp_path):
    """An open Parquet file keeps memory from each row group it read until it is closed, so a pass
    (in order, or shuffled as the first training epoch reads) keeps at most one shard file open,
    and none once it ends or is abandoned; the keys are those of reading each group alone."""
    pipeline.extract(pipeline.open_source("digits"), tmp_path / "s", images_per_shard=100)
    sh = pipeline.open_shards(tmp_path / "s")
    groups = sh.row_groups()
    assert len(sh.files()) == 9

    root = str((tmp_path / "s").resolve())

    def open_shards() -> int:
        targets = (os.path.realpath(fd) for fd in Path("/proc/self/fd").iterdir())
        return sum(1 for t in targets if t.startswith(root) and t.endswith(".parquet"))

    order = [groups[i] for i in np.random.default_rng(0).permutation(len(groups))]
    seen = []
    for b in sh.iter_batches(groups=order):
        seen.append(open_shards())
        alone = next(sh.iter_batches(groups=[order[len(seen) - 1]]))
        assert np.array_equal(b.keys, alone.keys)
    assert len(seen) == len(groups) and max(seen) <= 1 and open_shards() == 0
    it = sh.iter_batches(groups=order)
    next(it)
    it.close()
    assert open_shards() == 0


def test_two_workers_write_the_same_shards_as_one(tmp_path):
    """The default extract (with its code view) in one process and in two: byte-identical shards."""
    src = pipeline.open_source("digits", limit=300)
    m1 = pipeline.extract(src, tmp_path / "one", images_per_shard=70, workers=1)
    m2 = pipeline.extract(src, tmp_path / "two", images_per_shard=70)  # one worker per core
    assert len(m1["shards"]) == 5 and m1["code_slots"] > 0
    assert m1["shards"] == m2["shards"]
    for a, b in zip(_tables(tmp_path / "one"), _tables(tmp_path / "two")):
        assert a.equals(b)


def _extract_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "extract", "digits", "--max-size", "8", "--images-per-shard", "1", "--out", str(out)]


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path):
    """Kill a real extract process mid-way with SIGKILL, rerun it, and compare with a run that was never interrupted."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_extract_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = killed / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_dir() and len(list(progress.glob("*.json"))) >= 20:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extract finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    done_before = len(list(progress.glob("*.json")))  # finished records; a record being written is a .json.tmp
    assert 20 <= done_before < 898
    with pytest.raises(PipelineError, match="no manifest.json"):
        pipeline.open_shards(killed)

    r = subprocess.run(_extract_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import re

    kept = int(re.search(r"\((\d+) shard\(s\) kept from an interrupted run\)", r.stdout).group(1))
    # a record is written only once its shard is in place, so every finished record is kept (a shard
    # renamed into place whose record was not yet written at the kill is redone)
    assert kept == done_before

    clean = tmp_path / "clean"
    r = subprocess.run(_extract_cmd(clean), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _manifest(killed) == _manifest(clean)
    files = sorted(p.name for p in clean.iterdir())
    # 898 shards, the manifest and the code view's dictionary (the resumed extract kept the one it had fitted)
    assert files == sorted(p.name for p in killed.iterdir()) and len(files) == 900
    for name in files:
        if name.endswith(".parquet"):
            assert (killed / name).read_bytes() == (clean / name).read_bytes(), name


def test_same_settings_resume_and_different_settings_are_refused(tmp_path):
    src = pipeline.open_source("digits", limit=50)
    out = tmp_path / "s"
    m = pipeline.extract(src, out, images_per_shard=20)
    again = pipeline.extract(src, out, images_per_shard=20)
    assert again["resumed_shards"] == 3 and again["shards"] == m["shards"]
    # (--levels 8 also changes what --max-size auto resolves to: 8**4 possible 2x2 contents fit 2**24, 8**9 do not)
    with pytest.raises(PipelineError, match=r"finished extract with different settings \(config.levels, config.max_h, config.max_w, fingerprint\).*`overwrite`"):
        pipeline.extract(src, out, pipeline.ExtractConfig(levels=8), images_per_shard=20)
    with pytest.raises(PipelineError, match=r"different settings \(compression\)"):
        pipeline.extract(src, out, images_per_shard=20, compression="zstd")
    m8 = pipeline.extract(src, out, pipeline.ExtractConfig(levels=8), images_per_shard=20, overwrite=True)
    assert m8["config"]["levels"] == 8 and m8["resumed_shards"] == 0
    # an unfinished extract (job file, no manifest) with other settings is refused too
    (out / "manifest.json").unlink()
    (out / "extract-job.json").write_text(json.dumps(m8["job"]))
    with pytest.raises(PipelineError, match="unfinished extract with different settings"):
        pipeline.extract(src, out, images_per_shard=20)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_every_codec_reads_back_the_same_keys(tmp_path, codec):
    imgs, labels = digits_images("train", 10)
    pipeline.extract(from_arrays(imgs, labels), tmp_path / codec, compression=codec)
    sh = pipeline.open_shards(tmp_path / codec)
    keys = np.concatenate([b.keys for b in sh.iter_batches()])
    assert np.array_equal(keys, KeyPlan(sh.config, 8, 8, sh.dictionary()).image_keys(imgs))


def test_bad_files_are_skipped_and_counted_per_shard(tmp_path):
    from .conftest import write_folder

    imgs, labels = digits_images("train", 6)
    root = write_folder(tmp_path / "f", imgs, labels)
    (root / str(labels[0]) / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(PipelineError, match=r"cannot read .*zz-broken\.png.*`skip_bad`"):
        pipeline.extract(pipeline.open_source(str(root)), tmp_path / "o", images_per_shard=2)
    m = pipeline.extract(pipeline.open_source(str(root), skip_bad=True), tmp_path / "o2", images_per_shard=2)
    assert m["images"] == 6 and [Path(p).name for p in m["skipped"]] == ["zz-broken.png"]
    assert sum(len(s["skipped"]) for s in m["shards"]) == 1 and sum(s["rows"] for s in m["shards"]) == 6


def test_all_images_bad_leaves_nothing_behind(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "f" / "a" / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(PipelineError, match="no readable images"):
        pipeline.extract(pipeline.open_source(str(tmp_path / "f"), skip_bad=True), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_settings_are_refused():
    with pytest.raises(PipelineError, match="is not a shape"):
        one_view_config(shapes="2x")
    with pytest.raises(PipelineError, match="stride 0"):
        one_view_config(stride=0)
    assert one_view_config(shapes="3x1, 1x1,2,1x1").shape_list() == [(1, 1), (2, 2), (3, 1)]
    with pytest.raises(PipelineError, match="workers -1"):
        pipeline.extract(pipeline.open_source("digits", limit=2), "/tmp/never", workers=-1)


# ------------------------------------------------------------------ collision audit

def _brute_force_counts(imgs: np.ndarray, cfg: ExtractConfig, bits: int) -> tuple[int, int]:
    """Distinct (shape, symbols) tuples and distinct keys, by enumerating every patch in Python."""
    plan = KeyPlan(cfg, imgs.shape[1], imgs.shape[2])
    syms = symbols(imgs, cfg.levels)
    keys = plan.content_keys(syms) & np.uint64((1 << bits) - 1 if bits < 64 else (1 << 64) - 1)
    contents, key_set = set(), set()
    for n in range(len(imgs)):
        j = 0
        for h, w in cfg.shape_list():
            for y in range(0, imgs.shape[1] - h + 1, cfg.stride):
                for x in range(0, imgs.shape[2] - w + 1, cfg.stride):
                    contents.add((h, w, tuple(syms[n, y : y + h, x : x + w].ravel().tolist())))
                    key_set.add(int(keys[n, j]))
                    j += 1
    return len(contents), len(key_set)


@pytest.mark.parametrize("bits", [64, 12])
def test_audit_counts_match_brute_force(bits):
    imgs, labels = digits_images("train", 25)
    cfg = one_view_config(color="gray", max_h=4, max_w=3)
    res = audit(from_arrays(imgs, labels), cfg, bits=bits)
    contents, keys = _brute_force_counts(imgs, cfg, bits)
    assert (res["distinct_contents"], res["distinct_keys"]) == (contents, keys)
    assert res["collisions"] == contents - keys
    if bits == 64:
        assert res["collisions"] == 0 and res["expected_collisions"] < 1e-6
    else:  # a planted collision: 12-bit keys cannot tell thousands of patterns apart
        assert res["collisions"] > 0
        assert 0.8 < res["collisions"] / res["expected_collisions"] < 1.25


def test_audit_with_contents_wider_than_64_bits():
    """Large patches of rgb symbols do not pack into 64 bits: they are compared as bytes, still exactly."""
    rng = np.random.default_rng(0)
    imgs = (rng.integers(0, 2, size=(6, 7, 7, 3)) * 255).astype(np.uint8)
    cfg = one_view_config(color="rgb", levels=16, max_h=7, max_w=7, stride=2)
    res = audit(from_arrays(imgs), cfg, bits=16)
    assert (res["distinct_contents"], res["distinct_keys"]) == _brute_force_counts(imgs, cfg, 16)


def test_expected_collisions():
    assert expected_collisions(2, 8) == pytest.approx(1 / 256)
    # exact expectation, by counting over every assignment of 3 items to 4 buckets
    import itertools

    lost = [3 - len(set(a)) for a in itertools.product(range(4), repeat=3)]
    assert expected_collisions(3, 2) == pytest.approx(sum(lost) / len(lost))
    assert expected_collisions(10**8, 64) == pytest.approx(10**16 / 2**65, rel=1e-6)


def test_cli_extract_audit_and_workers(tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    r = CliRunner().invoke(main, ["extract", "digits", "--limit", "100", "--workers", "2", "--images-per-shard", "30", "--audit", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "100 images" in r.stdout and "in 4 shard(s)" in r.stdout
    # 100 images x 441 patches per view (8x8 up to 3x3) x 2 views (levels,grad)
    assert "audit: 88,200 patches," in r.stdout and "-> 0 collision(s) (expected at 64 bits:" in r.stdout
    m = _manifest(tmp_path / "s")
    assert m["audit"]["collisions"] == 0 and m["audit"]["patches"] == 88200


def test_views_in_shards_and_audit(tmp_path):
    """Two quantizations side by side: shards read back as the plan's keys; the audit counts each view's contents."""
    imgs, labels = digits_images("train", 30)
    cfg = one_view_config(color="gray", max_h=2, max_w=3, views="levels,norm:2")
    m = pipeline.extract(from_arrays(imgs, labels), tmp_path / "s", cfg, images_per_shard=16)
    plan = KeyPlan(cfg, 8, 8)
    assert m["patches_per_image"] == plan.patches_per_image == 2 * KeyPlan(one_view_config(color="gray", max_h=2, max_w=3), 8, 8).patches_per_image
    keys = np.concatenate([b.keys for b in pipeline.open_shards(tmp_path / "s").iter_batches()])
    assert np.array_equal(keys, plan.image_keys(imgs))
    res = audit(from_arrays(imgs, labels), cfg)
    lo = imgs.min(axis=(1, 2, 3), keepdims=True).astype(int)
    hi = imgs.max(axis=(1, 2, 3), keepdims=True).astype(int)
    stretched = ((imgs.astype(int) - lo) * 255 // np.maximum(hi - lo, 1)).astype(np.uint8)
    single = [
        audit(from_arrays(x, labels), one_view_config(color="gray", max_h=2, max_w=3, levels=lv)) for x, lv in ((imgs, 4), (stretched, 2))
    ]
    assert res["distinct_contents"] == sum(s["distinct_contents"] for s in single)
    assert res["collisions"] == 0 and len(res["per_shape"]) == 2 * len(single[0]["per_shape"])


def test_augmented_copies_follow_their_image(tmp_path):
    """Each image is followed by its flipped and shifted copies (checked pixel by pixel); ids keep the split together."""
    from pipeline.data import augment
    from pipeline.data.split import is_validation

    imgs, labels = digits_images("train", 12)
    cfg = one_view_config(color="gray", max_h=2, max_w=2)
    m = pipeline.extract(from_arrays(imgs, labels), tmp_path / "s", cfg, augment="flip,shift:1", images_per_shard=5)
    assert m["variants_per_image"] == 1 + 8 and m["images"] == 12 * 10
    sh = pipeline.open_shards(tmp_path / "s")
    ids = np.concatenate([b.image_ids for b in sh.iter_content()])
    keys = np.concatenate([b.keys for b in sh.iter_content()])
    assert np.array_equal(ids.reshape(12, 10) % augment.VARIANT_STRIDE, np.repeat(np.arange(12)[:, None], 10, 1))
    plan = KeyPlan(cfg, 8, 8)
    img = imgs[3]
    want = [img, img[:, ::-1]]
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                shifted = pad[1 - dy : 9 - dy, 1 - dx : 9 - dx]
                assert shifted[4, 4, 0] == img[4 - dy, 4 - dx, 0]  # the content moved by (dy, dx)
                want.append(shifted)
    assert np.array_equal(keys[30:40], plan.content_keys(symbols(np.stack(want), cfg.levels)))
    assert np.array_equal(is_validation(ids, 0.3).reshape(12, 10), np.repeat(is_validation(np.arange(12), 0.3)[:, None], 10, 1))
    val_ids = np.concatenate([i for _, _, i, _ in sh.part_batches(True, 0.3)])
    assert (val_ids < augment.VARIANT_STRIDE).all() and len(val_ids) == is_validation(np.arange(12), 0.3).sum()
    with pytest.raises(pipeline.PipelineError, match="augment"):
        pipeline.extract(from_arrays(imgs, labels), tmp_path / "t", cfg, augment="rotate")


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_shards(tmp_path):
    """--engine ray on a local 2-CPU Ray instance: same manifest counts, same shard files' rows and keys."""
    pytest.importorskip("ray")
    import pyarrow.parquet as pq

    src = pipeline.open_source("digits", limit=300)
    local = pipeline.extract(src, tmp_path / "local", one_view_config(), images_per_shard=70)
    ray_m = pipeline.extract(src, tmp_path / "ray", one_view_config(), images_per_shard=70, engine="ray", workers=2)
    for k in ("images", "keys", "patches", "fingerprint", "shards", "skipped", "source", "config"):
        assert ray_m[k] == local[k], k
    assert len(local["shards"]) == 5
    for rec in local["shards"]:
        a, b = pq.read_table(tmp_path / "local" / rec["file"]), pq.read_table(tmp_path / "ray" / rec["file"])
        assert a.equals(b)  # row order too: each shard is written by one task, in source order


@pytest.mark.slow
def test_ray_engine_workers_read_a_folder_themselves(tmp_path):
    """From an image folder the Ray tasks carry file references and read the files on the
    workers; an unreadable file is still skipped by name, and the shards equal the local engine's."""
    pytest.importorskip("ray")
    from .conftest import write_folder

    imgs, labels = digits_images("train", 40)
    root = write_folder(tmp_path / "f", imgs, labels)
    (root / str(labels[0]) / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    src = pipeline.open_source(str(root), skip_bad=True)
    local = pipeline.extract(src, tmp_path / "local", images_per_shard=15)
    ray_m = pipeline.extract(src, tmp_path / "ray", images_per_shard=15, engine="ray", workers=2)
    assert local["images"] == ray_m["images"] == 40 and [Path(n).name for n in ray_m["skipped"]] == ["zz-broken.png"]
    assert ray_m["shards"] == local["shards"]
    for rec in local["shards"]:
        assert pq.read_table(tmp_path / "local" / rec["file"]).equals(pq.read_table(tmp_path / "ray" / rec["file"]))


def test_ray_engine_refuses_address_without_ray_engine(tmp_path):
    with pytest.raises(PipelineError, match="address goes with `engine` ray"):
        pipeline.extract(pipeline.open_source("digits", limit=5), tmp_path / "s", address="auto")


def test_ray_engine_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(PipelineError, match=r"pip install 'patchhash\[ray\]'"):
        pipeline.extract(pipeline.open_source("digits", limit=5), tmp_path / "s", engine="ray")
    assert not (tmp_path / "s").exists()
