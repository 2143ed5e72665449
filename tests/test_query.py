"""Stage 3: pattern and image indexes against brute force, the unseen-patch rules by hand,
example pixels, batch query and rebuilding the index."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline import KeyPlan, PipelineError
from pipeline.table import index as pidx
from pipeline.query.classify import composed_sums, find_unseen
from pipeline.query.batch import query_batch, schema

from .conftest import digits_images, one_view_config
from pipeline.training.bags import to_bags

from .test_cli import one_line_error
from .test_cli import run as cli


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clusters on an 8-dimensional subspace of R^d, like learned vectors (low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (64, 8))
    basis = np.random.default_rng(98).normal(0, 1, (8, d))
    z = centres[rng.integers(0, 64, n)] + rng.normal(0, 0.3, (n, 8))
    return (z @ basis).astype(np.float32)


def _brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def test_flat_index_is_exact(tmp_path):
    x = _clustered(3000, 16)
    q = _clustered(50, 16, seed=1)
    info = pidx.build(x, tmp_path / "f.faiss", "flat")
    assert info.exact and info.factory == "Flat" and info.vectors == 3000
    d, ids = pidx.search(pidx.load(tmp_path / "f.faiss", info, gpu=False), q, 7)
    bd, bids = _brute(x, q, 7)
    assert np.array_equal(ids, bids)
    assert np.allclose(d, bd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,knob,bound", [("ivf", {"nprobe": 8}, 0.9), ("hnsw", {"ef_search": 64}, 0.9), ("ivfpq", {"nprobe": 8}, 0.4)])
def test_approximate_indexes_meet_a_recall_bound(tmp_path, kind, knob, bound):
    d = 8 if kind == "ivfpq" else 32  # PQ fits 256 centroids per sub-vector, one sub-vector per dimension here: fewer is quicker
    x = _clustered(20000, d)
    q = _clustered(200, d, seed=1)
    info = pidx.build(x, tmp_path / "a.faiss", kind, **knob)
    assert not info.exact and info.kind == kind
    idx = pidx.load(tmp_path / "a.faiss", info, gpu=False)
    _, ids = pidx.search(idx, q, 10)
    _, truth = _brute(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= bound, recall
    # the recorded knob is what a reload searches with
    assert info.to_dict() == pidx.IndexInfo.from_dict(info.to_dict()).to_dict()


def test_auto_kind_follows_the_number_of_vectors():
    assert pidx.choose("auto", 1000, 64) == ("flat", "Flat")
    assert pidx.choose("auto", pidx.EXACT_UP_TO, 64) == ("flat", "Flat")
    kind, factory = pidx.choose("auto", 1_700_000, 64)
    assert kind == "ivf" and factory == "IVF2048,Flat"  # 2 * sqrt(1.7M) = 2608 -> 2048
    assert pidx.choose("ivfpq", 10_000_000, 64)[1] == "IVF4096,PQ32"  # lists capped at MAX_LISTS
    assert pidx.choose("HNSW16", 10, 64) == ("factory", "HNSW16")
    with pytest.raises(PipelineError, match="neither a kind"):
        pidx.check_kind("IVF9,Bogus")


def test_composition_by_hand():
    """A 2x2 image with every patch up to 2x2, position-free: 4 1x1, 2 1x2, 2 2x1, 1 2x2 slots."""
    plan = KeyPlan(one_view_config(max_h=2, max_w=2, position="none", color="gray"), 2, 2)
    s = lambda y, x, h, w: plan.slot_of("none", y, x, h, w)  # noqa: E731
    table = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [4.0, -4.0], [10.0, 20.0], [-6.0, 6.0]], np.float32)
    rows = np.full((1, plan.keys_per_image), -1, np.int64)
    rows[0, s(0, 0, 1, 1)] = 0  # top-left seen
    rows[0, s(0, 1, 1, 1)] = 1  # top-right seen
    rows[0, s(1, 0, 1, 1)] = 2  # bottom-left seen; bottom-right unseen
    rows[0, s(0, 0, 1, 2)] = 4  # top row seen; bottom row unseen
    rows[0, s(0, 0, 2, 1)] = 5  # left column seen; right column unseen; the 2x2 unseen
    u = find_unseen(plan, rows, own_rows=6)
    vec = dict(zip(u.slot.tolist(), u.vectors(table)))
    assert set(vec) == {s(1, 1, 1, 1), s(1, 0, 1, 2), s(0, 1, 2, 1), s(0, 0, 2, 2)}
    assert np.isnan(vec[s(1, 1, 1, 1)]).all()  # a 1x1 has no parts: unmatched
    assert np.allclose(vec[s(1, 0, 1, 2)], [3.0, 3.0])  # bottom row: only bottom-left seen
    assert np.allclose(vec[s(0, 1, 2, 1)], [0.0, 2.0])  # right column: only top-right seen
    # the 2x2: top-left, top-right, bottom-left, top row, left column
    assert np.allclose(vec[s(0, 0, 2, 2)], [(1 + 0 + 3 + 10 - 6) / 5, (0 + 2 + 3 + 20 + 6) / 5])
    sums, count = composed_sums(u, table, 1)
    assert count.tolist() == [3.0]
    assert np.allclose(sums[0], [3 + 0 + 8 / 5, 3 + 2 + 31 / 5])


def test_unseen_rules_against_brute_force(digits_run):
    run = pipeline.load(digits_run)
    imgs, _ = digits_images("test", 30)
    keys = run.images_to_keys(imgs)
    table = run.table.vectors
    # drop: the trained model's own (torch) forward pass, and its head
    rows, offsets, counts, _ = to_bags(run.vocab, keys, np.zeros(len(keys), np.int64)).tensors(torch.device("cpu"))
    with torch.no_grad():
        pooled = run.model.pooled(rows, offsets, counts)
        assert np.allclose(run.classifier.pooled(keys, "drop"), pooled.numpy(), atol=1e-6)
        assert np.allclose(run.classifier.probabilities(run.classifier.pooled(keys, "drop")), torch.softmax(run.model.head(pooled), 1).numpy(), atol=1e-5)
    # compose: mean over seen patches plus composed ones, image by image
    comp = run.classifier.pooled(keys, "compose")
    near = run.classifier.pooled(keys, "nearest")
    for i in range(3):
        vectors, seen, composed = run.lookup.patch_vectors(keys[i])
        use = seen | composed
        assert np.allclose(comp[i], vectors[use].mean(0), atol=1e-5)
        # nearest: each composed vector replaced by the exactly nearest learned vector (Flat index)
        sub = vectors.copy()
        for slot in np.flatnonzero(composed):
            sub[slot] = table[: run.vocab.size][np.argmin(((table[: run.vocab.size] - vectors[slot]) ** 2).sum(1))]
        assert np.allclose(near[i], sub[use].mean(0), atol=1e-5)
    assert composed.any()


def test_example_pixels_are_each_patterns_first_occurrence(digits_run):
    run = pipeline.load(digits_run)
    p = run.table.metadata
    assert run.manifest["examples"] == "complete"
    src = pipeline.open_source("digits", split="train")
    images = np.concatenate([b.images for b in src.batches(512, 1)])
    exact = np.flatnonzero(p["atom"] < 0)  # a code pattern's picture is its atom (tests/test_codes.py)
    ids = exact[[0, 5, 100, len(exact) // 2, len(exact) - 1]]
    for pid, pix in zip(ids, run.pattern_pixels(ids)):
        y, x, h, w = (int(p[c][pid]) for c in ("example_y", "example_x", "h", "w"))
        img = images[p["example_image"][pid]]
        assert np.array_equal(pix, img[y : y + h, x : x + w])
        mode = "none" if p["cell"][pid] < 0 else "grid"
        slot = run.plan.slot_of(mode, y, x, h, w, int(p["view"][pid]))
        assert run.images_to_keys(img)[0, slot] == p["key"][pid]  # the pixels hash to the pattern's key


def test_nearest_images_find_training_images_themselves(digits_run):
    run = pipeline.load(digits_run)
    src = pipeline.open_source("digits", split="train")
    images = np.concatenate([b.images for b in src.batches(512, 1)])
    pick = run.training_images.metadata["image_id"][[0, 10, 200]]
    near = run.nearest_images(images[pick], k=3)
    assert near.distances.shape == near.ids.shape == (3, 3)
    assert np.array_equal(near.image_ids[:, 0], pick) and np.allclose(near.distances[:, 0], 0, atol=1e-6)
    assert np.array_equal(near.labels[:, 0], run.training_images.metadata["label"][[0, 10, 200]])
    labels, probs = run.predict(images[pick], classifier="knn")
    assert np.allclose(probs.sum(1), 1) and probs.shape == (3, 10)


def test_copied_run_answers_identically_without_the_original(digits_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_run, copy)
    imgs, _ = digits_images("test", 10)
    a = pipeline.load(digits_run)
    expected = (a.predict(imgs, "nearest")[1], a.nearest_patterns(imgs[0], 3).ids, a.nearest_images(imgs, 3).ids, a.pattern_pixels([3, 7]))
    moved = tmp_path / "moved"
    shutil.move(str(digits_run), moved)
    try:
        b = pipeline.load(copy)
        got = (b.predict(imgs, "nearest")[1], b.nearest_patterns(imgs[0], 3).ids, b.nearest_images(imgs, 3).ids, b.pattern_pixels([3, 7]))
    finally:
        shutil.move(str(moved), digits_run)
    for x, y in zip(expected[:3], got[:3]):
        assert np.array_equal(x, y)
    assert all(np.array_equal(x, y) for x, y in zip(expected[3], got[3]))


def test_batch_query_schema_rows_and_accuracy(digits_run, tmp_path):
    run = pipeline.load(digits_run)
    src = pipeline.open_source("digits", split="test", limit=70)
    out = tmp_path / "res.parquet"
    res = query_batch(run, src, out, k=3, patches=4, batch_size=32)
    t = pq.read_table(out)
    assert t.schema.equals(schema(10), check_metadata=False) and t.num_rows == 70 == res["images"]
    assert res["accuracy"] == pytest.approx(run.evaluate(src)["accuracy"])
    imgs, labels = digits_images("test", 70)
    pred, probs = run.predict(imgs)
    assert t.column("prediction").to_pylist() == [str(c) for c in pred]
    assert np.allclose(np.array(t.column("probabilities").to_pylist()), probs, atol=1e-6)
    row = t.slice(5, 1).to_pylist()[0]
    lk = run.nearest_patterns(imgs[5], 3, patches=4)
    assert row["patch_slots"] == lk.slots.tolist() and row["nearest_pattern_ids"] == lk.ids.tolist()
    assert row["nearest_image_ids"] == run.nearest_images(imgs[5:6], 3).image_ids[0].tolist()


def test_batch_query_leaves_no_file_when_interrupted(digits_run, tmp_path):
    run = pipeline.load(digits_run)
    out = tmp_path / "res.parquet"

    def boom(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        query_batch(run, pipeline.open_source("digits", split="test", limit=40), out, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_rebuild_index_records_the_kind(digits_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(digits_run, copy)
    info = pipeline.rebuild_index(copy, "hnsw", ef_search=40)
    assert info["factory"] == "HNSW32" and info["ef_search"] == 40 and info["rebuilt"]
    run = pipeline.load(copy)
    assert run.table.index_info.factory == "HNSW32"
    imgs, _ = digits_images("train", 1)
    lk = run.nearest_patterns(imgs[0], 2)
    s = np.flatnonzero(lk.seen)[:20]
    assert np.all(lk.distances[s, 0] < 1e-6)  # a seen patch finds its own vector
    info = pipeline.rebuild_index(copy, "hnsw", ef_search=80)  # same kind: only the knob changes
    assert info["ef_search"] == 80 and not info["rebuilt"] and json.loads((copy / "run.json").read_text())["index"]["ef_search"] == 80
    assert "rebuilt" not in json.loads((copy / "run.json").read_text())["index"]
    with pytest.raises(PipelineError, match="neither a kind"):
        pipeline.rebuild_index(copy, "IVF9,Bogus")


def test_cli_batch_png_and_index(digits_run, tmp_path):
    out = tmp_path / "r.parquet"
    r = cli("query", digits_run, "--batch", "digits", "--split", "test", "--limit", "25", "--out", out)
    assert r.exit_code == 0, r.output
    assert "25 images queried" in r.stdout and "accuracy" in r.stdout and pq.read_table(out).num_rows == 25
    imgs, _ = digits_images("test", 1)
    from pipeline.data.images import encode_png

    (tmp_path / "a.png").write_bytes(encode_png(imgs[0]))
    r = cli("query", digits_run, tmp_path / "a.png", "--png", tmp_path / "pics", "--unseen", "compose", "--classifier", "knn")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pics" / "a.png").stat().st_size > 1000 and "nearest training images: digits:train:" in r.stdout
    one_line_error(cli("query", digits_run, tmp_path / "a.png", "--batch", "digits"), "not both")
    one_line_error(cli("query", digits_run, "--batch", "digits", "--out", tmp_path / "r.csv"), "must end in .parquet")
    copy = tmp_path / "run"
    shutil.copytree(digits_run, copy)
    r = cli("index", copy, "--index", "ivf", "--nprobe", "4")
    assert r.exit_code == 0 and "IVF" in r.stdout and "nprobe 4" in r.stdout
    one_line_error(cli("index", copy, "--index", "nonsense"), "neither a kind")


@pytest.mark.slow
def test_batch_query_on_ray_equals_local(digits_run, tmp_path):
    pytest.importorskip("ray")
    run = pipeline.load(digits_run)
    src = pipeline.open_source("digits", split="test", limit=90)
    a = query_batch(run, src, tmp_path / "a.parquet", k=3, patches=2, batch_size=20)
    b = query_batch(run, src, tmp_path / "b.parquet", k=3, patches=2, batch_size=20, engine="ray", workers=2)
    assert a["accuracy"] == b["accuracy"] and b["images"] == 90
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.column("image_id").to_pylist() == tb.column("image_id").to_pylist()  # source order kept
    for c in ("prediction", "patch_slots", "nearest_pattern_ids", "nearest_image_ids"):
        assert ta.column(c).to_pylist() == tb.column(c).to_pylist(), c
    assert np.allclose(np.array(ta.column("probabilities").to_pylist()), np.array(tb.column("probabilities").to_pylist()), atol=1e-5)


def test_run_without_image_index_says_so(digits_run, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(digits_run, copy)
    (copy / "images.parquet").unlink()
    (copy / "images.faiss").unlink()
    run = pipeline.load(copy)
    imgs, _ = digits_images("test", 2)
    assert run.predict(imgs)[0].shape == (2,)  # the head needs no image index
    with pytest.raises(PipelineError, match="images.faiss is missing"):
        run.nearest_images(imgs, 3)
    with pytest.raises(PipelineError, match="is missing"):
        run.training_images.metadata


def test_a_wrong_sized_image_is_described_as_height_by_width(digits_run):
    run = pipeline.load(digits_run)
    with pytest.raises(PipelineError, match=r"the images are 427x640 \(height x width\)"):
        run.predict(np.zeros((427, 640, 3), np.uint8))


def test_png_names_never_collide():
    from pipeline.query.report import png_names

    names = png_names(["a/x.png", "b/x.png", "x.jpg", "y.png"])
    assert names == {"a/x.png": "x.png", "b/x.png": "x-2.png", "x.jpg": "x-3.png", "y.png": "y.png"}


def test_nearest_patterns_searched_once_per_key_and_remembered_are_each_patchs_own_search(digits_run):
    """A pattern met at several places is searched once, and a learned pattern's answer is kept for
    the next image: the answers are still each patch's own search (reference: every patch searched
    alone, in a run loaded afresh), for a second call, and for a larger k than the one remembered."""
    from pipeline.table import index as pattern_index

    imgs, _ = digits_images("test", 2)
    run, ref = pipeline.load(digits_run), pipeline.load(digits_run)
    for k, img in ((4, imgs[0]), (4, imgs[0]), (4, imgs[1]), (6, imgs[0])):
        got = run.nearest_patterns(img, k=k)
        vectors, seen, composed = ref.lookup.patch_vectors(ref.images_to_keys(img[None])[0])
        has = np.flatnonzero(seen | composed)
        want = [pattern_index.search(ref.table.index, vectors[s : s + 1], k) for s in has]
        # batched and single products round apart, so near ties may swap places: the same distances, the same ids but for those
        assert np.allclose(got.distances[has], np.concatenate([d for d, _ in want]), rtol=1e-4, atol=1e-3)
        assert (got.ids[has] == np.concatenate([i for _, i in want])).mean() > 0.99
        assert len(np.unique(got.keys[has])) < len(has)  # there were repeats to share
    assert 0 < len(run.lookup.near_cache) <= len(run.vocab.keys)


def test_a_code_pattern_is_drawn_in_the_brightness_and_contrast_of_a_patch(digits_run):
    """Reference: the atom un-whitened by hand (pseudo-inverse of the whitening, plus the mean),
    then the contrast scaling undone with the patch's own mean and standard deviation."""
    from pipeline.extraction.codes import CONTRAST, brightness_contrast

    run = pipeline.load(digits_run)
    p = run.table.metadata
    pid = int(np.flatnonzero(p["atom"] >= 0)[0])
    shape = next(s for s in run.dictionary.shapes if (s.h, s.w) == (p["h"][pid], p["w"][pid]))
    img = digits_images("test", 1)[0][0]
    patch = img[: shape.h, : shape.w]
    b, c = brightness_contrast(patch)
    assert (b, c) == (pytest.approx(patch.mean()), pytest.approx(patch.astype(float).std()))
    atom = shape.atoms[int(p["atom"][pid])].astype(np.float64) @ np.linalg.pinv(shape.whiten.astype(np.float64)) + shape.mean
    want = np.clip(np.rint(atom * np.sqrt(c**2 + CONTRAST) + b), 0, 255).astype(np.uint8).reshape(shape.h, shape.w, 1)
    assert np.array_equal(run.pattern_pixels([pid], like=(b, c))[0], want)
    exact = int(np.flatnonzero(p["atom"] < 0)[0])  # an exact pattern keeps its first example
    assert np.array_equal(run.pattern_pixels([exact], like=(b, c))[0], run.pattern_pixels([exact])[0])


def test_an_answers_nearest_patterns_put_the_patchs_own_view_and_shape_first(digits_run):
    from pipeline.query.report import query_one

    run = pipeline.load(digits_run)
    res, lookup = query_one(run, digits_images("test", 1)[0][0], "x", k=8, patches=10)
    mixed = 0
    for p in res["patches"]:
        same = [(n["view"], n["h"], n["w"]) == (p["view"], p["h"], p["w"]) for n in p["nearest"]]
        assert same == sorted(same, reverse=True)  # own kind first
        for group in (True, False):
            d = [n["distance"] for n, s in zip(p["nearest"], same) if s == group]
            assert d == sorted(d)
        r = int(np.flatnonzero(lookup.slots == p["slot"])[0])
        assert sorted(n["pattern_id"] for n in p["nearest"]) == sorted(int(i) for i in lookup.ids[r] if i >= 0)  # the same ones, reordered
        mixed += 0 < sum(same) < len(same)
    assert mixed > 0  # the reordering had something to do
