"""The code view: dictionary fit, coding against brute force, whitening, golden keys, weights through
shards, training and query on a code-view run, and refused dictionary mismatches."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline
from cli.main import main
from pipeline import ExtractConfig, TrainConfig
from pipeline.extraction import codes
from pipeline.config import POSITION_MODES
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.hashing import KeyPlan, grid_cell, reference_code_key
from pipeline.data.images import encode_png

from .conftest import digits_images

# code-view keys by their definition (docs/hashing.md, "Code view"): (atom, h, w, cell, seed, mode) -> key
GOLDEN = [
    ((0, 6, 6, -1, 0, "grid"), 0x18942BDA82B00424),
    ((5, 6, 6, 3, 0, "grid"), 0x0F6843BFDA3CB64E),
    ((1023, 4, 8, 0, 7, "offset"), 0x8ECD1243ACE18AB0),
]


def small_dictionary(shapes=((2, 2), (2, 3)), atoms=8, eps=0.1, seed=0, channels=1, norm="contrast"):
    imgs, _ = digits_images("train", 200)
    if channels == 3:
        imgs = np.repeat(imgs, 3, -1)
    return codes.fit([imgs[:100], imgs[100:]], list(shapes), atoms, eps, 3000, seed, channels, norm), imgs


def test_fit_is_deterministic_for_a_seed():
    a, _ = small_dictionary(seed=3)
    b, _ = small_dictionary(seed=3)
    c, _ = small_dictionary(seed=4)
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert [(s.h, s.w, s.atoms.shape) for s in a.shapes] == [(2, 2, (8, 4)), (2, 3, (8, 6))]


@pytest.mark.parametrize("norm,eps", [("contrast", 0.1), ("none", 0.001)])
@pytest.mark.parametrize("weighting", ["triangle", "hard"])
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (8, 2)])
def test_coding_equals_brute_force(weighting, k, stride, norm, eps):
    d, imgs = small_dictionary(eps=eps, norm=norm)
    assert d.norm == norm
    atoms, weights = d.code(imgs[:20], stride, k, weighting)
    ref_atoms, ref_weights = codes.brute_force(imgs[:20], d, stride, k, weighting)
    assert atoms.dtype == np.uint16 and atoms.shape == ref_atoms.shape
    assert np.array_equal(atoms.astype(np.int64), ref_atoms)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-4)
    if weighting == "hard":
        assert (weights == 1).all()
    else:
        assert (weights >= 0).all() and (weights > 0).any()


@pytest.mark.parametrize("k", [1, 5, 16])
def test_coding_over_many_chunks_with_ties_equals_brute_force(k):
    """Dictionaries larger than one chunk of the selection (here 70 atoms: four whole chunks and a
    tail), with atoms repeated so that distances tie exactly across chunks: the k nearest, ties to
    the lower id, and their weights as the float64 reference has them."""
    d, imgs = small_dictionary(shapes=((3, 3),), atoms=50, eps=0.01)
    s = d.shapes[0]
    s.atoms = np.ascontiguousarray(np.concatenate([s.atoms, s.atoms[[3, 17, 40, 0, 33, 33, 9, 21, 48, 1, 16, 31, 32, 47, 2, 5, 6, 7, 8, 10]]]))
    assert len(s.atoms) == 70 and len(s.atoms) // codes.CHUNK == 4
    atoms, weights = d.code(imgs[:25], 1, k, "triangle")
    ref_atoms, ref_weights = codes.brute_force(imgs[:25], d, 1, k, "triangle")
    assert np.array_equal(atoms.astype(np.int64), ref_atoms)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-4)
    assert k == 1 or (atoms >= 50).any()  # copies are chosen, so the ties are exercised


@pytest.mark.parametrize("k,weighting", [(1, "triangle"), (4, "triangle"), (3, "hard")])
def test_both_signs_equal_brute_force(k, weighting):
    """``code_signs`` both: each patch's k nearest atoms to z, then the k nearest to -z as ids
    K + atom, with the triangle weights of each sign's own distances, against the float64
    reference; 70 atoms (four groups of the selection and a tail)."""
    d, imgs = small_dictionary(shapes=((3, 3), (2, 4)), atoms=70, eps=0.01)
    atoms, weights = d.code(imgs[:12], 1, k, weighting, signs=2)
    ref_atoms, ref_weights = codes.brute_force(imgs[:12], d, 1, k, weighting, signs=2)
    assert atoms.shape == ref_atoms.shape == (12, 2 * k * (36 + 35))
    assert np.array_equal(atoms.astype(np.int64), ref_atoms)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-4)
    one, _ = d.code(imgs[:12], 1, k, weighting)
    per = atoms[:, : 2 * k * 36].reshape(12, 2 * k, 36)
    assert np.array_equal(per[:, :k], one[:, : k * 36].reshape(12, k, 36))  # the first k ranks are the one-sign code
    assert (per[:, k:] >= 70).all() and (per[:, :k] < 70).all()


def test_both_signs_pooled_equal_the_per_location_codes_summed():
    d, imgs = small_dictionary(shapes=((3, 3),), atoms=20, eps=0.01)
    cells = np.arange(36) % 4
    atoms, weights = d.code(imgs[:10], 1, 20, "triangle", [cells], 4, signs=2)
    ref_atoms, ref_weights = codes.brute_force(imgs[:10], d, 1, 20, "triangle", signs=2)
    ref = np.zeros((10, 40, 4))
    for i in range(10):
        np.add.at(ref[i], (ref_atoms[i], np.tile(cells, 40)), ref_weights[i])
    assert (atoms == np.repeat(np.arange(40), 4)).all()
    np.testing.assert_allclose(weights, ref.reshape(10, -1), rtol=1e-4, atol=1e-3)


def test_both_signs_keys_are_atoms_of_their_own():
    """A plan with both signs keys atom id K + a like atom K + a of a dictionary twice as large, at
    the ranks after the k nearest; the key table holds both; too many atoms for 16 bits are refused."""
    d, imgs = small_dictionary(shapes=((3, 3),), atoms=12)
    plan = KeyPlan(ExtractConfig(color="gray", code_shapes="3x3", atoms=12, code_k=2, code_signs="both", grid=3), 8, 8, d)
    one = KeyPlan(ExtractConfig(color="gray", code_shapes="3x3", atoms=12, code_k=2, grid=3), 8, 8, d)
    assert plan.code_slots == 2 * one.code_slots == 4 * 36 and plan.code_ranks == 4
    keys, weights = plan.encode(imgs[:3])
    atoms, _ = plan.codes(imgs[:3])
    t = plan.slot_table
    code = np.flatnonzero(plan.is_code(np.arange(plan.keys_per_image)))
    for slot in code[:: 17]:
        a = int(atoms[0, slot - plan.exact_patches]) if plan.keys_per_image == plan.patches_per_image else None
        rank, cell = int(t["rank"][slot]), int(t["cell"][slot])
        assert (a >= 12) == (rank >= 2)
        assert plan.atom_sign(a) == (rank >= 2, a % 12)  # how a pattern's atom id is shown
        assert keys[0, slot] == reference_code_key(a, 3, 3, cell, 0, "grid")
    table = plan.code_key_table()
    assert set(table["atom"].tolist()) == set(range(24)) and len(np.unique(table["key"])) == len(table["key"])
    assert coded(code_signs="both").fingerprint() != coded().fingerprint()
    with pytest.raises(ParameterError, match="32768 is more than 32767 with `code_signs` both"):
        ExtractConfig(code_signs="both", atoms=32768)
    with pytest.raises(ParameterError, match="'two' is not one of one, both"):
        ExtractConfig(code_signs="two")


def test_coding_in_blocks_equals_one_block(monkeypatch):
    d, imgs = small_dictionary()
    whole = d.code(imgs[:30], 1, 3, "triangle")
    monkeypatch.setattr(codes, "BLOCK_DISTANCES", 37 * 8)  # blocks of 37 patches at 8 atoms, the last one partial
    assert codes.block_rows(8) == 37
    parts = d.code(imgs[:30], 1, 3, "triangle")
    assert np.array_equal(whole[0], parts[0])
    assert np.array_equal(whole[1].view(np.uint32), parts[1].view(np.uint32))  # a patch's weights do not depend on its block


def test_codes_do_not_depend_on_the_thread_count():
    """The compiled selection on one thread and on two: the same atoms and the same weights, bit for bit."""
    import numba

    d, imgs = small_dictionary(norm="none", eps=0.001)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = d.code(imgs[:40], 1, 3, "triangle")
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = d.code(imgs[:40], 1, 3, "triangle")
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1].view(np.uint32), two[1].view(np.uint32))


def _colour_images(n):
    """RGB images (from digits) whose channels differ and are not left-right symmetric."""
    imgs, labels = digits_images("train", n)
    g = imgs[..., 0]
    return np.stack([g, g // 2, np.roll(g, 3, axis=1)], -1), labels


@pytest.mark.parametrize("atoms", [16, 9])
def test_a_mirrored_fit_is_closed_under_mirroring(atoms, tmp_path):
    imgs, _ = _colour_images(200)
    d = codes.fit([imgs], [(3, 3), (2, 3)], atoms, 0.1, 3000, 0, 3, mirror=True)
    plain = codes.fit([imgs], [(3, 3), (2, 3)], atoms, 0.1, 3000, 0, 3)
    assert d.mirrors is not None and plain.mirrors is None
    pairs = d.mirrors
    assert sorted(pairs) == list(range(atoms)) and np.array_equal(pairs[pairs], np.arange(atoms))  # an involution
    for s in d.shapes:
        assert len(s.atoms) == atoms
        # mirror every atom as a patch by hand (h x w x C, columns reversed): the atom it maps to
        by_hand = s.atoms.reshape(atoms, s.h, s.w, 3)[:, :, ::-1].reshape(atoms, -1)
        assert np.array_equal(by_hand, s.atoms[pairs])
    d.save(tmp_path / "d.npz")
    assert codes.Dictionary.load(tmp_path / "d.npz").mirrors is not None  # a saved dictionary keeps it, with no field of its own


@pytest.mark.parametrize("k,signs,stride", [(1, 1, 1), (4, 1, 1), (3, 2, 1), (2, 1, 2)])
def test_mirrored_codes_are_nearest_atoms_of_the_mirrored_images(k, signs, stride):
    """The codes taken from the originals' are a k-nearest choice for each patch of the mirrored images:
    float64 distances of the atoms they name equal the brute-force k smallest, and the weights match.
    (Where a patch is itself symmetric, an atom and its mirror tie exactly, so the ids may differ from
    a scan's lowest-id choice; the distances may not.)"""
    imgs, _ = _colour_images(60)
    d = codes.fit([imgs], [(3, 3), (4, 3)], 12, 0.1, 3000, 0, 3, mirror=True)
    imgs = imgs[:, :, :7]  # 8 x 7: with stride 2 the locations x = 0, 2, 4 of both shapes mirror onto each other
    flipped = np.ascontiguousarray(imgs[:, :, ::-1])
    atoms, weights = d.code(imgs, stride, k, "triangle", signs=signs)
    got_a, got_w = d.mirrored(atoms, weights, 8, 7, stride, k, signs)
    ref_a, ref_w = codes.brute_force(flipped, d, stride, k, "triangle", signs)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-4, atol=1e-4)
    col = 0
    for s in d.shapes:
        view = np.lib.stride_tricks.sliding_window_view(flipped.astype(np.float64), (s.h, s.w), axis=(1, 2))[:, ::stride, ::stride]
        ny, nx = view.shape[1:3]
        p = view.transpose(0, 1, 2, 4, 5, 3).reshape(len(imgs) * ny * nx, -1)
        p = (p - p.mean(1, keepdims=True)) / np.sqrt(p.var(1, keepdims=True) + codes.CONTRAST)
        z = (p - s.mean) @ s.whiten.astype(np.float64)
        signed = np.concatenate([s.atoms, -s.atoms]).astype(np.float64)  # id K + a: atom a for the negative, i.e. -z to a
        dist = np.sqrt(((z[:, None, :] - signed[None]) ** 2).sum(-1))  # |z - (-c)| = |-z - c|
        size = k * signs * ny * nx

        def per_patch(a):
            return a[:, col : col + size].reshape(len(imgs), k * signs, ny * nx).transpose(0, 2, 1).reshape(-1, k * signs).astype(np.int64)

        rows = np.arange(len(z))[:, None]
        np.testing.assert_allclose(dist[rows, per_patch(got_a)], dist[rows, per_patch(ref_a)], rtol=1e-5, atol=1e-6)
        col += size
    assert (got_a == ref_a).mean() > 0.9  # most patches have no tie at all


