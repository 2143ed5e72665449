"""The mirror vote: an image scored as the bag of its own patches and its left-right mirror's, the
same way in training's held-out part, ``evaluate`` (shards or a source), ``predict`` and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline
from pipeline import ExtractConfig, TrainConfig
from pipeline.data import augment
from pipeline.data.split import is_validation
from pipeline.errors import ParameterError
from pipeline.extraction.hashing import KeyPlan

from .conftest import cli, digits_images, one_line_error

FRACTION = 0.25
CFG = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=16, code_k=3, grid=2, code_sample=2000)


def _colour_images(n):
    """RGB images (from digits) whose channels differ and are not left-right symmetric."""
    imgs, labels = digits_images("train", n)
    g = imgs[..., 0]
    return np.stack([g, g // 2, np.roll(g, 3, axis=1)], -1), labels


@pytest.fixture(scope="session")
def voted(tmp_path_factory):
    """(images, labels, shards, run) of a flip extract and a run trained on it with the defaults."""
    root = tmp_path_factory.mktemp("vote")
    imgs, labels = _colour_images(160)
    pipeline.extract(pipeline.from_arrays(imgs, labels), root / "shards", CFG, augment="flip", images_per_shard=40)
    pipeline.train(pipeline.open_shards(root / "shards"), root / "run", TrainConfig(epochs=2, dim=8, val_fraction=FRACTION, refit="off"))
    return imgs, labels, pipeline.open_shards(root / "shards"), pipeline.load(root / "run")


def test_the_held_out_part_pairs_each_image_with_its_mirror(voted):
    """part_groups(vote=v) gives each held-out original's keys followed by those of its copy v, the
    same rows as looking every image up by id."""
    _, _, sh, _ = voted
    v = sh.mirror_variant
    assert v == 1
    by_id = {}
    for b in sh.iter_batches():
        for i, image in enumerate(b.image_ids):
            by_id[int(image)] = (b.keys[i], b.weights[i], int(b.labels[i]))
    seen = []
    for _, (keys, labels, ids, weights) in sh.part_groups(True, FRACTION, vote=v):
        for i, image in enumerate(ids):
            own, twin = by_id[int(image)], by_id[int(image) + v * augment.VARIANT_STRIDE]
            assert np.array_equal(keys[i], np.concatenate([own[0], twin[0]]))
            assert np.array_equal(weights[i], np.concatenate([own[1], twin[1]]))
            assert labels[i] == own[2]
        seen += [int(i) for i in ids]
    originals = np.array([i for i in by_id if i < augment.VARIANT_STRIDE])
    assert sorted(seen) == sorted(originals[is_validation(originals, FRACTION)].tolist())


def test_keys_with_mirrors_are_the_mirrored_images_keys(voted):
    """encode_with_mirrors: the second half of each row is the flipped image's own keys (its code taken
    from the original's, weights equal up to float rounding)."""
    imgs, _, sh, _ = voted
    plan = KeyPlan(sh.config, 8, 8, sh.dictionary())
    both, weights = plan.encode_with_mirrors(imgs[:20])
    own_k, own_w = plan.encode(imgs[:20])
    mir_k, mir_w = plan.encode(np.ascontiguousarray(imgs[:20, :, ::-1]))
    k = plan.keys_per_image
    assert np.array_equal(both[:, :k], own_k) and np.array_equal(weights[:, :k], own_w)
    code = plan.is_code(np.arange(k))
    assert np.array_equal(both[:, k:][:, ~code], mir_k[:, ~code])
    # a symmetric patch ties an atom with its mirror exactly: there the two codings may name either
    assert (both[:, k:][:, code] == mir_k[:, code]).mean() > 0.9
    np.testing.assert_allclose(np.sort(weights[:, k:], 1), np.sort(mir_w, 1), rtol=1e-4, atol=1e-4)
    stored = {int(i): kk for b in sh.iter_batches() for i, kk in zip(b.image_ids, b.keys)}
    copies = np.stack([stored[i + augment.VARIANT_STRIDE] for i in range(20)])
    assert np.array_equal(both[:, k:], copies)  # what the extract wrote for the flipped copies


