"""The pattern table of a colour run with the default flip: every row agrees with where its key really occurs.

The reference is brute force over the shards' keys: for each vocabulary key, its first
occurrence in an original image, else in an augmented copy.
"""
from __future__ import annotations

import numpy as np
import pytest

import pipeline
from pipeline import ExtractConfig, TrainConfig
from pipeline.data import augment
from tests.conftest import digits_images, write_folder


@pytest.fixture(scope="session")
def colour_run(tmp_path_factory):
    imgs, labs = digits_images("train", 240)
    g = imgs[..., 0]
    # colour images whose right half differs from the mirror of the left, so some patterns occur only in flipped copies
    col = np.stack([g, (g // 2), np.roll(g, 3, axis=1)], -1)
    root = tmp_path_factory.mktemp("colour")
    write_folder(root / "images", col, labs)
    source = pipeline.open_source(root / "images")
    pipeline.extract(source, root / "shards", ExtractConfig(atoms=64))
    by_id = next(source.batches(len(source), 3)).images  # image id i = row i
    shards = pipeline.Shards(root / "shards")
    assert shards.manifest["augment"] == "flip" and shards.manifest["code_slots"] > 0
    pipeline.train(shards, root / "run", TrainConfig(epochs=1, dim=8))
    return by_id, shards, pipeline.load(root / "run")


def _first_occurrences(shards, vocab_keys: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(image id, slot) of each key's first occurrence, originals before copies, by brute force."""
    keys, ids = [], []
    for k, _, i, _ in shards.part_batches(False, val_fraction):
        keys.append(k)
        ids.append(i)
    keys, ids = np.concatenate(keys), np.concatenate(ids)
    first_img = np.full(len(vocab_keys), -1, np.int64)
    first_slot = np.full(len(vocab_keys), -1, np.int64)
    pos = {int(k): r for r, k in enumerate(vocab_keys)}
    for originals in (True, False):
        for a in np.flatnonzero(augment.is_original(ids) == originals):
            for j, k in enumerate(keys[a]):
                r = pos.get(int(k))
                if r is not None and first_img[r] < 0:
                    first_img[r], first_slot[r] = ids[a], j
    return first_img, first_slot


def test_no_pattern_row_contradicts_where_its_key_occurs(colour_run):
    col, shards, run = colour_run
    t = run.table.metadata
    trained_on = 0.0 if run.manifest["refit"] else run.train_config.val_fraction  # a refit trains on every image
    img, slot = _first_occurrences(shards, run.vocab.keys, trained_on)
    assert (img >= 0).all()
    only_in_copies = ~augment.is_original(img)
    assert only_in_copies.any(), "the data must hold patterns seen only in flipped copies"
    loc = run.plan.locate(slot)
    for c in ("h", "w", "cell", "view"):
        np.testing.assert_array_equal(t[c], loc[c], err_msg=c)
    np.testing.assert_array_equal(t["example_y"], loc["y"])
    np.testing.assert_array_equal(t["example_x"], loc["x"])
    np.testing.assert_array_equal(t["example_image"], img)


def test_every_pattern_picture_has_its_patterns_shape_and_exact_ones_are_the_patch(colour_run):
    col, _, run = colour_run
    t = run.table.metadata
    ids = np.arange(run.vocab.size)
    pics = run.pattern_pixels(ids)
    code = t["atom"] >= 0
    for i in ids:
        assert pics[i].shape == (t["h"][i], t["w"][i], 3)
        if code[i]:
            continue
        image_id = int(t["example_image"][i])
        base = col[image_id % augment.VARIANT_STRIDE]
        v = image_id // augment.VARIANT_STRIDE
        source = base if v == 0 else augment.variants(base, "flip")[v - 1]
        y, x, h, w = (int(t[c][i]) for c in ("example_y", "example_x", "h", "w"))
        np.testing.assert_array_equal(pics[i], source[y:y + h, x:x + w])


def test_query_pictures_of_every_test_image_are_drawn(colour_run, tmp_path):
    """What crashed: pictures of the nearest patterns of a colour image's patches."""
    col, _, run = colour_run
    from pipeline.query.pictures import query_png

    for n in range(5):
        look = run.nearest_patterns(col[-1 - n], k=3, patches=10)
        query_png(run, col[-1 - n], look, tmp_path / f"{n}.png")
        assert (tmp_path / f"{n}.png").stat().st_size > 0