def test_extract_codes_flipped_copies_from_their_originals(tmp_path):
    """With --augment flip a fitted dictionary is mirror-closed and each copy's code is its original's,
    mirrored: keys equal to those :meth:`Dictionary.mirrored` gives, weights equal to coding the
    copy itself (up to float rounding); workers 1 and 2 write the same bytes."""
    from pipeline.data import augment

    imgs, labels = _colour_images(24)
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=16, code_k=3, grid=2, code_sample=2000)
    runs = {w: pipeline.extract(pipeline.from_arrays(imgs, labels), tmp_path / f"w{w}", cfg, augment="flip", images_per_shard=5, workers=w)
            for w in (1, 2)}
    sh = pipeline.open_shards(tmp_path / "w1")
    d = sh.dictionary()
    assert d.mirrors is not None and runs[1]["fingerprint"] == runs[2]["fingerprint"]
    ids = np.concatenate([b.image_ids for b in sh.iter_content()])
    stored = np.concatenate([b.atoms for b in sh.iter_content()])
    stored_w = np.concatenate([b.weights for b in sh.iter_content()])
    copies = ids >= augment.VARIANT_STRIDE
    assert copies.sum() == 24
    own_a, own_w = d.code(imgs, 1, 3, "triangle")
    want_a, want_w = d.mirrored(own_a, own_w, 8, 8, 1, 3)
    assert np.array_equal(stored[~copies], own_a) and np.array_equal(stored[copies], want_a)
    assert np.array_equal(stored_w[copies].view(np.uint32), want_w.view(np.uint32))
    np.testing.assert_allclose(stored_w[copies], d.code(np.ascontiguousarray(imgs[:, :, ::-1]), 1, 3, "triangle")[1], rtol=1e-4, atol=1e-4)
    for name in sorted(p.name for p in (tmp_path / "w1").glob("*.parquet")):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert KeyPlan(sh.config, 8, 8, d).mirrors_codes  # pooled codes are coded directly: cells do not mirror onto each other
    assert not KeyPlan(dataclasses.replace(sh.config, code_pool="grid"), 8, 8, d).mirrors_codes
    none = pipeline.extract(pipeline.from_arrays(imgs, labels), tmp_path / "none", cfg, augment="none")
    assert pipeline.open_shards(tmp_path / "none").dictionary().mirrors is None and none["images"] == 24


