"""The familiarity signal: its signs and p-values against definitions written out here, the run's
reference against the same signs measured at query time, and answers that carry it."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline
from pipeline import familiarity
from pipeline.table import index as pattern_index
from pipeline.data.images import encode_png
from pipeline.data.split import is_validation
from pipeline.query.evaluation import key_batches

from .conftest import digits_images


def test_signs_and_scores_follow_their_definitions():
    ids = np.array([[3, 3, -1, 7, 2, -1], [-1, -1, -1, -1, -1, -1], [5, 5, 5, 5, 5, 5]])
    d = np.array([[1.0, 2, 3, 4, 5, 99], [0, 0, 0, 0, 10, 99], [2, 2, 2, 2, 2, 2]])
    s = familiarity.signs(ids, d)
    assert s["seen"].tolist() == [4 / 6, 0.0, 1.0]
    assert s["variety"].tolist() == [3, 0, 1]  # distinct learned patterns: {2, 3, 7}, none, {5}
    assert s["distance"].tolist() == [3.0, 2.0, 2.0]  # the mean of the 5 nearest
    rng = np.random.default_rng(0)
    ref = {k: rng.integers(0, 20, 50).astype(float) for k in familiarity.SIGNS}
    r = familiarity.Reference(ref, "held-out")
    x = {k: rng.integers(-2, 22, 30).astype(float) for k in familiarity.SIGNS}

    def strangeness(d, i):  # the smallest share of reference images at least as unusual
        return min(np.mean(ref["distance"] >= d["distance"][i]), np.mean(ref["seen"] <= d["seen"][i]),
                   np.mean(ref["variety"] <= d["variety"][i]))

    own = [strangeness(ref, j) for j in range(50)]
    got = r.score(x)
    for i in range(30):  # the share of reference images no less strange
        assert got[i] == pytest.approx(np.mean(np.array(own) <= strangeness(x, i) + 1e-12))
    assert np.mean(r.score(ref) <= 0.1) <= 0.1 + 1e-9  # calibrated on the reference itself
    back = familiarity.Reference.load_bytes(r.to_bytes())
    assert back.source == "held-out" and all(np.array_equal(back.values[k], r.values[k]) for k in familiarity.SIGNS)


def test_the_reference_is_the_held_out_images_signs_as_a_query_measures_them(digits_shards, tmp_path):
    out = tmp_path / "run"
    pipeline.train(pipeline.Shards(digits_shards), out, pipeline.TrainConfig(epochs=2, dim=16, refit="off"))
    run = pipeline.load(out)
    ref = run.familiarity_reference
    assert ref.source == "held-out" and json.loads((out / "run.json").read_text())["familiarity"] == "held-out"
    keys, weights = [], []
    for b in key_batches(run, pipeline.Shards(digits_shards)):
        held = is_validation(b.image_ids, run.train_config.val_fraction)
        keys.append(b.keys[held])
        weights.append(b.weights[held])
    keys, weights = np.concatenate(keys), np.concatenate(weights)
    assert ref.images == len(keys) > 50
    pooled = run.classifier.pooled(keys, "drop", weights)
    d, _ = pattern_index.search(run.training_images.index, pooled, familiarity.NEIGHBOURS)
    want = familiarity.signs(run.vocab.own_ids(keys), d)
    for k in ("seen", "variety"):
        assert np.array_equal(np.sort(ref.values[k]), np.sort(want[k]))
    assert np.allclose(np.sort(ref.values["distance"]), np.sort(want["distance"]), rtol=1e-4, atol=1e-6)
    # the held-out images score as a sample of their own reference does: spread over (0, 1]
    f = run.familiarity_keys(keys, weights)
    assert 0.2 < np.median(f) < 0.8 and (f < familiarity.UNFAMILIAR).mean() < 0.05


def test_a_refit_keeps_the_choosing_models_reference_and_without_held_out_images_training_images_are_left_out(digits_run, digits_shards, tmp_path):
    run = pipeline.load(digits_run)  # refit: trained again on every image
    ref = run.familiarity_reference
    assert ref.source == "held-out, before the refit" and ref.images == 91
    pipeline.train(pipeline.Shards(digits_shards), tmp_path / "r0", pipeline.TrainConfig(epochs=1, dim=16, val_fraction=0))
    ref = pipeline.load(tmp_path / "r0").familiarity_reference
    assert ref.source == "training, each left out" and ref.images == min(familiarity.REFERENCE_IMAGES, 898)
    assert (ref.values["distance"] > 0).mean() > 0.9  # an image is not its own nearest neighbour


def test_answers_carry_the_familiarity_and_other_kinds_of_image_score_low(digits_run, tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    run = pipeline.load(digits_run)
    x, _ = digits_images("test", 50)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    flat = np.broadcast_to(rng.integers(0, 256, (20, 1, 1, 1), dtype=np.uint8), (20, 8, 8, 1)).copy()
    ok, bad = run.familiarity(x), np.concatenate([run.familiarity(noise), run.familiarity(flat)])
    assert ((0 <= ok) & (ok <= 1)).all() and np.median(ok) > 0.05
    assert (bad < familiarity.UNFAMILIAR).all()
    (tmp_path / "noise.png").write_bytes(encode_png(noise[0]))
    (tmp_path / "digit.png").write_bytes(encode_png(x[0]))
    r = CliRunner().invoke(main, ["query", str(digits_run), str(tmp_path / "noise.png"), str(tmp_path / "digit.png")])
    assert r.exit_code == 0 and "unlike the images this run learned from" in r.output.split("digit.png")[0]
    r = CliRunner().invoke(main, ["query", str(digits_run), str(tmp_path / "digit.png"), "--json"])
    assert json.loads(r.output)["familiarity"] == pytest.approx(float(ok[0]))
    res = pipeline.query_batch(run, pipeline.open_source("digits", split="test", limit=50), tmp_path / "r.parquet")
    import pyarrow.parquet as pq

    assert res["images"] == 50
    assert np.allclose(pq.read_table(tmp_path / "r.parquet").column("familiarity").to_numpy(), ok, atol=1e-6)


def test_predict_files_answers_with_class_names(digits_run, tmp_path):
    run = pipeline.load(digits_run)
    x, _ = digits_images("test", 3)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode_png(img if i < 2 else np.repeat(np.repeat(img, 2, 0), 2, 1)))  # the last one 16x16
    got = run.predict_files(paths)
    labels, probs = run.predict(x)
    assert [g["prediction"] for g in got[:2]] == [run.class_names[i] for i in labels[:2]]
    assert np.allclose([got[0]["probabilities"][c] for c in run.class_names], probs[0], atol=1e-6)
    assert got[0]["familiarity"] == pytest.approx(float(run.familiarity(x[:1])[0])) and got[0]["notes"] == []
    assert got[2]["notes"] == ["%s is 16x16 (height x width): fitted to the run's 8x8, scaled to cover it (proportions kept), then centre-cropped" % paths[2]]