def test_predictions_pool_the_image_and_its_mirror_as_one_bag(voted):
    """predict's probabilities equal the trained torch model's on the bag of both halves' keys
    (the training path), and differ from scoring the image alone."""
    imgs, _, _, run = voted
    assert run.mirror_vote and run.train_config.vote == "mirror"
    _, probs = run.predict(imgs[:30])
    own, own_w = run.encode(imgs[:30])
    mir, mir_w = run.encode(np.ascontiguousarray(imgs[:30, :, ::-1]))
    rows, offsets, counts = run.vocab.bags(np.concatenate([own, mir], 1), np.concatenate([own_w, mir_w], 1))
    model = run.model
    with torch.no_grad():
        want = torch.softmax(model(*(torch.from_numpy(a) for a in (rows.astype(np.int64), offsets.astype(np.int64), counts))), 1).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    alone = run.classifier.predict_keys(own, weights=own_w)
    assert not np.allclose(alone, probs, atol=1e-4)
    _, _, both, both_w = run.scoring_keys(imgs[:30])  # the mirrors coded from their originals, as predict codes them
    pooled, voted = run.classifier.pooled_own_and_all(both, weights=both_w)
    assert np.array_equal(pooled, run.classifier.pooled(own, weights=own_w))  # what the image is: its own keys alone
    np.testing.assert_allclose(run.classifier.probabilities(voted), probs, rtol=1e-6)


def test_held_out_accuracy_is_what_evaluate_reports(voted):
    """The best epoch's held-out accuracy in run.json is what evaluate finds on the training shards
    (their stored mirror copies) and on the source itself (mirrored as it is read)."""
    imgs, labels, sh, run = voted
    best = run.manifest["final"]["val_accuracy"]
    on_shards = run.evaluate(run.validation_shards(), validation=True)
    on_source = run.evaluate(pipeline.from_arrays(imgs, labels), validation=True)
    assert on_shards["n"] == on_source["n"] == int(is_validation(np.arange(len(imgs)), FRACTION).sum())
    assert on_shards["accuracy"] == pytest.approx(best) and on_source["accuracy"] == pytest.approx(best)
    assert on_shards["confusion"] == on_source["confusion"]


def test_vote_follows_the_shards_and_refuses_mirror_without_copies(tmp_path):
    imgs, labels = _colour_images(40)
    pipeline.extract(pipeline.from_arrays(imgs, labels), tmp_path / "plain", CFG, augment="none")
    sh = pipeline.open_shards(tmp_path / "plain")
    assert sh.mirror_variant == 0 and TrainConfig().for_shards(sh).vote == "none"
    with pytest.raises(ParameterError, match="vote"):
        TrainConfig(vote="mirror").for_shards(sh)
    result = cli("train", str(tmp_path / "plain"), "--out", str(tmp_path / "run"), "--vote", "mirror")
    one_line_error(result, "--vote")
    assert not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(ParameterError, match="vote"):
        TrainConfig(vote="both")


def test_teaching_moves_the_rows_of_the_image_and_its_mirror_and_the_vote_answers(voted, tmp_path):
    """learn() pools the image as the run predicts it: afterwards the voted answer is the taught
    class, and only rows of the image's or its mirror's patterns moved."""
    from pipeline.teach.learn import TARGET, learn

    imgs, labels, _, run = voted
    run = pipeline.load(run.root)  # a copy of the run to teach, in memory
    pred, _ = run.predict(imgs)
    i = int(np.flatnonzero(pred != labels)[0])
    before = np.array(run.table.vectors)
    truth = run.class_names[int(labels[i])]
    learn(run, imgs[i], truth)
    _, probs = run.predict(imgs[i][None], unseen="drop")
    assert run.class_names[int(probs.argmax())] == truth and probs.max() >= TARGET
    changed = np.flatnonzero(np.any(run.table.vectors != before, axis=1))
    keys = np.concatenate([run.encode(imgs[i])[0][0], run.encode(np.ascontiguousarray(imgs[i][:, ::-1]))[0][0]])
    rows = run.vocab.rows_of(keys)
    assert 0 < len(changed) and set(changed) <= set(rows[(rows >= 0) & (rows < run.vocab.size)])