def test_flip_variant_numbers_the_mirror_among_the_copies():
    from pipeline.data.augment import flip_variant

    assert (flip_variant("flip"), flip_variant("shift:1,flip"), flip_variant("shift:2"), flip_variant("none")) == (1, 9, 0, 0)


def test_scaled_atoms_are_drawn_in_their_own_colours(tmp_path):
    """Without whitening, an atom of pixels on [0, 1] is its mean patch: drawn as round(255 * (atom + mean)),
    not stretched; the scaling survives saving, and a file written without one is contrast-normalised."""
    d, _ = small_dictionary(eps=0.0, norm="none", channels=3)
    s = d.shapes[0]
    expect = np.clip(np.rint((s.atoms.astype(np.float64) + s.mean) * 255), 0, 255).astype(np.uint8)
    drawn = s.pixels(3).reshape(2 * len(s.atoms), -1)
    assert np.array_equal(drawn[: len(s.atoms)], expect)
    assert np.array_equal(drawn[len(s.atoms) :], np.clip(np.rint((s.mean - s.atoms.astype(np.float64)) * 255), 0, 255).astype(np.uint8))  # the negatives
    d.save(tmp_path / "d.npz")
    assert codes.Dictionary.load(tmp_path / "d.npz").norm == "none"
    with np.load(tmp_path / "d.npz") as z:
        old = {k: z[k] for k in z.files if k != "norm"}
    np.savez(tmp_path / "old.npz", **old)
    assert codes.Dictionary.load(tmp_path / "old.npz").norm == "contrast"


def test_whitening_on_a_known_covariance():
    # points +-sqrt(d * lambda_i) along the axes of a rotation: mean 0, covariance exactly R diag(lambda) R^T
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lam = np.array([9.0, 4.0, 0.25])
    pts = np.concatenate([np.sqrt(3 * lam)[:, None] * np.eye(3), -np.sqrt(3 * lam)[:, None] * np.eye(3)]) @ q.T
    cov = np.cov(pts, rowvar=False)
    mu, w = codes.zca(pts, 0.01)
    np.testing.assert_allclose(mu, 0, atol=1e-6)
    lam_sample = lam * len(pts) / (len(pts) - 1)  # np.cov divides by n - 1
    expect = q @ np.diag(1 / np.sqrt(lam_sample + 0.01)) @ q.T
    np.testing.assert_allclose(w, expect, rtol=1e-4, atol=1e-5)
    # whitened covariance: lambda / (lambda + eps) along each axis, so near 1 where lambda >> eps
    np.testing.assert_allclose(w @ cov @ w, q @ np.diag(lam_sample / (lam_sample + 0.01)) @ q.T, atol=1e-5)
    _, off = codes.zca(pts, 0.0)
    assert np.array_equal(off, np.eye(3, dtype=np.float32))  # --whiten 0 is no whitening


@pytest.mark.parametrize("args,key", GOLDEN)
def test_golden_code_keys(args, key):
    assert reference_code_key(*args) == key


def coded(**kw) -> ExtractConfig:
    """A resolved RGB config with a code view (what a fingerprint needs), ``kw`` overriding any field."""
    return ExtractConfig(**{"color": "rgb", "views": "levels", "max_h": 2, "max_w": 2, "grid": 4, "code_shapes": "6x6", "atoms": 12,
                            "code_k": 2, "code_position": "same", "dictionary": "ab" * 32, **kw})


