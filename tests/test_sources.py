"""Sources: splits, conversions, archives, arrays, and bad input, against independent references."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pipeline
from pipeline import PipelineError
from pipeline.data.images import encode_png, to_channels

from .conftest import digits_images, write_folder


def test_digits_split_matches_sklearn():
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images, d.target, test_size=0.5, shuffle=False)
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        imgs, labels = digits_images(split)
        assert imgs.shape == (len(x), 8, 8, 1)
        assert np.array_equal(imgs[..., 0], np.rint(x * 255 / 16).astype(np.uint8))
        assert np.array_equal(labels, y)


def test_digits_are_read_through_load_digits_where_the_csv_is_not_found(monkeypatch):
    """The shipped CSV is read without importing scikit-learn; with no file there, load_digits gives the same arrays."""
    import importlib.util

    from pipeline.data.sources import digits_arrays

    fast = digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    slow = digits_arrays()
    d = load_digits()
    for got in (fast, slow):
        assert np.array_equal(got[0], d.images) and np.array_equal(got[1], d.target)


def test_folder_and_tar_give_the_digits_pixels(tmp_path):
    imgs, labels = digits_images("train", 30)
    root = write_folder(tmp_path / "f", imgs, labels, split="train")
    for name, mode in (("f.tar.gz", "w:gz"), ("f.tar", "w")):
        with tarfile.open(tmp_path / name, mode) as tf:
            tf.add(root / "train", arcname="train")
    for spec in (root, tmp_path / "f.tar.gz", tmp_path / "f.tar"):
        src = pipeline.open_source(str(spec))
        assert src.split == "train" and len(src) == 30
        b = next(src.batches(100, 1))
        got = {n.rsplit("/", 1)[-1]: (img, src.class_names[lab]) for n, img, lab in zip(b.names, b.images, b.labels)}
        for i in range(30):
            img, cls = got[f"{i:04d}.png"]
            assert np.array_equal(img, imgs[i]) and cls == str(labels[i])


def test_workers_read_folder_files_and_plain_tar_members_themselves(tmp_path):
    """By reference, a folder's files and an uncompressed tar's members are not read by the
    caller: each image carries where its bytes are, and reading that gives the file's bytes."""
    from pipeline.data.sources import decode_raw, read_ref

    imgs, labels = digits_images("train", 12)
    root = write_folder(tmp_path / "f", imgs, labels)
    for name, mode in (("f.tar", "w"), ("f.tgz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as tf:
            for d in sorted(root.iterdir()):
                tf.add(d, arcname=d.name)
    for spec, by_ref in ((root, True), (tmp_path / "f.tar", True), (tmp_path / "f.tgz", False)):
        src = pipeline.open_source(str(spec))
        eager = [r for _, r in src.raw_images()]
        lazy = [r for _, r in src.raw_images(by_reference=True)]
        assert all(r.data is not None and r.ref is None for r in eager)
        assert all((r.data is None and r.ref is not None) == by_ref for r in lazy), spec
        if spec == root:
            assert all(open(r.ref[1], "rb").read() == e.data for r, e in zip(lazy, eager))
        for e, z in zip(eager, lazy):
            assert (read_ref(z.ref) if by_ref else z.data) == e.data
            assert np.array_equal(decode_raw(z, 1, None), decode_raw(e, 1, None))


def test_missing_split_and_empty_sources(tmp_path):
    imgs, labels = digits_images("train", 4)
    root = write_folder(tmp_path / "f", imgs, labels, split="train")
    with pytest.raises(PipelineError, match="has no test/ folder"):
        pipeline.open_source(str(root), split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no images"):
        pipeline.open_source(str(tmp_path / "empty"))
    with pytest.raises(PipelineError, match="does not exist"):
        pipeline.open_source(str(tmp_path / "nope"))


def test_unsafe_tar_member_is_refused(tmp_path):
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tf:
        data = encode_png(np.zeros((4, 4, 1), np.uint8))
        info = tarfile.TarInfo("../escape/cls/a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(PipelineError, match="unsafe member path"):
        pipeline.open_source(str(tar_path))


def test_truncated_tar(tmp_path):
    imgs, labels = digits_images("train", 20)
    root = write_folder(tmp_path / "f", imgs, labels)
    tar_path = tmp_path / "f.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(root, arcname=".")
    data = tar_path.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="truncated or not a tar archive"):
        pipeline.open_source(str(cut))


def test_rgb_to_gray_and_alpha_match_pillow():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(1, 9, 7, 3)).astype(np.uint8)
    ours = to_channels(rgb, 1)[0, ..., 0]
    assert np.array_equal(ours, np.asarray(Image.fromarray(rgb[0]).convert("L")))
    rgba = rng.integers(0, 256, size=(1, 5, 5, 4)).astype(np.uint8)
    expected = np.rint(rgba[0, ..., :3].astype(float) * rgba[0, ..., 3:4] / 255)
    assert np.abs(to_channels(rgba, 3)[0].astype(float) - expected).max() <= 1


def test_npz_and_cifar_batches(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(7, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 10, size=7)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    b = next(pipeline.open_source(str(tmp_path / "d.npz")).batches(10, 3))
    assert np.array_equal(b.images, x) and np.array_equal(b.labels, y)
    cdir = tmp_path / "cifar-10-batches-py"
    cdir.mkdir()
    with open(cdir / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    flat = x.transpose(0, 3, 1, 2).reshape(7, -1)
    with open(cdir / "data_batch_1", "wb") as f:
        pickle.dump({b"data": flat[:4], b"labels": y[:4].tolist()}, f)
    with open(cdir / "data_batch_2", "wb") as f:
        pickle.dump({b"data": flat[4:], b"labels": y[4:].tolist()}, f)
    src = pipeline.open_source(str(cdir))
    b = next(src.batches(10, 3))
    assert src.kind == "cifar" and src.class_names[0] == "c0"
    assert np.array_equal(b.images, x) and np.array_equal(b.labels, y)


def test_cifar_batch_with_foreign_objects_is_refused(tmp_path):
    cdir = tmp_path / "c"
    cdir.mkdir()
    with open(cdir / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"x": tmp_path}, f)  # a pathlib object: not allowed
    with pytest.raises(PipelineError, match="not a readable CIFAR batch"):
        pipeline.open_source(str(cdir))


def test_mixed_sizes_rejected_or_resized(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(encode_png(np.zeros((8, 8, 1), np.uint8)))
    (root / "a" / "1.png").write_bytes(encode_png(np.zeros((6, 8, 1), np.uint8)))
    src = pipeline.open_source(str(root))
    with pytest.raises(PipelineError, match=r"1\.png is 6x8 but earlier images are 8x8; pass `resize` 8x8"):
        list(src.batches(4, 1))
    b = next(src.batches(4, 1, resize=(8, 8)))
    assert b.images.shape == (2, 8, 8, 1)


def test_bad_files_fail_or_are_skipped(tmp_path):
    imgs, labels = digits_images("train", 3)
    root = write_folder(tmp_path / "f", imgs, labels)
    (root / str(labels[0]) / "broken.png").write_bytes(b"\x89PNG not really")
    (root / str(labels[0]) / "notes.txt").write_text("hello")
    with pytest.raises(PipelineError, match=r"cannot read .*(broken\.png|notes\.txt).*`skip_bad`"):
        list(pipeline.open_source(str(root)).batches(10, 1))
    src = pipeline.open_source(str(root), skip_bad=True)
    b = next(src.batches(10, 1))
    assert len(b.images) == 3 and sorted(p.rsplit("/", 1)[-1] for p in src.skipped) == ["broken.png", "notes.txt"]


def test_limit_and_per_class():
    src = pipeline.open_source("digits", per_class=2)
    b = next(src.batches(100, 1))
    assert len(src) == 20 and np.bincount(b.labels).tolist() == [2] * 10
    assert len(pipeline.open_source("digits", limit=5)) == 5


def test_truncated_jpeg_and_unknown_mode_are_named_with_a_fix(tmp_path):
    from pipeline.data.images import BadImage, decode

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3)).astype(np.uint8)).save(buf, format="JPEG")
    with pytest.raises(BadImage, match="not a readable image"):
        decode(buf.getvalue()[: len(buf.getvalue()) // 2], 3)
    buf16 = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, size=(8, 8)).astype(np.uint16)).save(buf16, format="PNG")
    with pytest.raises(BadImage, match="unsupported image mode 'I;16'; convert it to 8-bit"):
        decode(buf16.getvalue(), 1)
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "deep.png").write_bytes(buf16.getvalue())
    with pytest.raises(PipelineError, match=r"cannot read .*deep\.png: unsupported image mode.*`skip_bad`"):
        list(pipeline.open_source(str(tmp_path / "f")).batches(4, 1))


