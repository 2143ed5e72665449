"""Shards, training, pattern table, FAISS look-ups and run loading, each against an independent reference."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest

import pipeline
from pipeline import PipelineError, TrainConfig
from pipeline.table import index as pattern_index
from pipeline.extraction.hashing import KeyPlan
from pipeline.data.split import is_validation

from .conftest import digits_images, write_folder, one_view_config


def test_shards_round_trip(digits_shards):
    sh = pipeline.open_shards(digits_shards)
    imgs, labels = digits_images("train")
    expected = KeyPlan(sh.config, 8, 8, sh.dictionary()).image_keys(imgs)
    got = list(sh.iter_batches())
    keys = np.concatenate([b.keys for b in got])
    assert np.array_equal(keys, expected)
    assert np.array_equal(np.concatenate([b.labels for b in got]), labels)
    assert np.array_equal(np.concatenate([b.image_ids for b in got]), np.arange(len(imgs)))
    m = sh.manifest
    assert m["images"] == 898 and m["keys"] == keys.size and m["fingerprint"] == sh.config.fingerprint()
    assert sum(s["rows"] for s in m["shards"]) == 898


def test_extract_splits_into_several_shards_and_refuses_to_overwrite(tmp_path):
    src = pipeline.open_source("digits", limit=50)
    m = pipeline.extract(src, tmp_path / "s", one_view_config(), images_per_shard=20)
    assert [s["file"] for s in m["shards"]] == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    assert [s["rows"] for s in m["shards"]] == [20, 20, 10]
    with pytest.raises(PipelineError, match="pass `overwrite`"):
        pipeline.extract(src, tmp_path / "s", one_view_config())
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(PipelineError, match="did not finish"):
        pipeline.open_shards(tmp_path / "s")


def test_png_query_gives_the_same_keys_as_the_source(digits_run, tmp_path):

    run = pipeline.load(digits_run)
    imgs, labels = digits_images("test", 3)
    root = write_folder(tmp_path / "f", imgs, labels)
    for i, lab in enumerate(labels):
        img = run.read_image(root / str(lab) / f"{i:04d}.png")
        assert np.array_equal(run.images_to_keys(img), run.images_to_keys(imgs[i]))


def test_training_lowers_the_loss(digits_shards, tmp_path):
    m = pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "r", TrainConfig(epochs=3, dim=8))
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    assert m["final"] == lines[m["best_epoch"] - 1]
    assert (tmp_path / "r" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_sparse_update_touches_only_rows_of_the_batch():
    from pipeline.model import PatchBagModel
    import torch

    model = PatchBagModel(100, 4, 3)
    before = model.table.weight.detach().clone()
    opt = torch.optim.SparseAdam(list(model.table.parameters()), lr=0.1)
    rows, offsets, counts = torch.tensor([1, 5, 7, 7, 9]), torch.tensor([0, 3, 5]), torch.tensor([1.0, 1, 1, 1, 2])
    torch.nn.functional.cross_entropy(model(rows, offsets, counts), torch.tensor([0, 2])).backward()
    assert model.table.weight.grad.is_sparse
    opt.step()
    changed = set(torch.nonzero((model.table.weight.detach() != before).any(1)).ravel().tolist())
    assert changed == {1, 5, 7, 9}


def test_vocabulary_and_pattern_table_match_exact_count(digits_run, digits_shards):
    run = pipeline.load(digits_run)
    sh = pipeline.open_shards(digits_shards)
    counts: Counter = Counter()
    per_class: dict[int, Counter] = {}
    for b in sh.iter_batches():
        train = ~is_validation(b.image_ids, 0.0 if run.manifest["refit"] else run.train_config.val_fraction)  # a refit trains on every image
        for keys, lab in zip(b.keys[train], b.labels[train]):
            counts.update(keys.tolist())
            per_class.setdefault(int(lab), Counter()).update(keys.tolist())
    min_count = run.train_config.min_count
    vocab = sorted(k for k, c in counts.items() if c >= min_count)
    stats = run.manifest["vocabulary"]
    assert stats["distinct_keys"] == len(counts) and stats["vocabulary"] == len(vocab) == run.manifest["patterns"]
    assert stats["tail_keys"] == len(counts) - len(vocab) and stats["occurrences"] == sum(counts.values())
    p = run.table.metadata
    assert p["key"].tolist() == vocab
    for i in np.random.default_rng(0).choice(len(vocab), 500, replace=False):
        k = int(p["key"][i])
        assert p["count"][i] == counts[k]
        assert p["class_counts"][i].tolist() == [per_class[c][k] for c in range(10)]


def test_flat_index_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    pattern_index.build(vectors, tmp_path / "i.faiss")
    d, ids = pattern_index.search(pattern_index.load(tmp_path / "i.faiss"), queries, 5)
    brute = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1)[:, :5]
    assert np.array_equal(ids, order)
    assert np.allclose(d, np.take_along_axis(brute, order, 1), rtol=1e-4, atol=1e-4)


def test_index_vectors_are_the_learned_rows(digits_run):
    run = pipeline.load(digits_run)
    ids = np.array([0, 17, len(run.table.metadata["key"]) - 1])
    rows = run.vocab.rows_of(run.table.metadata["key"][ids])
    assert rows.tolist() == ids.tolist()
    assert np.array_equal(run.table.index.reconstruct_batch(ids), run.table.vectors[rows])


def test_unseen_patch_vector_is_mean_of_seen_sub_patches(digits_run):
    run = pipeline.load(digits_run)
    imgs, _ = digits_images("test", 50)
    t = run.plan.slot_table
    for img in imgs:
        keys = run.images_to_keys(img)[0]
        seen_ids = run.vocab.own_ids(keys)
        unseen = np.flatnonzero(seen_ids < 0)
        if len(unseen):
            break
    vectors, seen, composed = run.lookup.patch_vectors(keys)
    slot = int(unseen[-1])
    y, x, h, w, cell, view = (int(t[c][slot]) for c in ("y", "x", "h", "w", "cell", "view"))
    # by hand: every smaller patch inside (y, x, h, w), same position mode and view, whose key is in the pattern table
    known = set(run.table.metadata["key"].tolist())
    parts = [
        s for s in range(len(keys))
        if (t["cell"][s] < 0) == (cell < 0) and t["view"][s] == view and t["y"][s] >= y and t["x"][s] >= x
        and t["y"][s] + t["h"][s] <= y + h and t["x"][s] + t["w"][s] <= x + w
        and (t["h"][s], t["w"][s]) != (h, w) and int(keys[s]) in known
    ]
    assert not seen[slot]
    if parts:
        row_of = {int(k): i for i, k in enumerate(run.table.metadata["key"].tolist())}  # pattern id = table row
        expected = np.mean([run.table.vectors[row_of[int(keys[s])]] for s in parts], axis=0)
        assert composed[slot] and np.allclose(vectors[slot], expected, atol=1e-6)
    else:
        assert not composed[slot] and np.isnan(vectors[slot]).all()
    assert np.array_equal(seen, seen_ids >= 0)


def test_nearest_patterns_of_a_seen_patch_start_with_itself(digits_run):
    run = pipeline.load(digits_run)
    imgs, _ = digits_images("train", 1)
    lookup = run.nearest_patterns(imgs[0], k=3)
    s = np.flatnonzero(lookup.seen)[0]
    pid = run.vocab.own_ids(lookup.keys[s : s + 1])[0]
    assert lookup.distances[s, 0] == 0.0
    assert pid in lookup.ids[s][lookup.distances[s] == 0.0]


def test_run_directory_copied_elsewhere_answers_identically(digits_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_run, copy)
    imgs, _ = digits_images("test", 20)
    a, b = pipeline.load(digits_run), pipeline.load(copy)
    assert np.array_equal(a.predict(imgs)[1], b.predict(imgs)[1])
    la, lb = a.nearest_patterns(imgs[0], 4), b.nearest_patterns(imgs[0], 4)
    assert np.array_equal(la.ids, lb.ids)


def test_evaluate_source_and_shards_agree(digits_run, digits_shards):
    run = pipeline.load(digits_run)
    a = run.evaluate(pipeline.open_source("digits", split="train"))
    b = run.evaluate(pipeline.open_shards(digits_shards))
    assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 898
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # batches differ, so float sums may too


def test_evaluate_refuses_shards_of_another_config(digits_run, tmp_path):
    pipeline.extract(pipeline.open_source("digits", limit=10), tmp_path / "s", one_view_config(levels=8))
    with pytest.raises(PipelineError, match="extract the images again"):
        pipeline.load(digits_run).evaluate(pipeline.open_shards(tmp_path / "s"))


def test_run_refuses_images_of_another_size(digits_run):
    with pytest.raises(PipelineError, match="resize them to 8x8"):
        pipeline.load(digits_run).predict(np.zeros((2, 9, 9), np.uint8))


def test_top_patches_are_the_most_decisive_with_the_same_neighbours(digits_run):
    run = pipeline.load(digits_run)
    imgs, _ = digits_images("test", 1)
    full = run.nearest_patterns(imgs[0], k=3)
    top = run.nearest_patterns(imgs[0], k=3, patches=7)
    # brute force: sum every slot's contribution per key, rank the keys, keep each one's first slot
    totals: dict = {}
    for slot, (key, c) in enumerate(zip(full.keys.tolist(), full.contribution.tolist())):
        first, total, n = totals.get(key, (slot, 0.0, 0))
        totals[key] = (first, total + c, n + 1)
    ranked = sorted(totals.values(), key=lambda t: (-t[1], t[0]))[:7]
    expected = np.array([t[0] for t in ranked])
    assert len(set(top.keys.tolist())) == len(top.keys) == 7  # distinct patterns
    assert np.array_equal(top.slots, expected)
    assert np.allclose(top.contribution, [t[1] for t in ranked]) and np.array_equal(top.occurrences, [t[2] for t in ranked])
    assert np.array_equal(top.ids, full.ids[expected]) and np.array_equal(top.keys, full.keys[expected])
    assert np.array_equal(top.probabilities, run.predict(imgs[:1])[1][0])
    assert top.counts == full.counts and sum(full.counts[c] for c in ("seen", "composed", "unmatched")) == run.plan.keys_per_image
