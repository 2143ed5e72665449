"""pipe train --from: learning new images and classes on top of a finished run, in steps."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import pipeline
from pipeline import TrainConfig, layout
from pipeline.table import weights
from pipeline.errors import PipelineError
from pipeline.data.images import encode_png
from tests.conftest import ROOT, digits_images, start_server, write_folder
from tests.test_safety import cli, one_line_error

QUICK = ["--epochs", "3", "--dim", "16"]
pytestmark = pytest.mark.xdist_group("grow")  # one worker builds the chain (scripts/test.sh runs --dist loadgroup)


def _folder(root: Path, classes: set[int], split: str = "train") -> Path:
    imgs, labs = digits_images(split)
    keep = np.isin(labs, sorted(classes))
    return write_folder(root, imgs[keep], labs[keep])


def _digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """Three steps from the CLI: classes 0,1,2; then 2 (known) and 3 (new); then 4 and 5."""
    root = tmp_path_factory.mktemp("chain")
    steps = [{0, 1, 2}, {2, 3}, {4, 5}]
    assert cli("extract", _folder(root / "i0", steps[0]), "--out", root / "s0").exit_code == 0
    r = cli("train", root / "s0", "--out", root / "r0", *QUICK)
    assert r.exit_code == 0, r.output
    digests = []
    for n in (1, 2):
        prev = root / f"r{n - 1}"
        r = cli("extract", _folder(root / f"i{n}", steps[n]), "--like", prev, "--out", root / f"s{n}")
        assert r.exit_code == 0, r.output
        before = _digests(prev)
        r = cli("train", root / f"s{n}", "--from", prev, "--out", root / f"r{n}")
        assert r.exit_code == 0, r.output
        assert "grown from" in r.stdout
        digests.append((before, _digests(prev)))
    return root, digests


def test_classes_are_matched_by_name_and_the_head_grows(chain):
    root, _ = chain
    assert pipeline.load(root / "r0").class_names == ["0", "1", "2"]
    assert pipeline.load(root / "r1").class_names == ["0", "1", "2", "3"]
    last = pipeline.load(root / "r2")
    assert last.class_names == ["0", "1", "2", "3", "4", "5"]
    assert last.classifier.head_layers[-1][0].shape[0] == 6
    # evaluated on a source with classes in another order and some missing: named correctly
    imgs, labs = digits_images("test")
    keep = np.isin(labs, [5, 0, 3])
    write_folder(root / "eval", imgs[keep], labs[keep])
    res = last.evaluate(pipeline.open_source(root / "eval"))
    pred, _ = last.predict(imgs[keep])
    assert res["n"] == int(keep.sum())
    assert res["accuracy"] == pytest.approx(np.mean([last.class_names[p] == str(y) for p, y in zip(pred, labs[keep])]))
    assert res["accuracy"] > 0.8


def test_the_earlier_run_is_never_modified(chain):
    _, digests = chain
    for before, after in digests:
        assert before == after


def test_lineage_is_recorded_and_shown(chain):
    root, _ = chain
    m = json.loads((root / "r2" / layout.RUN_MANIFEST).read_text())
    assert [e["shards"] for e in m["lineage"]] == [str((root / f"s{n}").resolve()) for n in range(3)]
    assert [e["run"] for e in m["lineage"]] == [None, str((root / "r0").resolve()), str((root / "r1").resolve())]
    r = cli("info", root / "r2")
    assert r.exit_code == 0 and "grown in steps: " in r.stdout


def test_the_image_index_and_pattern_table_grow(chain):
    root, _ = chain
    runs = [pipeline.load(root / f"r{n}") for n in range(3)]
    shards = [pipeline.Shards(root / f"s{n}") for n in range(3)]
    originals = [s.num_images // (1 + s.manifest["variants_per_image"]) for s in shards]
    # every step adds its own training images (the held-out part excluded) to the earlier index
    for n in range(1, 3):
        assert runs[n].training_images.index_info.vectors > runs[n - 1].training_images.index_info.vectors
        assert runs[n].training_images.index_info.vectors <= sum(originals[: n + 1])
    t0, t2 = runs[0].table.metadata, runs[2].table.metadata
    pos = np.searchsorted(t2["key"], t0["key"])
    assert (t2["key"][pos] == t0["key"]).all()  # every earlier pattern is still there
    assert (t2["class_counts"][pos][:, :3] >= t0["class_counts"]).all()
    assert (t2["class_counts"][pos][:, 3:].sum() >= 0) and len(t2["key"]) > len(t0["key"])
    assert t2["class_counts"].shape[1] == 6


def test_rows_of_patterns_in_no_trained_image_are_bit_identical(chain, tmp_path):
    """Without replay, the step trains on the new images only: the reference is every key of their
    training part, read straight from the shards."""
    root, _ = chain
    new = pipeline.Shards(root / "s2")
    m = pipeline.train(new, tmp_path / "r", start=root / "r1", replay=0)
    assert m["replayed_images"] == 0
    before, after = pipeline.load(root / "r1"), pipeline.load(tmp_path / "r")
    cfg = before.train_config
    touched = np.unique(np.concatenate([k.ravel() for k, _, _, _ in new.part_batches(False, cfg.val_fraction)]))
    keys = before.vocab.keys
    untouched = ~np.isin(keys, touched)
    assert untouched.sum() > 100 and (~untouched).sum() > 100
    rows_after = np.searchsorted(after.vocab.keys, keys)
    assert (after.vocab.keys[rows_after] == keys).all()
    old_vectors = np.asarray(before.table.vectors[: len(keys)])
    new_vectors = np.asarray(after.table.vectors[rows_after])
    assert np.array_equal(old_vectors[untouched], new_vectors[untouched])  # bit for bit
    assert not np.array_equal(old_vectors[~untouched], new_vectors[~untouched])  # and the others learned


def test_a_step_on_shards_of_other_settings_is_refused(chain, tmp_path):
    root, _ = chain
    assert cli("extract", root / "i1", "--levels", "3", "--out", tmp_path / "other").exit_code == 0
    one_line_error(cli("train", tmp_path / "other", "--from", root / "r0", "--out", tmp_path / "r"), "--like")
    one_line_error(cli("train", root / "s1", "--from", root / "r0", "--out", tmp_path / "r", "--dim", "8"), "dim differ from")
    one_line_error(cli("train", root / "s1", "--replay", "5", "--out", tmp_path / "r"), "--replay goes with --from")
    one_line_error(cli("train", root / "s1", "--distill", "0.5", "--out", tmp_path / "r"), "--distill goes with --from")
    one_line_error(cli("train", root / "s1", "--from", root / "r0", "--distill", "nan", "--out", tmp_path / "r"), "distill nan must be")
    assert not (tmp_path / "r" / layout.RUN_MANIFEST).exists()


def test_query_and_serve_name_the_classes_of_the_last_run(chain, tmp_path):
    root, _ = chain
    imgs, labs = digits_images("test")
    i = int(np.flatnonzero(labs == 4)[0])
    (tmp_path / "four.png").write_bytes(encode_png(imgs[i]))
    run = pipeline.load(root / "r2")
    expected = run.class_names[int(run.predict(imgs[i][None])[0][0])]
    r = cli("query", root / "r2", tmp_path / "four.png", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["prediction"] == expected == "4", r.output
    proc, base = start_server(root / "r2")
    try:
        assert httpx.get(base + "/info").json()["classes"] == ["0", "1", "2", "3", "4", "5"]
        res = httpx.post(base + "/query", files={"images": ("four.png", (tmp_path / "four.png").read_bytes())}).json()
        assert res["results"][0]["prediction"] == "4"
        assert set(res["results"][0]["probabilities"]) == set(run.class_names)
        assert httpx.get(base + "/class/5").json()["class"] == "5"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _step_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", str(root / "s2"), "--from", str(root / "r1"), "--out", str(out),
            "--epochs", "3", "--patience", "0", *extra]


def test_a_killed_step_resumes_to_the_uninterrupted_result(chain, tmp_path):
    root, _ = chain
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_step_cmd(root, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed / layout.CHECKPOINT).exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the step finished before it could be killed"
    other = [a if a != str(root / "r1") else str(root / "r0") for a in _step_cmd(root, killed, "--resume")]
    r = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "was trained with different settings (from)" in r.stderr, r.stderr
    r = subprocess.run(_step_cmd(root, killed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    r = subprocess.run(_step_cmd(root, clean), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = weights.load(killed / layout.WEIGHTS, ""), weights.load(clean / layout.WEIGHTS, "")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_step_weighs_every_class_alike(chain):
    """The loss weights of a step with few earlier images per class, against labels counted straight
    from the step's training images: weight x images is the same for every class and sums to the
    number of images."""
    from pipeline.training import grow

    root, _ = chain
    parent = grow.load_parent(root / "r1")
    new = pipeline.Shards(root / "s2")
    classes = grow.merged_classes(parent.class_names, new.class_names)
    earlier, _ = grow.choose_earlier(parent.lineage, classes, new.fingerprint, 7)
    step = grow.StepShards(new, classes, earlier)
    fraction = parent.config.val_fraction
    labels = np.concatenate([lab for _, lab, _, _ in step.part_batches(False, fraction)])
    counts = np.bincount(labels, minlength=len(classes))
    assert (counts[:4] > 0).all() and counts[:4].max() < counts[4:].min()  # the earlier classes are the few
    w = grow.balanced_weights(step, fraction)
    share = w * counts
    assert np.allclose(share, share[0]) and share.sum() == pytest.approx(counts.sum())


def test_balanced_accuracy_is_the_mean_of_each_classes_accuracy():
    """A hand-made case: a linear model that answers class 0 for every image, on 3 images of class 0
    and 1 of class 1: accuracy 3/4, balanced accuracy (1 + 0) / 2."""
    import torch

    from pipeline.model import PatchBagModel
    from pipeline.training.bags import Bags
    from pipeline.training.loop import evaluate_bags

    model = PatchBagModel(rows=4, dim=2, num_classes=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))
    b = Bags(np.arange(4, dtype=np.int64), np.arange(5, dtype=np.int64), np.ones(4, np.float32), np.array([0, 0, 0, 1]), 4)
    res = evaluate_bags(model, [b], torch.device("cpu"))
    assert res["accuracy"] == 0.75 and res["balanced_accuracy"] == 0.5 and res["n"] == 4


def _two_pattern_model(bias: list[float]):
    """Two patterns, two classes: pattern i's vector is the unit vector i and the head is the
    identity, so an image of pattern i scores 1 on class i, plus ``bias``."""
    import torch

    from pipeline.model import PatchBagModel

    model = PatchBagModel(rows=2, dim=2, num_classes=2)
    with torch.no_grad():
        model.table.weight.copy_(torch.eye(2))
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.copy_(torch.tensor(bias))
    return model


def _bags(rows: list[int], labels: list[int]):
    from pipeline.training.bags import Bags

    n = len(rows)
    return Bags(np.asarray(rows, np.int64), np.arange(n + 1, dtype=np.int64), np.ones(n, np.float32), np.asarray(labels, np.int64), n)


def test_calibration_removes_a_bias_toward_one_class():
    """Class 1's bias is 3 higher, so every image is called 1; the offsets bring the two biases within
    1 of each other (the only way both classes are right), they sum to 0, and a class with no
    validation image is left alone."""
    from pipeline.training import grow
    from pipeline.training.loop import evaluate_bags
    import torch

    model = _two_pattern_model([0.0, 3.0])
    val = [_bags([0, 0, 0, 1], [0, 0, 0, 1])]
    assert evaluate_bags(model, val, torch.device("cpu"))["balanced_accuracy"] == 0.5
    offsets = grow.calibrate(model, val)
    assert offsets.sum() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.bias += torch.from_numpy(offsets)
    assert abs(float(model.head.bias[0] - model.head.bias[1])) < 1
    assert evaluate_bags(model, val, torch.device("cpu"))["balanced_accuracy"] == 1.0
    one_class = grow.calibrate(_two_pattern_model([0.0, 3.0]), [_bags([1, 1], [1, 1])])
    assert one_class[0] == 0.0 and one_class[1] == 0.0  # one class present: nothing to balance


def test_the_distillation_term_is_the_divergence_from_the_earlier_answers():
    """Against the formula in numpy: T^2 x KL(softmax(teacher / T) || softmax(student / T)) over the
    earlier classes, averaged over images; zero while the model is the earlier run."""
    import torch

    from pipeline.training import grow

    model = _two_pattern_model([0.0, 0.5])
    teacher = grow.Teacher(model, classes=2, temperature=2.0, weight=1.5)
    b = _bags([0, 1, 1], [0, 1, 1])
    rows, offsets, counts, _ = b.tensors(torch.device("cpu"))
    w = model.weights(counts, offsets)
    logits = model(rows, offsets, counts)
    assert float(teacher.loss(rows, offsets, w, logits)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1.0, -1.0]))
    student = model(rows, offsets, counts).detach().numpy() / 2.0
    earlier = (np.eye(2)[[0, 1, 1]] + [0.0, 0.5]) / 2.0

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(earlier), softmax(student)
    expected = 1.5 * 4 * np.mean(np.sum(p * np.log(p / q), 1))
    assert float(teacher.loss(rows, offsets, w, model(rows, offsets, counts))) == pytest.approx(expected, rel=1e-5)
