"""Teaching a loaded run one image (pipeline.teach): only that image's rows (and a new class's head
row) change, the run answers the taught class, and a saved taught run answers as the taught one did."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

import pipeline
from pipeline.errors import PipelineError
from pipeline.extraction.shards import Shards
from pipeline.teach.learn import TARGET, learn
from pipeline.teach.save import SHARDS, save
from pipeline.training import grow
from tests.conftest import ROOT, digits_images


def digests(root) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def wrong_ones(run, images, labels) -> np.ndarray:
    pred, _ = run.predict(images)
    wrong = np.flatnonzero(pred != labels)
    assert len(wrong) >= 2, "the digits run answers every test image right; the test needs two it gets wrong"
    return wrong


def own_rows(run, image) -> np.ndarray:
    """The rows of the image's patterns that have a row of their own, written out from the keys."""
    keys, _ = run.encode(image)
    rows = run.vocab.rows_of(keys[0])
    return np.unique(rows[(rows >= 0) & (rows < run.vocab.size)])


@pytest.fixture(scope="session")
def hidden_run(digits_shards, tmp_path_factory):
    """A digits run whose head has a hidden ReLU layer."""
    out = tmp_path_factory.mktemp("teach_hidden") / "run"
    pipeline.train(pipeline.Shards(digits_shards), out, pipeline.TrainConfig(epochs=2, dim=16, hidden=16))
    return out


@pytest.mark.parametrize("which", ["digits_run", "hidden_run"])
def test_learning_an_image_moves_only_its_own_rows_and_answers_the_taught_class(which, request):
    run = pipeline.load(request.getfixturevalue(which))
    images, labels = digits_images("test")
    i = wrong_ones(run, images, labels)[0]
    table, head = np.array(run.table.vectors), [(w.copy(), b.copy()) for w, b in run.classifier.head_layers]
    truth = run.class_names[int(labels[i])]
    lesson = learn(run, images[i], truth, "wrong.png")
    changed = np.flatnonzero(np.any(run.table.vectors != table, axis=1))
    assert len(changed) == lesson.rows > 0
    assert set(changed) <= set(own_rows(run, images[i]))  # nothing outside the image's own patterns
    assert all(np.array_equal(w, w0) and np.array_equal(b, b0) for (w, b), (w0, b0) in zip(run.classifier.head_layers, head))
    _, probs = run.predict(images[i][None], unseen="drop")
    assert run.class_names[int(probs.argmax())] == truth and probs.max() >= TARGET
    assert lesson.after == {"prediction": truth, "probability": pytest.approx(float(probs.max()), abs=1e-5)}
    assert lesson.before["prediction"] != truth and not lesson.new_class


def test_a_new_class_grows_the_head_by_one_imprinted_row(digits_run):
    run = pipeline.load(digits_run)
    images, _ = digits_images("test", 20)
    known = [(w.copy(), b.copy()) for w, b in run.classifier.head_layers]
    lesson = learn(run, images[3], "  seven-ish ", "odd.png")
    assert lesson.new_class and run.class_names[-1] == "seven-ish" and len(run.class_names) == len(known[-1][1]) + 1
    w, b = run.classifier.head_layers[-1]
    np.testing.assert_array_equal(w[:-1], known[-1][0])  # the known classes' rows stay as they were
    np.testing.assert_array_equal(b[:-1], known[-1][1])
    # the imprinted direction, written out: the image's pooled vector before the lesson minus the
    # training images' mean, as long as the other rows on average (the rows then moved, the head row did not)
    fresh = pipeline.load(digits_run)
    keys, weights = fresh.encode(images[3])
    x = fresh.classifier.pooled(keys, "drop", weights)[0]
    mean = fresh.training_images.index.reconstruct_n(0, fresh.training_images.index.ntotal).mean(0)
    want = (x - mean) / np.linalg.norm(x - mean) * np.linalg.norm(known[-1][0], axis=1).mean()
    np.testing.assert_allclose(w[-1], want, rtol=1e-4, atol=1e-5)
    assert run.predict(images[3][None], unseen="drop")[0][0] == len(run.class_names) - 1
    with pytest.raises(PipelineError, match="printable"):
        learn(run, images[4], "bad\nname")


def test_searches_find_moved_patterns_at_their_new_place(digits_run):
    run = pipeline.load(digits_run)
    images, labels = digits_images("test")
    for i in wrong_ones(run, images, labels)[:2]:
        learn(run, images[i], run.class_names[int(labels[i])])
    assert len(run.table.moved)
    vectors = run.table.vectors[: run.vocab.size]
    q = np.concatenate([vectors[run.table.moved[:20]], vectors[:20]])
    d, ids = run.table.search(q, 5)
    brute = ((q[:, None] - vectors[None]) ** 2).sum(-1)  # every learned pattern, at its place now
    np.testing.assert_allclose(d, np.sort(brute, 1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ids[:, 0], np.argmin(brute, 1))


def test_a_saved_taught_run_answers_as_the_taught_run_did(digits_run, tmp_path):
    before = digests(digits_run)
    run = pipeline.load(digits_run)
    images, labels = digits_images("test")
    wrong = wrong_ones(run, images, labels)
    lessons = [learn(run, images[wrong[0]], run.class_names[int(labels[wrong[0]])], "a.png"), learn(run, images[wrong[1]], "ten", "b.png")]
    labels_mem, probs_mem = run.predict(images)
    out = tmp_path / "taught"
    m = save(run, lessons, out)
    assert digests(digits_run) == before  # the run taught from is only read
    saved = pipeline.load(out)
    got, probs = saved.predict(images)
    np.testing.assert_array_equal(got, labels_mem)
    np.testing.assert_allclose(probs, probs_mem, atol=1e-6)
    assert saved.class_names == run.class_names and saved.class_names[-1] == "ten"
    assert m["taught"]["images"] == [{"name": "a.png", "class": lessons[0].label}, {"name": "b.png", "class": "ten"}]
    assert saved.summary()["lineage"][-1] == {"run": str(digits_run), "shards": str(out.resolve() / SHARDS)}
    info = subprocess.run([sys.executable, "-m", "cli.main", "info", str(out)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"taught 2 image(s) on top of {digits_run}: a.png as {lessons[0].label}, b.png as ten" in info
    # the taught images are training images now: each is its own nearest one
    near = saved.nearest_images(images[wrong[:2]], 1)
    assert list(near.names[:, 0]) == [f"taught/{lessons[0].label}/a.png", "taught/ten/b.png"]
    # the class counts gained the lessons' patterns, under their classes
    cc = saved.table.metadata["class_counts"]
    assert cc.shape[1] == 11 and cc[:, 10].sum() > 0
    # a later pipe train --from replays the taught images from their shards
    earlier, notes = grow.choose_earlier(saved.summary()["lineage"], saved.class_names, saved.fingerprint, 5)
    assert not notes and any(s.root == out.resolve() / SHARDS for s, _, _ in earlier)
    assert Shards(out / SHARDS).num_images >= 2
    # saving again replaces this directory; any other existing directory is refused
    learn(run, images[wrong[0]], "ten", "c.png")
    save(run, lessons + [lessons[0]], out)
    (tmp_path / "other").mkdir()
    with pytest.raises(PipelineError, match="not a run taught"):
        save(run, lessons, tmp_path / "other")
    for where in (digits_run, digits_run / "inside", digits_run.parent):
        with pytest.raises(PipelineError, match="served run"):
            save(run, lessons, where)
