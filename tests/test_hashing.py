"""Keys from the fast path against the pure-Python specification, and the properties the product relies on."""
from __future__ import annotations

import functools

import numpy as np
import pytest

import pipeline
from pipeline.config import POSITION_MODES, ExtractConfig
from pipeline.errors import PipelineError
from pipeline.extraction.hashing import KeyPlan, grid_cell, reference_key
from pipeline.extraction.hashing import symbols

from .conftest import CIFAR_TAR, digits_images, one_view_config

CASES = [
    dict(max_h=3, max_w=3, shapes="rect", position="both"),
    dict(max_h=4, max_w=2, shapes="rect", position="grid", grid=3),
    dict(max_h=4, max_w=4, shapes="square", position="none"),
    dict(max_h=6, max_w=7, shapes="rect", position="both", grid=2),  # full enumeration of 6x7
    dict(max_h=2, max_w=2, position="none", seed=12345),
    dict(shapes="1x1,3x2,2x5", position="both", grid=3),  # an explicit shape list
    dict(max_h=3, max_w=3, stride=2, position="both", grid=2),  # every other position
    dict(max_h=6, max_w=7, stride=3, position="grid"),
    dict(max_h=3, max_w=2, position="none,grid,offset,coarse", grid=3),  # every key kind
    dict(max_h=2, max_w=3, stride=2, position="offset,coarse", grid=5),
]


def assert_keys_match_reference(plan: KeyPlan, syms: np.ndarray, keys: np.ndarray, slots) -> None:
    """Each fast key of ``slots`` equals the pure-Python reference computed from its location."""
    t = plan.slot_table
    for s in slots:
        for n in range(len(syms)):
            ref = reference_key(syms[n], t["y"][s], t["x"][s], t["h"][s], t["w"][s], t["cell"][s], plan.config.seed, mode=POSITION_MODES[t["mode"][s]])
            assert int(keys[n, s]) == ref, (n, s)


@pytest.mark.parametrize("kw", CASES)
def test_fast_keys_equal_reference(kw):
    rng = np.random.default_rng(1)
    syms = rng.integers(0, 64, size=(2, 6, 7)).astype(np.uint64)
    plan = KeyPlan(one_view_config(color="rgb", **kw), 6, 7)
    assert_keys_match_reference(plan, syms, plan.keys(syms), range(plan.keys_per_image))


def test_fast_keys_equal_reference_on_real_images():
    imgs, _ = digits_images("train", 3)
    cfg = one_view_config(color="gray", max_h=8, max_w=8, position="both")
    plan = KeyPlan(cfg, 8, 8)
    syms = symbols(imgs, cfg.levels)
    slots = np.random.default_rng(0).choice(plan.keys_per_image, 300, replace=False)
    assert_keys_match_reference(plan, syms, plan.keys(syms), slots)