def test_code_position_is_parsed_and_keyed_apart_and_same_hashes_as_before_it_existed():
    import hashlib

    from pipeline.config import HASH_VERSION

    d = coded().to_dict()
    for k in ("code_position", "code_norm", "code_pool", "code_signs", "views"):  # defaults that hash as before they existed
        del d[k]
    want = hashlib.sha256(json.dumps({"hash": HASH_VERSION, **d}, sort_keys=True).encode()).hexdigest()[:16]
    assert coded().fingerprint() == want == coded(code_position="same").fingerprint()
    assert coded(code_position="offset, GRID").code_position == "grid,offset"
    assert coded(code_position="grid,offset").fingerprint() not in (want, coded(position="grid,offset").fingerprint())
    assert coded(code_position="grid,offset").code_position_modes == ("grid", "offset") and coded().code_position_modes == ("grid",)
    old = coded().to_dict()
    del old["code_position"]  # a manifest written before the field existed
    assert ExtractConfig.from_dict(old).code_position == "same"
    for bad in ("diagonal", "grid,grid"):
        with pytest.raises(ParameterError, match="code_position"):
            coded(code_position=bad)
    with pytest.raises(ParameterError, match="pooled code view"):
        coded(code_position="offset", code_pool="grid")
    with pytest.raises(PipelineError, match="code key kinds"):
        coded(code_position="auto").fingerprint()


def test_code_position_auto_adds_a_shared_key_on_a_large_code():
    """auto: position's kinds plus none on a large code (6x6 RGB), unpooled and without none already; else same."""
    def resolved(color, side, **kw):
        return KeyPlan(ExtractConfig(color=color, **kw), side, side).config

    assert resolved("rgb", 32).code_position == "both" and resolved("rgb", 32).code_position_modes == ("none", "grid")
    assert resolved("rgb", 32, position="grid,offset").code_position_modes == ("none", "grid", "offset")
    for color, side, kw in [("gray", 8, {}), ("gray", 28, {}), ("rgb", 8, {}), ("rgb", 32, {"code_pool": "grid"}), ("rgb", 32, {"position": "both"})]:
        assert resolved(color, side, **kw).code_position == "same", (color, side, kw)
    plan = KeyPlan(ExtractConfig(color="rgb", views="none"), 32, 32)
    assert plan.keys_per_image == 2 * plan.code_slots  # every code patch's atom keyed in its cell and without one


@pytest.mark.parametrize("position,grid,code_position", [("grid", 3, "same"), ("none,grid,offset", 2, "same"), ("grid", 3, "grid,offset"), ("none", 2, "offset")])
def test_plan_code_keys_equal_the_reference(position, grid, code_position):
    d, imgs = small_dictionary()
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, position=position, grid=grid, code_shapes="2x2,2x3",
                        atoms=8, code_k=3, seed=5, dictionary=d.digest(), code_position=code_position)
    plan = KeyPlan(cfg, 8, 8, d)
    keys, weights = plan.encode(imgs[:4])
    atoms, w = d.code(imgs[:4], 1, 3, "triangle")
    t = plan.slot_table
    code = np.flatnonzero(plan.is_code(np.arange(plan.keys_per_image)))
    exact = np.setdiff1d(np.arange(plan.keys_per_image), code)
    modes = position.split(",") if code_position == "same" else code_position.split(",")
    assert len(code) == len(modes) * 3 * (7 * 7 + 7 * 6)
    assert {POSITION_MODES[m] for m in t["mode"][code]} == set(modes)  # the code view's key kinds
    assert {POSITION_MODES[m] for m in t["mode"][exact]} == set(position.split(","))  # the exact views' stay
    shape_base = {(2, 2): 0, (2, 3): 3 * 49}
    for s in code[::7]:
        h, wd, rank = int(t["h"][s]), int(t["w"][s]), int(t["rank"][s])
        n_loc = 7 * (9 - wd)
        loc = (t["y"][s]) * (9 - wd) + t["x"][s]
        col = shape_base[(h, wd)] + rank * n_loc + loc
        for n in range(4):
            ref = reference_code_key(int(atoms[n, col]), h, wd, int(t["cell"][s]), 5, POSITION_MODES[t["mode"][s]])
            assert int(keys[n, s]) == ref
            assert weights[n, s] == w[n, col]
    assert (weights[:, exact] == 1).all()
    table = plan.code_key_table()
    assert np.isin(keys[:, code], table["key"]).all() and len(np.unique(table["key"])) == len(table["key"])


@pytest.fixture(scope="session")
def code_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=32, code_k=3, grid=2, code_sample=5000)
    m = pipeline.extract(pipeline.open_source("digits", split="train"), root / "shards", cfg)
    pipeline.train(pipeline.open_shards(root / "shards"), root / "run", TrainConfig(epochs=2, dim=16))
    return root, m


def test_weights_round_trip_through_shards(code_run):
    root, m = code_run
    sh = pipeline.open_shards(root / "shards")
    d = sh.dictionary()
    imgs, _ = digits_images("train")
    content = np.concatenate([b.atoms for b in sh.iter_content()])
    stored_w = np.concatenate([b.weights for b in sh.iter_content()])
    atoms, weights = d.code(imgs, 1, 3, "triangle")
    assert np.array_equal(content, atoms)
    np.testing.assert_allclose(stored_w, weights, rtol=1e-6)
    plan = KeyPlan(sh.config, 8, 8, d)
    keys, w = plan.encode(imgs[:50])
    read = next(sh.iter_batches())
    assert np.array_equal(read.keys[:50], keys) and np.array_equal(read.weights[:50], w)
    assert m["code_slots"] == 3 * 36 and m["format"] == "patchhash-shards-v3"


def test_bags_sum_weights_per_distinct_key(code_run):
    root, _ = code_run
    run = pipeline.load(root / "run")
    imgs, _ = digits_images("test", 3)
    keys, weights = run.encode(imgs)
    rows, offsets, counts = run.vocab.bags(keys, weights)
    for n in range(3):
        r = run.vocab.rows_of(keys[n])
        expect = {}
        for row, wt in zip(r, weights[n]):
            if row >= 0:
                expect[int(row)] = expect.get(int(row), 0.0) + float(wt)
        got = dict(zip(rows[offsets[n] : offsets[n + 1]].tolist(), counts[offsets[n] : offsets[n + 1]].tolist()))
        assert got.keys() == expect.keys()
        np.testing.assert_allclose([got[k] for k in expect], list(expect.values()), rtol=1e-5)


