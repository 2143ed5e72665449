"""pipe extract --like: new images keyed exactly as an earlier run or shard directory keyed its own."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline
from pipeline import layout
from tests.conftest import digits_images, write_folder
from tests.test_safety import cli, one_line_error


@pytest.mark.parametrize("kind", ["run", "shards"])
def test_new_images_get_the_earlier_keys(digits_run, digits_shards, tmp_path, kind):
    like = digits_run if kind == "run" else digits_shards
    r = cli("extract", "digits", "--split", "test", "--limit", "40", "--like", like, "--out", tmp_path / "new")
    assert r.exit_code == 0, r.output
    new = pipeline.Shards(tmp_path / "new")
    run = pipeline.load(digits_run)
    assert new.fingerprint == run.fingerprint == pipeline.Shards(digits_shards).fingerprint
    assert new.manifest["like"] == str(like.resolve())
    assert (tmp_path / "new" / layout.DICTIONARY).read_bytes() == (digits_shards / layout.DICTIONARY).read_bytes()
    images, _ = digits_images("test", 40)
    keys = np.concatenate([b.keys for b in new.iter_batches()])
    expected = run.images_to_keys(images)  # the run's own hashing of the same images
    np.testing.assert_array_equal(keys, expected)
    r = cli("evaluate", digits_run, tmp_path / "new", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 40, r.output


def test_images_that_do_not_fit_and_settings_given_twice_are_refused(digits_run, tmp_path):
    imgs, labs = digits_images("test", 6)
    colour = np.repeat(imgs, 3, axis=-1)
    colour[..., 0] = 255 - colour[..., 0]
    write_folder(tmp_path / "colour", colour, labs)
    one_line_error(cli("extract", tmp_path / "colour", "--like", digits_run, "--out", tmp_path / "a"), "images are colour, but")
    big = np.repeat(np.repeat(imgs, 2, axis=1), 2, axis=2)
    write_folder(tmp_path / "big", big, labs)
    one_line_error(cli("extract", tmp_path / "big", "--like", digits_run, "--out", tmp_path / "b"),
                   "images are 16x16 (height x width), but")
    one_line_error(cli("extract", "digits", "--like", digits_run, "--levels", "3", "--out", tmp_path / "c"), "leave out --levels")
    one_line_error(cli("extract", "digits", "--like", tmp_path, "--out", tmp_path / "d"), "is neither a run")
    for d in "abcd":
        assert not (tmp_path / d / layout.MANIFEST).exists()