def test_holdout_divides_a_one_split_source_by_name_the_same_in_any_archive_order(tmp_path):
    """``holdout`` puts an image in split 'test' by a hash of its path below the split folder
    (reference: blake2b written out here), whatever order and wrapper the archive has;
    ``limit``/``per_class`` count in sorted-name order; a source with two splits refuses it."""
    import hashlib

    imgs, labels = digits_images("train", 60)
    root = write_folder(tmp_path / "f", imgs, labels, split="train")
    files = sorted(p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.png"))
    order = np.random.default_rng(0).permutation(len(files))
    with tarfile.open(tmp_path / "shuffled.tar.gz", "w:gz") as tf:  # archive order shuffled, inside a wrapper folder
        for i in order:
            tf.add(root / "train" / files[i], arcname=f"wrap/train/{files[i]}")

    def h(name):
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") % 10000 < 3000

    want_test = sorted(f for f in files if h(f))
    assert 5 < len(want_test) < 55
    for spec in (root, tmp_path / "shuffled.tar.gz"):
        got = {}
        for split in ("train", "test"):
            src = pipeline.open_source(str(spec), split=split, holdout=0.3)
            assert src.split == split and src.describe()["holdout"] == 0.3
            got[split] = sorted(n.split("train/", 1)[1] for b in src.batches(100, 1) for n in b.names)
        assert got["test"] == want_test
        assert got["train"] == sorted(set(files) - set(want_test))
        # the first 3 of each class and the first 7 overall, in sorted-name order, of the held-out part
        firsts = {}
        for f in want_test:
            firsts.setdefault(f.split("/")[0], []).append(f)
        want_pc = sorted(f for fs in firsts.values() for f in fs[:3])
        src = pipeline.open_source(str(spec), split="test", holdout=0.3, per_class=3)
        assert sorted(n.split("train/", 1)[1] for b in src.batches(100, 1) for n in b.names) == want_pc
        src = pipeline.open_source(str(spec), split="test", holdout=0.3, limit=7)
        assert sorted(n.split("train/", 1)[1] for b in src.batches(100, 1) for n in b.names) == want_test[:7]
    with pytest.raises(PipelineError, match="has no test/ folder.*`holdout` 0.1"):
        pipeline.open_source(str(root), split="test")
    with pytest.raises(PipelineError, match="has its own train and test; choose one with `split` and leave out `holdout`"):
        pipeline.open_source("digits", holdout=0.1)
    both = write_folder(tmp_path / "both", imgs[:4], labels[:4], split="train")
    write_folder(both, imgs[4:8], labels[4:8], split="test")
    with pytest.raises(PipelineError, match="has its own test and train folders"):
        pipeline.open_source(str(both), holdout=0.1)
    for bad in (0, 1, -0.5):
        with pytest.raises(PipelineError, match="holdout .* must be a share between 0 and 1"):
            pipeline.open_source(str(root), holdout=bad)