def test_code_patterns_show_their_atom(code_run):
    root, _ = code_run
    run = pipeline.load(root / "run")
    p = run.table.metadata
    code = np.flatnonzero(p["atom"] >= 0)
    assert len(code) and (p["atom"][p["view"] == 1] >= 0).all() and (p["atom"][p["view"] == 0] == -1).all()
    drawn = run.dictionary.shapes[0].pixels(1)
    pix = run.pattern_pixels(code[:5])
    for i, img in zip(code[:5], pix):
        assert np.array_equal(img, drawn[p["atom"][i]])


def test_query_and_evaluate_match_predict(code_run, tmp_path):
    root, _ = code_run
    run = pipeline.load(root / "run")
    imgs, labels = digits_images("test", 40)
    pred, _ = run.predict(imgs)
    r = CliRunner().invoke(main, ["evaluate", str(root / "run"), "digits", "--split", "test", "--limit", "40", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(float((pred == labels).mean()))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode_png(imgs[i]))
    r = CliRunner().invoke(main, ["query", str(root / "run"), *map(str, paths), "--json", "--patches", "3"])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["prediction"] for o in out] == [run.class_names[p] for p in pred[:3]]


def test_dictionary_mismatch_is_refused(code_run, tmp_path):
    root, _ = code_run
    other, _ = small_dictionary(shapes=((3, 3),), atoms=32)
    bad = tmp_path / "other.npz"
    other.save(bad)
    run_copy = tmp_path / "run"
    import shutil

    shutil.copytree(root / "run", run_copy)
    shutil.copyfile(bad, run_copy / "dictionary.npz")
    with pytest.raises(PipelineError, match="is not the one these keys were made with"):
        pipeline.load(run_copy)
    r = CliRunner().invoke(main, ["evaluate", str(run_copy), "digits", "--split", "test"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: dictionary ")
    shards_copy = tmp_path / "shards"
    shutil.copytree(root / "shards", shards_copy)
    shutil.copyfile(bad, shards_copy / "dictionary.npz")
    r = CliRunner().invoke(main, ["train", str(shards_copy), "--out", str(tmp_path / "run2"), "--epochs", "1"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: dictionary ") and "Traceback" not in r.output


def test_test_set_coded_with_the_training_dictionary(code_run, tmp_path):
    root, m = code_run
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=32, code_k=3, grid=2, code_sample=5000)
    mt = pipeline.extract(pipeline.open_source("digits", split="test"), tmp_path / "test", cfg, dictionary=root / "shards" / "dictionary.npz")
    assert mt["fingerprint"] == m["fingerprint"]  # same keys: the run accepts these shards
    run = pipeline.load(root / "run")
    a = run.evaluate(pipeline.open_shards(tmp_path / "test"))
    b = run.evaluate(pipeline.open_source("digits", split="test"))
    assert a["accuracy"] == b["accuracy"] and a["n"] == 899
    with pytest.raises(PipelineError, match="same `code_shapes`"):
        pipeline.extract(pipeline.open_source("digits", split="test"), tmp_path / "t2",
                         ExtractConfig(code_shapes="2x2", atoms=32), dictionary=root / "shards" / "dictionary.npz")


def test_shards_of_format_v2_still_load(tmp_path):
    # a v2 directory is a v3 one without code columns, recorded as v2 (no code fields in its config)
    imgs, labels = digits_images("train", 30)
    cfg = ExtractConfig(code_shapes="none", grid=3)
    m = pipeline.extract(pipeline.from_arrays(imgs, labels), tmp_path / "s", cfg, augment="none")
    path = tmp_path / "s" / "manifest.json"
    old = json.loads(path.read_text())
    old["format"] = "patchhash-shards-v2"
    for k in ("code_shapes", "atoms", "code_k", "code_weight", "whiten", "code_stride", "code_sample", "dictionary"):
        del old["config"][k]
    path.write_text(json.dumps(old))
    sh = pipeline.open_shards(tmp_path / "s")
    assert sh.fingerprint == m["fingerprint"] == sh.config.fingerprint() and sh.code_slots == 0
    keys = np.concatenate([b.keys for b in sh.iter_batches()])
    assert np.array_equal(keys, KeyPlan(sh.config, 8, 8).image_keys(imgs)) and next(sh.iter_batches()).weights is None


def test_auto_settings_follow_the_image_size():
    assert codes.auto_shapes(8, 8) == [(4, 4, 1)] and codes.auto_shapes(3, 9) == []
    assert codes.auto_shapes(16, 16) == [(6, 6, 1)]  # an 8 x 8 half-size image holds one 6 x 6 square, not two
    assert codes.auto_shapes(32, 32) == codes.auto_shapes(24, 40) == [(6, 6, 1), (6, 6, 2)]
    from pipeline.extraction.hashing import auto_grid

    assert (auto_grid(8, 8), auto_grid(32, 32), auto_grid(64, 48)) == (3, 4, 6)
    plan = KeyPlan(ExtractConfig(views="none", color="rgb"), 32, 32)
    assert plan.config.code_shapes == "6x6,6x6/2" and plan.config.grid == 4 and plan.code_slots == 5 * 27 * 27 + 5 * 11 * 11
    from pipeline.data.augment import resolve

    assert (resolve("auto", 3), resolve("auto", 1), resolve("shift:1", 3)) == ("flip", "none", "shift:1")


def test_auto_atoms_follow_the_code_patch_values():
    # 6x6 x 3 = 108 values > 64: 4,096; 4x4 gray (16), 6x6 gray (36) and 4x4 RGB (48): 1,024
    sizes = [("rgb", 32), ("gray", 8), ("gray", 28), ("rgb", 8)]
    resolved = {(c, s): KeyPlan(ExtractConfig(color=c), s, s).config for c, s in sizes}
    assert {k: c.atoms for k, c in resolved.items()} == {("rgb", 32): 4096, ("gray", 8): 1024, ("gray", 28): 1024, ("rgb", 8): 1024}
    assert {k: c.large_code for k, c in resolved.items()} == {("rgb", 32): True, ("gray", 8): False, ("gray", 28): False, ("rgb", 8): False}
    assert not KeyPlan(ExtractConfig(color="rgb", code_shapes="none"), 32, 32).config.large_code  # no code view
    assert codes.auto_atoms([(4, 4), (6, 6)], 3) == 4096 and codes.auto_atoms([], 3) == 1024  # any shape over 64 values
    assert KeyPlan(ExtractConfig(color="rgb", atoms=64), 32, 32).config.atoms == 64  # a number given is kept
    with pytest.raises(ParameterError, match="code_k 1500 must be from 1 to atoms \\(1024\\)"):
        KeyPlan(ExtractConfig(color="gray", code_k=1500), 8, 8)  # checked against the resolved count
    with pytest.raises(ParameterError, match="atoms 1 must be 0 \\(auto\\) or from 2"):
        ExtractConfig(atoms=1)


def _pooled_reference(d, imgs, k, weighting, cells, n_cells):
    """Per-location codes of the float64 reference, their weights summed per cell in float64:
    N x atoms x cells, the pooled slot order flattened."""
    ref_atoms, ref_weights = codes.brute_force(imgs, d, 1, k, weighting)
    n, locations = len(imgs), len(cells)
    out = np.zeros((n, len(d.shapes[0].atoms), n_cells))
    atoms = ref_atoms.reshape(n, k, locations)
    weights = ref_weights.reshape(n, k, locations)
    for i in range(n):
        np.add.at(out[i], (atoms[i].ravel(), np.tile(cells, k)), weights[i].ravel())
    return out.reshape(n, -1)


@pytest.mark.parametrize("k,weighting", [(20, "triangle"), (3, "triangle"), (5, "hard")])
def test_pooled_coding_equals_brute_force_summed_per_cell(k, weighting):
    """The pooled code view (every atom, or the k nearest, of every patch, summed per cell before
    anything is written) against the float64 reference coded patch by patch and summed per cell."""
    d, imgs = small_dictionary(shapes=((3, 3),), atoms=20, eps=0.01)
    cells = np.array([(y >= 3) * 2 + (x >= 2) for y in range(6) for x in range(6)])  # 6 x 6 locations, uneven cells
    atoms, weights = d.code(imgs[:15], 1, k, weighting, [cells], 4)
    ref = _pooled_reference(d, imgs[:15], k, weighting, cells, 4)
    assert atoms.shape == weights.shape == (15, 80) and (atoms == np.repeat(np.arange(20), 4)).all()
    np.testing.assert_allclose(weights, ref, rtol=1e-4, atol=1e-3)
    assert (weights > 0).any() and (k < 20 or weighting == "hard" or (weights == 0).any() or True)


def test_pooled_codes_do_not_depend_on_the_thread_count():
    import numba

    d, imgs = small_dictionary(shapes=((3, 3),), atoms=20)
    cells = np.arange(36) % 4
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = d.code(imgs[:40], 1, 20, "triangle", [cells], 4)[1]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = d.code(imgs[:40], 1, 20, "triangle", [cells], 4)[1]
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.view(np.uint32), two.view(np.uint32))


def _per_key(keys: np.ndarray, weights: np.ndarray) -> list[dict]:
    out = []
    for ks, ws in zip(keys, weights):
        acc: dict = {}
        for key, wt in zip(ks.tolist(), ws.tolist()):
            acc[key] = acc.get(key, 0.0) + wt
        out.append({key: wt for key, wt in acc.items() if wt})
    return out


def _pooled_equals_flat(pooled: KeyPlan, flat: KeyPlan, imgs: np.ndarray) -> tuple[dict, np.ndarray]:
    """Assert that ``pooled`` makes, per image, the code keys of ``flat`` with their weights summed;
    returns the pooled plan's slot table and which of its slots are the code view's."""
    pk, pw = pooled.encode(imgs)
    fk, fw = flat.encode(imgs)
    code_p, code_f = pooled.is_code(np.arange(pooled.keys_per_image)), flat.is_code(np.arange(flat.keys_per_image))
    got, want = _per_key(pk[:, code_p], pw[:, code_p]), _per_key(fk[:, code_f], fw[:, code_f])
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        np.testing.assert_allclose([g[key] for key in w], list(w.values()), rtol=1e-5, atol=1e-4)
    return pooled.slot_table, code_p


def test_pooled_keys_are_the_per_location_keys_summed():
    """A pooled plan makes the same keys as one that writes every location and atom with the pooled
    mode's position, and each key's weight is what the per-location keys of an image sum to: pooling
    before writing changes the size of the shards, not what training sees. The pooled slots' places
    are the rectangles their cells' patches cover."""
    d, imgs = small_dictionary(shapes=((3, 3),), atoms=12)
    imgs = imgs[:6]
    pooled = KeyPlan(ExtractConfig(color="gray", code_shapes="3x3", atoms=12, code_pool="coarse", grid=3), 8, 8, d)
    flat = KeyPlan(ExtractConfig(color="gray", code_shapes="3x3", atoms=12, code_k=12, position="coarse", grid=3), 8, 8, d)
    assert pooled.config.code_k == 12 and pooled.n_pool_cells == 4 and pooled.code_slots == 48
    assert flat.config.code_pool == "none" and flat.code_slots == 12 * 36
    t, code_p = _pooled_equals_flat(pooled, flat, imgs)
    slots = np.flatnonzero(code_p)[:4]  # atom 0 in the four coarse cells of the 6 x 6 locations
    assert [tuple(int(t[c][s]) for c in ("y", "x", "h", "w", "cell")) for s in slots] == [(0, 0, 5, 5, 0), (0, 3, 5, 5, 1), (3, 0, 5, 5, 2), (3, 3, 5, 5, 3)]


def test_code_k_auto_keeps_every_atom_when_pooled():
    unpooled = KeyPlan(ExtractConfig(color="gray", code_shapes="4x4", atoms=8), 8, 8)
    pooled = KeyPlan(ExtractConfig(color="rgb", code_shapes="6x6", atoms=8, code_pool="grid"), 16, 16)
    assert (unpooled.config.code_pool, unpooled.config.code_k, unpooled.n_pool_cells) == ("none", 5, 0)
    assert (pooled.config.code_k, pooled.n_pool_cells, pooled.code_slots) == (8, 9, 72)
    with pytest.raises(PipelineError, match=r"9 must be from 1 to atoms \(8\)"):
        ExtractConfig(code_k=9, atoms=8)
    with pytest.raises(PipelineError, match="'cells' is not one of none, grid, coarse, offset"):
        ExtractConfig(code_pool="cells")


def test_a_pooled_code_run_trains_answers_and_draws(tmp_path):
    """Extract with the code view pooled per coarse cell, train, and answer: the shards hold one
    weight per atom and cell, equal to the dictionary's pooled codes; query's answers are predict's;
    a decisive code pattern's place is its cell's rectangle; the PNG is written."""
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=16, code_pool="coarse", grid=3, code_sample=3000)
    m = pipeline.extract(pipeline.open_source("digits", split="train", limit=300), tmp_path / "shards", cfg)
    assert m["code_slots"] == 16 * 4 and m["config"]["code_k"] == 16 and m["config"]["code_pool"] == "coarse"
    sh = pipeline.open_shards(tmp_path / "shards")
    imgs, _ = digits_images("train", 300)
    plan = KeyPlan(sh.config, 8, 8, sh.dictionary())
    stored = np.concatenate([b.weights for b in sh.iter_content()])
    np.testing.assert_allclose(stored, plan.codes(imgs)[1], rtol=1e-6)
    pipeline.train(sh, tmp_path / "run", TrainConfig(epochs=2, dim=16, refit="off"))
    run = pipeline.load(tmp_path / "run")
    test, _ = digits_images("test", 3)
    pred, _ = run.predict(test)
    paths = []
    for i, img in enumerate(test):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode_png(img))
    r = CliRunner().invoke(main, ["query", str(tmp_path / "run"), *map(str, paths), "--json", "--patches", "20"])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["prediction"] for o in out] == [run.class_names[p] for p in pred]
    # 6 x 6 locations of 3x3 patches: rows (columns) 0-2 have their centres in the upper (left) half
    regions = {(0, 0, 5, 5), (0, 3, 5, 5), (3, 0, 5, 5), (3, 3, 5, 5)}
    places = [(p["y"], p["x"], p["h"], p["w"]) for o in out for p in o["patches"] if p["view"] == "code"]
    assert places and set(places) <= regions
    assert all(p["pooled"] and p["mode"] == POSITION_MODES.index("coarse") for o in out for p in o["patches"] if p["view"] == "code")
    r = CliRunner().invoke(main, ["query", str(tmp_path / "run"), str(paths[0]), "--patches", "20"])
    code = [p for p in out[0]["patches"] if p["view"] == "code"][0]
    assert f"at row {code['y']} col {code['x']} coarse cell {code['cell']}" in r.output  # the cell's kind is said
    assert f"code atom {code['rank']} weight" in r.output  # a pooled slot's rank is its atom
    r = CliRunner().invoke(main, ["query", str(tmp_path / "run"), str(paths[0]), "--png", str(tmp_path / "why.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "why.png").stat().st_size > 0


def test_overwrite_fits_a_new_dictionary_for_new_images(tmp_path):
    """``overwrite`` starts an extract from nothing: the dictionary of the images it replaces (same
    settings) is not kept, and the new one is what a fresh extract of the new images fits."""
    cfg = ExtractConfig(views="levels", max_h=2, max_w=2, code_shapes="3x3", atoms=8, code_k=2, code_sample=2000)
    imgs, labels = digits_images("train", 200)
    first, second = pipeline.from_arrays(imgs[:100], labels[:100]), pipeline.from_arrays(imgs[100:], labels[100:])
    a = pipeline.extract(first, tmp_path / "s", cfg)
    b = pipeline.extract(second, tmp_path / "s", cfg, overwrite=True)
    fresh = pipeline.extract(second, tmp_path / "fresh", cfg)
    assert a["fingerprint"] != b["fingerprint"] == fresh["fingerprint"]
    assert pipeline.open_shards(tmp_path / "s").dictionary().digest() == pipeline.open_shards(tmp_path / "fresh").dictionary().digest()


# ---------------------------------------------------------------- scaled code shapes (HxW/S)


def _block_means(imgs: np.ndarray, scale: int) -> np.ndarray:
    """The mean of every scale x scale block, pixel by pixel (float64)."""
    n, height, width, c = imgs.shape
    out = np.zeros((n, height // scale, width // scale, c))
    for y in range(height // scale):
        for x in range(width // scale):
            out[:, y, x] = imgs[:, y * scale : (y + 1) * scale, x * scale : (x + 1) * scale].astype(np.float64).mean((1, 2))
    return out


def test_code_shapes_with_a_scale_are_parsed_checked_and_written_back():
    from pipeline.config import parse_code_shapes

    assert parse_code_shapes("6x6/2, 6x6,4x4") == [(4, 4, 1), (6, 6, 1), (6, 6, 2)]
    assert ExtractConfig(code_shapes="6x6/2,6x6").code_shapes == "6x6,6x6/2"
    assert ExtractConfig(code_shapes="3x3/1").code_shapes == "3x3"
    for bad in ("6x6/0", "6x6/x", "6x6/2/2", "12x12,6x6/2"):
        with pytest.raises(ParameterError) as e:
            ExtractConfig(code_shapes=bad)
        assert e.value.param == "code_shapes"
    with pytest.raises(ParameterError, match="covering 10x10 pixels"):
        ExtractConfig(code_shapes="5x5/2").check_image_size(8, 8)
    ExtractConfig(code_shapes="4x4/2").check_image_size(8, 8)


@pytest.mark.parametrize("k,stride,signs", [(1, 1, 1), (3, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_a_scaled_shape_codes_the_block_averaged_image(k, stride, signs):
    """A 2x2/2 shape codes the image averaged over 2 x 2 blocks: the same atoms and weights as the
    same arrays at scale 1 coding block means computed pixel by pixel."""
    imgs, _ = _colour_images(40)
    d = codes.fit([imgs], [(2, 2, 1), (2, 2, 2)], 8, 0.1, 3000, 0, 3)
    assert [s.scale for s in d.shapes] == [1, 2]
    atoms, weights = d.code(imgs, stride, k, "triangle", signs=signs)
    first = k * signs * ((8 - 2) // stride + 1) ** 2  # the scale-1 shape's slots
    assert atoms.shape[1] == first + k * signs * ((4 - 2) // stride + 1) ** 2
    s = d.shapes[1]
    plain = codes.Dictionary([codes.ShapeCode(s.h, s.w, s.mean, s.whiten, s.atoms, s.norm)], 3)
    ref_a, ref_w = codes.brute_force(_block_means(imgs, 2), plain, stride, k, "triangle", signs)
    assert np.array_equal(atoms[:, first:].astype(np.int64), ref_a)
    np.testing.assert_allclose(weights[:, first:], ref_w, rtol=1e-4, atol=1e-4)


def test_plan_keys_a_scaled_shape_by_the_pixels_it_covers():
    """A 2x2/2 patch on 8 x 8 images covers 4 x 4 pixels, one every 2 pixels: its slots say so, its
    cells are those of the 4 x 4 patch there, and its keys are the reference code keys of a 4 x 4
    patch with the atom the coding chose."""
    imgs, _ = _colour_images(4)
    d = codes.fit([_colour_images(60)[0]], [(2, 2, 1), (2, 2, 2)], 8, 0.1, 3000, 0, 3)
    cfg = ExtractConfig(views="none", color="rgb", position="none,grid", grid=2, code_shapes="2x2,2x2/2", atoms=8, code_k=2, seed=3,
                        dictionary=d.digest(), code_position="same")
    plan = KeyPlan(cfg, 8, 8, d)
    keys, weights = plan.encode(imgs)
    atoms, w = d.code(imgs, 1, 2, "triangle")
    t = plan.slot_table
    scaled = np.flatnonzero(t["h"] == 4)
    assert len(scaled) == 2 * 2 * 9 and set(t["w"][scaled]) == {4}
    assert set(t["y"][scaled]) == set(t["x"][scaled]) == {0, 2, 4}
    first = 2 * 49  # the 2x2 shape's stored slots
    for slot in scaled:
        y, x, rank, mode = int(t["y"][slot]), int(t["x"][slot]), int(t["rank"][slot]), POSITION_MODES[t["mode"][slot]]
        cell = -1 if mode == "none" else grid_cell(y, x, 4, 4, 8, 8, 2, mode)
        assert int(t["cell"][slot]) == cell
        col = first + rank * 9 + (y // 2) * 3 + x // 2
        for n in range(len(imgs)):
            assert int(keys[n, slot]) == reference_code_key(int(atoms[n, col]), 4, 4, cell, 3, mode)
            assert weights[n, slot] == w[n, col]
    assert np.isin(keys, plan.code_key_table()["key"]).all()


def test_a_scaled_mirror_closed_dictionary_codes_mirrors_from_their_originals(tmp_path):
    imgs, _ = _colour_images(60)
    d = codes.fit([imgs], [(2, 2, 1), (3, 2, 2)], 12, 0.1, 3000, 0, 3, mirror=True)
    assert d.mirrors is not None and d.can_mirror(8, 1) and not d.can_mirror(7, 1)  # 7 columns do not average into whole blocks
    atoms, weights = d.code(imgs, 1, 3, "triangle")
    got_a, got_w = d.mirrored(atoms, weights, 8, 8, 1, 3)
    want_a, want_w = d.code(np.ascontiguousarray(imgs[:, :, ::-1]), 1, 3, "triangle")
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-4)
    assert (got_a == want_a).mean() > 0.9  # equal but for exact ties on symmetric patches
    d.save(tmp_path / "d.npz")
    back = codes.Dictionary.load(tmp_path / "d.npz")
    assert [(s.h, s.w, s.scale) for s in back.shapes] == [(2, 2, 1), (3, 2, 2)] and back.digest() == d.digest()
    plain = codes.fit([imgs], [(2, 2)], 12, 0.1, 3000, 0, 3)
    with np.load(io.BytesIO(plain.to_bytes())) as z:
        assert z["shapes"].shape == (1, 2)  # a dictionary without a scale saves as it always has


def test_scaled_atoms_are_drawn_over_the_pixels_they_cover():
    imgs, _ = _colour_images(60)
    d = codes.fit([imgs], [(2, 2, 1), (2, 3, 2)], 8, 0.1, 3000, 0, 3)
    one, two = d.shapes
    assert one.pixels(3).shape == (16, 2, 2, 3) and two.pixels(3).shape == (16, 4, 6, 3)
    drawn = two.pixels(3)
    assert np.array_equal(drawn[:, ::2, ::2], drawn[:, 1::2, 1::2])  # each value over its 2 x 2 block
    assert two.pixels_like([0, 3], 100.0, 20.0, 3).shape == (2, 4, 6, 3)


def test_a_scaled_shape_pools_the_per_location_keys_summed():
    """Pooling a 2x2/2 shape (4 x 4 pixels, every 2) gives the keys and summed weights of writing
    its every location and atom with the pooled mode's position."""
    d, imgs = small_dictionary(shapes=((2, 2, 2),), atoms=6)
    imgs = imgs[:5]
    pooled = KeyPlan(ExtractConfig(color="gray", code_shapes="2x2/2", atoms=6, code_pool="grid", grid=2), 8, 8, d)
    flat = KeyPlan(ExtractConfig(color="gray", code_shapes="2x2/2", atoms=6, code_k=6, position="grid", grid=2), 8, 8, d)
    assert pooled.n_pool_cells == 4 and pooled.code_slots == 6 * 4 and flat.code_slots == 6 * 9
    t, code_p = _pooled_equals_flat(pooled, flat, imgs)
    slots = np.flatnonzero(code_p)[:4]  # atom 0 in the four cells: of the 4 x 4 patches at y, x in {0, 2, 4}, those centred in each
    assert [tuple(int(t[c][s]) for c in ("y", "x", "h", "w", "cell")) for s in slots] == [(0, 0, 4, 4, 0), (0, 2, 4, 6, 1), (2, 0, 6, 4, 2), (2, 2, 6, 6, 3)]