@functools.lru_cache(maxsize=1)
def _two_cifar_images() -> np.ndarray:
    return next(pipeline.open_source(str(CIFAR_TAR), limit=2).batches(2, 3)).images


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason="shared CIFAR-10 archive not present")
@pytest.mark.parametrize("kw", [dict(), dict(max_h=32, max_w=32), dict(shapes="square", max_h=32, max_w=32, stride=2, levels=8)])
def test_fast_keys_equal_reference_on_cifar_images(kw):
    """Default config and full enumeration of real 32x32 images, on a random sample of slots."""
    imgs = _two_cifar_images()
    cfg = one_view_config(color="rgb", **kw)
    plan = KeyPlan(cfg, 32, 32)
    syms = symbols(imgs, cfg.levels)
    keys = plan.image_keys(imgs)
    content = plan.content_keys(syms)
    assert_keys_match_reference(plan, syms, keys, np.random.default_rng(0).choice(plan.keys_per_image, 150, replace=False))
    # the stored content key of a patch is its position-free key
    none = [b for b in plan.blocks if b.mode == "none"]
    for b in none[:: max(1, len(none) // 20)]:
        assert np.array_equal(content[:, b.patch_offset : b.patch_offset + b.ny * b.nx], keys[:, b.offset : b.offset + b.ny * b.nx])


GOLDEN = [  # (y, x, h, w, cell, seed) on symbols arange(16).reshape(4, 4) -> key; see docs/hashing.md
    ((0, 0, 1, 1, -1, 0), 0x203EEB494AAD0E94),
    ((0, 0, 2, 2, -1, 0), 0x49039B7C998DDA4F),
    ((1, 2, 3, 2, -1, 0), 0xAC1CAE74E1187A6C),
    ((0, 0, 4, 4, -1, 0), 0x80DF074FC08C3775),
    ((1, 1, 2, 2, 10, 0), 0xFC0C556FAC8BC903),
    ((0, 0, 1, 1, -1, 7), 0xC86B40A9DF40EEA4),
]


@pytest.mark.parametrize("args,key", GOLDEN)
def test_golden_keys(args, key):
    syms = np.arange(16, dtype=np.uint64).reshape(4, 4)
    assert reference_key(syms, *args) == key
    y, x, h, w, cell, seed = args
    plan = KeyPlan(one_view_config(color="gray", max_h=4, max_w=4, position="none" if cell < 0 else "grid", grid=4, seed=seed), 4, 4)
    slot = plan.slot_of("none" if cell < 0 else "grid", y, x, h, w)
    assert plan.slot_table["cell"][slot] == cell
    assert int(plan.keys(syms[None])[0, slot]) == key


def test_position_none_same_content_same_key_anywhere():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(1, 12, 12, 1)).astype(np.uint8)
    patch = rng.integers(0, 256, size=(3, 2, 1)).astype(np.uint8)
    img[0, 0:3, 0:2] = patch
    img[0, 7:10, 9:11] = patch
    cfg = one_view_config(color="gray", levels=16, max_h=3, max_w=3, position="both")
    plan = KeyPlan(cfg, 12, 12)
    keys = plan.image_keys(img)[0]
    assert keys[plan.slot_of("none", 0, 0, 3, 2)] == keys[plan.slot_of("none", 7, 9, 3, 2)]
    # the grid keys of the same patch differ, since the two copies sit in different cells
    assert keys[plan.slot_of("grid", 0, 0, 3, 2)] != keys[plan.slot_of("grid", 7, 9, 3, 2)]
    # and the same content in another shape's reading does not collide with it
    assert keys[plan.slot_of("none", 0, 0, 3, 2)] != keys[plan.slot_of("none", 0, 0, 2, 3)]


def test_distinct_contents_give_distinct_keys_on_real_sample():
    imgs, _ = digits_images("train", 200)
    cfg = one_view_config(color="gray", levels=8, max_h=4, max_w=4, position="none")
    plan = KeyPlan(cfg, 8, 8)
    syms = symbols(imgs, cfg.levels)
    keys = plan.keys(syms)
    t = plan.slot_table
    contents = set()
    pairs = set()
    for n in range(len(imgs)):
        for s in range(plan.keys_per_image):
            y, x, h, w = t["y"][s], t["x"][s], t["h"][s], t["w"][s]
            c = (int(h), int(w), syms[n, y : y + h, x : x + w].tobytes())
            contents.add(c)
            pairs.add((c, int(keys[n, s])))
    distinct_keys = set(int(k) for k in keys.ravel())
    assert len(pairs) == len(contents)  # each content has exactly one key
    assert len(distinct_keys) == len(contents)  # and no two contents share one
    assert len(contents) > 10_000


def test_locations_match_brute_force_enumeration():
    cfg = one_view_config(color="gray", max_h=3, max_w=4, position="both", grid=2)
    plan = KeyPlan(cfg, 5, 6)
    expected = []
    for h, w in cfg.shape_list():
        for mode in ("none", "grid"):
            for y in range(5 - h + 1):
                for x in range(6 - w + 1):
                    cell = -1 if mode == "none" else ((2 * y + h) * 2 // 10) * 2 + (2 * x + w) * 2 // 12
                    expected.append((y, x, h, w, cell))
    loc = plan.locate(np.arange(plan.keys_per_image))
    got = list(zip(*(loc[c].tolist() for c in ("y", "x", "h", "w", "cell"))))
    assert got == expected


def test_sub_slots_are_exactly_the_smaller_contained_patches():
    cfg = one_view_config(color="gray", max_h=3, max_w=3, position="both")
    plan = KeyPlan(cfg, 6, 6)
    t = plan.slot_table
    for slot in [plan.slot_of("none", 2, 1, 3, 2), plan.slot_of("grid", 0, 3, 3, 3), plan.slot_of("none", 4, 4, 1, 1)]:
        y, x, h, w, cell = (int(t[c][slot]) for c in ("y", "x", "h", "w", "cell"))
        brute = [
            s
            for s in range(plan.keys_per_image)
            if (t["cell"][s] < 0) == (cell < 0)
            and t["y"][s] >= y and t["x"][s] >= x
            and t["y"][s] + t["h"][s] <= y + h and t["x"][s] + t["w"][s] <= x + w
            and (t["h"][s], t["w"][s]) != (h, w)
        ]
        assert sorted(plan.sub_slots(slot).tolist()) == brute


def test_max_size_larger_than_image_is_refused():
    with pytest.raises(Exception, match="use at most 8x8"):
        KeyPlan(one_view_config(color="gray", max_h=9, max_w=9), 8, 8)


def _norm_symbols_by_hand(img: np.ndarray, levels: int) -> np.ndarray:
    """Contrast stretch then quantize, pixel by pixel (the 'norm' view's definition)."""
    lo, hi = int(img.min()), int(img.max())
    span = max(hi - lo, 1)
    h, w, c = img.shape
    out = np.zeros((h, w), np.uint64)
    for y in range(h):
        for x in range(w):
            s = 0
            for ch in range(c):
                v = (int(img[y, x, ch]) - lo) * 255 // span
                s += ((v * levels) >> 8) * levels**ch
            out[y, x] = s
    return out


def test_views_hash_each_quantization_side_by_side():
    rng = np.random.default_rng(5)
    imgs = rng.integers(30, 200, size=(2, 6, 7, 3)).astype(np.uint8)
    single = KeyPlan(one_view_config(color="rgb", position="both", grid=2), 6, 7)
    plan = KeyPlan(one_view_config(color="rgb", position="both", grid=2, views="levels,norm:3,levels:2"), 6, 7)
    assert plan.patches_per_image == 3 * single.patches_per_image and plan.keys_per_image == 3 * single.keys_per_image
    keys = plan.image_keys(imgs)
    # view 0 is the single-view plan, key for key (so default keys did not change)
    assert np.array_equal(keys[:, : single.keys_per_image], single.image_keys(imgs))
    t = plan.slot_table
    planes = {1: [_norm_symbols_by_hand(i, 3) for i in imgs], 2: [symbols(i[None], 2)[0] for i in imgs]}
    for s in np.flatnonzero(t["view"] > 0):
        v = int(t["view"][s])
        for n in range(2):
            ref = reference_key(planes[v][n], t["y"][s], t["x"][s], t["h"][s], t["w"][s], t["cell"][s], 0, view=v)
            assert int(keys[n, s]) == ref
    # the same patch in two views gives unrelated keys; composition stays within a view
    assert keys[0, plan.slot_of("none", 0, 0, 2, 2, view=0)] != keys[0, plan.slot_of("none", 0, 0, 2, 2, view=2)]
    sub = plan.sub_slots(plan.slot_of("grid", 1, 1, 3, 3, view=1))
    assert len(sub) and (t["view"][sub] == 1).all() and (t["cell"][sub] >= 0).all()


def test_views_config_parsing_and_fingerprint():
    import hashlib
    import json

    from pipeline.config import CODE_FIELDS, HASH_VERSION

    cfg = one_view_config(color="gray", levels=5, views="levels, norm:5 ,levels:3")
    assert cfg.views == "levels,norm,levels:3" and cfg.view_list() == [("levels", 5), ("norm", 5), ("levels", 3)]
    assert cfg.fingerprint() != one_view_config(color="gray", levels=5).fingerprint()
    d = one_view_config(color="gray").to_dict()
    del d["views"]  # the default view leaves the fingerprint of shards made before views existed
    for k in CODE_FIELDS:  # and so does having no code view
        del d[k]
    want = hashlib.sha256(json.dumps({"hash": HASH_VERSION, **d}, sort_keys=True).encode()).hexdigest()[:16]
    assert one_view_config(color="gray").fingerprint() == want
    for bad in ("levels,blur", "norm:1", "levels,levels", "norm:x"):
        with pytest.raises(pipeline.PipelineError, match="views"):
            one_view_config(views=bad)


def test_grad_view_is_an_ordinal_code():
    from pipeline.extraction.hashing import ordinal_symbols

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(1, 5, 6, 3)).astype(np.uint8)
    got = ordinal_symbols(img)[0]
    for y in range(5):
        for x in range(6):
            want = 0
            for c in range(3):
                r = int(x < 5 and img[0, y, x, c] > img[0, y, x + 1, c])
                b = int(y < 4 and img[0, y, x, c] > img[0, y + 1, x, c])
                want += (r + 2 * b) * 4**c
            assert got[y, x] == want
    dim = img // 2  # 0..127
    brighter = (dim.astype(int) * 2 + 1).astype(np.uint8)  # a strictly increasing map keeps every order
    assert np.array_equal(ordinal_symbols(brighter), ordinal_symbols(dim))
    cfg = one_view_config(color="rgb", views="levels,grad")
    assert cfg.views == "levels,grad" and cfg.view_list()[1] == ("grad", 2)
    with pytest.raises(pipeline.PipelineError, match="views"):
        one_view_config(views="grad:3")


def test_offset_and_coarse_cells_by_hand():
    """8x8 image, --grid 4: the grid has 2-pixel cells, the offset grid 5 cells per side whose
    inner boundaries sit at 1, 3, 5, 7, the coarse grid 2 cells of 4 pixels."""
    cell = functools.partial(grid_cell, height=8, width=8, grid=4)
    assert [cell(y, 0, 1, 1, mode="offset") for y in range(8)] == [0, 5, 5, 10, 10, 15, 15, 20]  # centres 0.5 .. 7.5
    assert cell(7, 7, 1, 1, mode="offset") == 24  # the last of 5 x 5 cells
    assert cell(0, 1, 1, 2, mode="offset") == 1  # centre (0.5, 2): the first row, the second column
    assert cell(0, 1, 2, 2, mode="offset") == 6  # centre (1, 2): on a boundary, so the cell below it
    assert [cell(y, 0, 1, 1, mode="coarse") for y in range(8)] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert [cell(y, 0, 1, 1) for y in range(8)] == [0, 0, 4, 4, 8, 8, 12, 12]
    plan = KeyPlan(one_view_config(color="gray", max_h=2, max_w=2, position="grid,offset,coarse"), 8, 8)
    t = plan.slot_table
    for mode in ("grid", "offset", "coarse"):
        for y, x, h, w in ((0, 0, 1, 1), (3, 6, 2, 1), (6, 6, 2, 2)):
            assert t["cell"][plan.slot_of(mode, y, x, h, w)] == cell(y, x, h, w, mode=mode)


def test_a_one_pixel_move_keeps_exactly_one_of_the_grid_and_offset_keys():
    """Grid and offset boundaries interleave a pixel apart (--grid 4 on 8 x 8): a patch moved down by
    one pixel crosses exactly one of them, so exactly one of its two position keys survives."""
    rng = np.random.default_rng(4)
    img = np.zeros((2, 8, 8, 1), np.uint8)
    img[0, :7] = rng.integers(0, 256, (7, 8, 1))
    img[1, 1:] = img[0, :7]  # the same content one pixel lower
    plan = KeyPlan(one_view_config(color="gray", levels=16, max_h=2, max_w=2, position="grid,offset"), 8, 8)
    keys = plan.image_keys(img)
    kept = {"grid": 0, "offset": 0}
    for h, w in plan.config.shape_list():
        for y in range(7 - h + 1):
            for x in range(8 - w + 1):
                same = {m: keys[0, plan.slot_of(m, y, x, h, w)] == keys[1, plan.slot_of(m, y + 1, x, h, w)] for m in kept}
                assert sum(same.values()) == 1, (y, x, h, w)
                kept = {m: kept[m] + same[m] for m in kept}
    assert kept["grid"] > 0 and kept["offset"] > 0


@pytest.mark.parametrize("text,canonical", [("grid", "grid"), ("grid,none", "both"), ("both", "both"), ("coarse, Offset ,grid", "grid,offset,coarse")])
def test_position_lists_are_stored_in_canonical_order(text, canonical):
    assert ExtractConfig(position=text).position == canonical


@pytest.mark.parametrize("text", ["diagonal", "grid,grid", "", "grid,,none"])
def test_bad_position_lists_are_refused_in_one_line(text):
    with pytest.raises(PipelineError, match="position"):
        ExtractConfig(position=text)
