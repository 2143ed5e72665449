"""Inputs that used to give silent wrong answers: nested and linked class folders, one class,
unlabelled folders, augmented copies scored as test images, odd file names, duplicate tar
members, and the one decoding rule (formats, transparency, EXIF orientation)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.data.images import BadImage, decode, encode_png, file_channels
from pipeline.errors import PipelineError
from tests.conftest import digits_images
from tests.test_safety import SMALL, cli, one_line_error, small_config, small_run  # noqa: F401 (small_run is a fixture)


def _png(arr: np.ndarray) -> bytes:
    return encode_png(arr)


def _put(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(img))


# ------------------------------------------------------------------ 4. class folders

def test_4_a_files_class_is_its_first_folder_however_deep(tmp_path):
    imgs, _ = digits_images("test", 4)
    _put(tmp_path / "a" / "2019" / "x.png", imgs[0])
    _put(tmp_path / "a" / "2020" / "y.png", imgs[1])
    _put(tmp_path / "b" / "2019" / "z.png", imgs[2])
    _put(tmp_path / "b" / "w.png", imgs[3])
    src = pipeline.open_source(tmp_path)
    assert src.class_names == ["a", "b"]
    b = next(src.batches(10, 1))
    assert [(Path(n).relative_to(tmp_path).as_posix(), int(y)) for n, y in zip(b.names, b.labels)] == [
        ("a/2019/x.png", 0), ("a/2020/y.png", 0), ("b/2019/z.png", 1), ("b/w.png", 1)]


def test_4_a_single_wrapper_folder_is_looked_through_and_linked_class_folders_are_read(tmp_path):
    imgs, _ = digits_images("test", 3)
    _put(tmp_path / "data" / "wrap" / "train" / "cat" / "0.png", imgs[0])
    _put(tmp_path / "data" / "wrap" / "train" / "dog" / "1.png", imgs[1])
    _put(tmp_path / "elsewhere" / "2.png", imgs[2])
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "wrap" / "train" / "eel")
    src = pipeline.open_source(tmp_path / "data")
    assert src.split == "train" and src.class_names == ["cat", "dog", "eel"] and len(src) == 3


def test_4_training_on_one_class_is_refused(tmp_path):
    imgs, _ = digits_images("test", 6)
    for i, img in enumerate(imgs):
        _put(tmp_path / "src" / "only" / f"{i}.png", img)
        _put(tmp_path / "two" / ("p" if i < 5 else "q") / f"{i}.png", img)
    assert cli("extract", tmp_path / "src", "--out", tmp_path / "s", *SMALL).exit_code == 0
    one_line_error(cli("train", tmp_path / "s", "--out", tmp_path / "r"), "holds images of one class only ('only')")
    # --limit takes the first images in order, here all of class p
    assert cli("extract", tmp_path / "two", "--limit", "3", "--out", tmp_path / "s2", *SMALL).exit_code == 0
    one_line_error(cli("train", tmp_path / "s2", "--out", tmp_path / "r2"), "use --per-class")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


# ------------------------------------------------------------------ 17. a folder of unlabelled images

def test_17_a_folder_of_loose_images_is_queried_as_unlabelled(small_run, tmp_path):
    _, run = small_run
    imgs, _ = digits_images("test", 5)
    for i, img in enumerate(imgs):
        _put(tmp_path / "new" / f"{i}.png", img)
    r = cli("query", run, "--batch", tmp_path / "new", "--out", tmp_path / "q.parquet", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 5 and res["accuracy"] is None
    expected, _ = pipeline.load(run).predict(imgs)
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "q.parquet")
    names = pipeline.load(run).class_names
    assert t.column("prediction").to_pylist() == [names[int(c)] for c in expected]


def test_17_loose_images_beside_class_folders_are_refused(tmp_path):
    imgs, _ = digits_images("test", 2)
    _put(tmp_path / "a" / "0.png", imgs[0])
    _put(tmp_path / "stray.png", imgs[1])
    with pytest.raises(PipelineError, match="holds 1 images at its top level"):
        pipeline.open_source(tmp_path)


# ------------------------------------------------------------------ 5. shards with augmented copies

def test_5_evaluate_and_batch_query_of_shards_score_each_image_once(small_run, tmp_path):
    _, run = small_run
    pipeline.extract(pipeline.open_source("digits", split="test", limit=30), tmp_path / "t", small_config(), augment="flip")
    assert pipeline.Shards(tmp_path / "t").num_images == 60
    r = cli("evaluate", run, tmp_path / "t", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 30, r.output
    direct = pipeline.load(run).evaluate(pipeline.open_source("digits", split="test", limit=30))
    assert json.loads(r.stdout)["accuracy"] == direct["accuracy"]
    r = cli("query", run, "--batch", tmp_path / "t", "--out", tmp_path / "q.parquet", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == 30, r.output


# ------------------------------------------------------------------ 12. names and archives

def test_12_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(tmp_path):
    imgs, labs = digits_images("test", 4)
    root = tmp_path / "src"
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        d = os.path.join(os.fsencode(root), f"c{i % 2}".encode())
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, b"bad-\xff\xfe-%d.png" % i), "wb") as f:
            f.write(_png(img))
    for extra in ([], ["--skip-bad"]):
        out = tmp_path / f"s{len(extra)}"
        r = cli("extract", root, "--out", out, *SMALL, *extra)
        assert r.exit_code == 0, r.output
        names = [n for b in pipeline.Shards(out).iter_batches(names=True) for n in b.names]
        assert len(names) == 4 and all("bad-\\xff\\xfe-" in n for n in names)


def test_12_a_tar_with_a_member_twice_is_refused(tmp_path):
    imgs, _ = digits_images("test", 3)
    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w") as tf:
        for name, img in (("a/0.png", imgs[0]), ("b/1.png", imgs[1]), ("a/0.png", imgs[2])):
            data = _png(img)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    one_line_error(cli("extract", tar, "--out", tmp_path / "s", *SMALL), "holds the member 'a/0.png' more than once")


# ------------------------------------------------------------------ 15 and 14. one decoding rule

def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_15_palette_transparency_is_black_with_and_without_resize():
    p = Image.new("P", (4, 4))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    p.paste(1, (2, 0, 4, 4))  # right half blue, left half index 0
    data = _encoded(p, transparency=0)  # index 0 transparent
    plain = decode(data, 3)
    assert (plain[:, :2] == 0).all() and (plain[:, 2:] == [0, 0, 255]).all()
    big = decode(data, 3, (8, 8))
    assert (big[:, :3] == 0).all()  # never the palette's red
    assert (big[:, 5:] == [0, 0, 255]).all()


def test_15_gray_with_alpha_is_gray_composited_onto_black():
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = [[200, 100], [50, 255]]
    la[..., 1] = [[255, 128], [0, 255]]
    data = _encoded(Image.fromarray(la, "LA"))
    assert file_channels(data) == 1
    got = decode(data, None)
    expected = (la[..., :1].astype(np.uint32) * la[..., 1:] + 127) // 255
    assert got.shape == (2, 2, 1) and (got == expected).all()


def test_15_the_exif_orientation_is_applied():
    arr = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30
    img = Image.fromarray(arr, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show rotated 90 degrees clockwise
    got = decode(_encoded(img, exif=exif.tobytes()), 1)
    assert got.shape == (4, 2, 1)
    assert (got[..., 0] == np.rot90(arr, k=-1)).all()


def test_14_only_the_documented_formats_are_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(BadImage, match="not an image in a format read here"):
        decode(eps, 1)
    assert decode(_encoded(Image.new("L", (3, 3)), "BMP"), 1).shape == (3, 3, 1)
