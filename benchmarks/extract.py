"""Extract throughput: our engine against the strongest straightforward baseline, end to end into the same Parquet.

    python benchmarks/extract.py --json                # defaults: 2,000 images, 100 for full enumeration
    python benchmarks/extract.py --images 500 --full-images 20 --worker-images 2000 --rss-images 200,2000 --full-rss-images 20,200
    python benchmarks/extract.py --smoke --json        # seconds: a few images per measurement (what CI runs)

Both sides start from the same decoded images (the first N of the shared
CIFAR-10 archive) and write the same shards (same schema, codec, row groups and
files); the benchmark checks that the files hold identical keys.

* ours: ``pipeline.extraction.stage`` (prefix-sum rolling hash, compiled with numba, O(1) per patch);
* baseline: ``torch.Tensor.unfold`` per shape, then one vectorized wrapping dot product
  of each patch's pixel values with the fixed 64-bit multipliers ``A**i * B**j``, then the
  same final mixing (numpy). That dot product *is* our content hash, so the keys match.

Single-core figures (torch and Arrow limited to one thread) come first; then the
full pipeline from the tar (decode included) with 1 and 2 worker processes; then
the peak memory of separate processes extracting 10x more images.

``--codes`` measures the code view's coding alone (both cores), on the first
``--code-images`` images with the default code settings: our blocked BLAS product and
compiled k-nearest selection against a straightforward numpy version of the same
coding (matrix product, ``np.argpartition``, triangle weights), with the GFLOP/s the
distance product achieves next to what a bare numpy matmul of 4,096 patches by the
atoms reaches on all cores in the same run:

    python benchmarks/extract.py --codes --json
    python benchmarks/extract.py --codes --smoke --json     # seconds, on digits (what CI runs)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, MEASURED_EXTRACT, best_of, child_peak_rss_mb, cifar_images, cifar_source, measured_config, peak_rss_mb  # noqa: E402


def _single_thread() -> None:
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)


# ------------------------------------------------------------------ baseline

def baseline_extract(images: np.ndarray, labels: np.ndarray, out: Path, config, compression: str) -> int:
    """Unfold + wrapping dot product per shape, same final mixing, same shard files. Returns patches written."""
    import torch

    from pipeline import layout
    from pipeline.extraction.stage import PATCHES_PER_ROW_GROUP, PATCHES_PER_SHARD
    from pipeline.extraction.hashing import A, B, MASK, KeyPlan, fmix64
    from pipeline.extraction.shards import ShardWriter, schema

    n, height, width = images.shape[:3]
    plan = KeyPlan(config, height, width)
    p = plan.patches_per_image
    st = config.stride
    shapes = config.shape_list()
    weights = {}
    for h, w in shapes:
        wt = np.array([[(pow(A, i, 1 << 64) * pow(B, j, 1 << 64)) & MASK for j in range(w)] for i in range(h)], dtype=np.uint64)
        weights[(h, w)] = torch.from_numpy(wt.view(np.int64))
    offsets, mixes, pixel_salt = spec_layout(config, height, width)
    mix = np.empty(p, np.uint64)
    for s, (h, w) in enumerate(shapes):
        cnt = ((height - h) // st + 1) * ((width - w) // st + 1)
        mix[offsets[s] : offsets[s] + cnt] = mixes[s]
    salt = np.uint64(pixel_salt)
    per_shard = max(1, min(n, PATCHES_PER_SHARD // p))
    per_group = max(1, PATCHES_PER_ROW_GROUP // p)
    total = math.ceil(n / per_shard)
    sch = schema(p, config)
    out.mkdir(parents=True, exist_ok=True)
    for si in range(total):
        writer = ShardWriter(out / layout.shard_name(si, total), sch, compression)
        for g in range(si * per_shard, min(n, (si + 1) * per_shard), per_group):
            hi = min(g + per_group, (si + 1) * per_shard, n)
            r = plan.symbols(images[g:hi])[:, 0]  # the one view
            r += salt
            fmix64(r)
            rt = torch.from_numpy(r.view(np.int64))
            cols = []
            for h, w in shapes:
                u = rt.unfold(1, h, st).unfold(2, w, st)  # N x ny x nx x h x w, a view
                cols.append((u * weights[(h, w)]).sum(dim=(-2, -1)).reshape(hi - g, -1))
            c = torch.cat(cols, 1).numpy().view(np.uint64)
            c ^= mix
            fmix64(c)
            ids = np.arange(g, hi)
            writer.write(ids, labels[g:hi].astype(np.int32), [f"arrays:{i}" for i in ids], c)
        writer.close()
    return n * p


def spec_layout(config, height: int, width: int) -> tuple[list[int], list[int], int]:
    """From the key specification (docs/hashing.md) alone, for one view without position: each
    shape's first patch in the patch order, its fmix64(tag + TAG_SALT * (seed + 1)), and the
    view's pixel salt."""
    from pipeline.extraction.hashing import MASK, PIXEL_SALT, TAG_SALT, fmix64_int, tag_of

    offsets, mixes, o = [], [], 0
    for h, w in config.shape_list():
        offsets.append(o)
        mixes.append(fmix64_int(tag_of(h, w, -1) + TAG_SALT * (config.seed + 1)))
        o += ((height - h) // config.stride + 1) * ((width - w) // config.stride + 1)
    return offsets, mixes, (PIXEL_SALT * (config.seed + 1)) & MASK


def _powers(base: int, n: int) -> np.ndarray:
    return np.array([pow(base, i, 1 << 64) for i in range(n)], dtype=np.uint64)


def numpy_content_keys(syms: np.ndarray, plan) -> np.ndarray:
    """The same prefix-sum hash as ours, as whole-array numpy passes (the implementation numba replaced)."""
    from pipeline.extraction.hashing import A, A_INV, B, B_INV, fmix64

    if syms.ndim == 4:
        syms = syms[:, 0]  # the one view
    n, hh, ww = syms.shape
    offsets, mixes, pixel_salt = spec_layout(plan.config, hh, ww)
    pow_a, pow_b, inv_a, inv_b = _powers(A, hh + 1), _powers(B, ww + 1), _powers(A_INV, hh + 1), _powers(B_INV, ww + 1)
    r = syms.astype(np.uint64, copy=True)
    r += np.uint64(pixel_salt)
    fmix64(r)
    r *= pow_a[:hh, None]
    r *= pow_b[None, :ww]
    p = np.zeros((n, hh + 1, ww + 1), dtype=np.uint64)
    np.cumsum(r, axis=1, out=r)
    np.cumsum(r, axis=2, out=p[:, 1:, 1:])
    out = np.empty((n, plan.patches_per_image), np.uint64)
    for s, (h, w) in enumerate(plan.config.shape_list()):
        ny, nx = hh - h + 1, ww - w + 1
        c = p[:, h : h + ny, w : w + nx] - p[:, 0:ny, w : w + nx]
        c -= p[:, h : h + ny, 0:nx]
        c += p[:, 0:ny, 0:nx]
        c *= inv_a[:ny, None]
        c *= inv_b[None, :nx]
        c ^= np.uint64(mixes[s])
        out[:, offsets[s] : offsets[s] + ny * nx] = c.reshape(n, -1)
    return fmix64(out)


def breakdown(images: np.ndarray, config, tmp: Path, repeat: int, compression: str) -> dict:
    """Where the time goes: hashing alone (ours, numpy, torch unfold) and Parquet writing alone, per row group."""
    from pipeline.extraction.stage import PATCHES_PER_ROW_GROUP
    from pipeline.extraction.hashing import KeyPlan
    from pipeline.extraction.shards import ShardWriter, schema

    plan = KeyPlan(config, images.shape[1], images.shape[2])
    step = max(1, PATCHES_PER_ROW_GROUP // plan.patches_per_image)
    syms = [plan.symbols(images[i : i + step]) for i in range(0, len(images), step)]
    total = len(images) * plan.patches_per_image
    assert all(np.array_equal(numpy_content_keys(s, plan), plan.content_keys(s)) for s in syms[:2])
    t_ours, keys = best_of(lambda: [plan.content_keys(s) for s in syms], repeat)
    t_np, _ = best_of(lambda: [numpy_content_keys(s, plan) for s in syms], repeat)

    def write() -> None:
        w = ShardWriter(tmp / "write-only.parquet", schema(plan.patches_per_image, config), compression)
        for k in keys:
            w.write(np.arange(len(k)), np.zeros(len(k), np.int32), [""] * len(k), k)
        w.close()

    t_write, _ = best_of(write, repeat)
    return {"hash_ours_patches_per_s": total / t_ours, "hash_numpy_patches_per_s": total / t_np, "write_patches_per_s": total / t_write}


def hashlib_patches_per_s(images: np.ndarray, config, seconds: float = 1.0) -> float:
    """Per-patch blake2b over each patch's symbols (for reference only; not the ratio's baseline)."""
    from pipeline.extraction.hashing import KeyPlan

    plan = KeyPlan(config, images.shape[1], images.shape[2])
    done, t0 = 0, time.perf_counter()
    for img in images:
        syms = plan.symbols(img[None])[0].astype(np.uint32)
        for h, w in config.shape_list():
            for y in range(0, plan.height - h + 1, config.stride):
                for x in range(0, plan.width - w + 1, config.stride):
                    hashlib.blake2b(syms[y : y + h, x : x + w].tobytes() + bytes((h, w)), digest_size=8).digest()
                    done += 1
        if time.perf_counter() - t0 > seconds:
            break
    return done / (time.perf_counter() - t0)


# ------------------------------------------------------------------ measurements

def _same_keys(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    fa, fb = sorted(a.glob("part-*.parquet")), sorted(b.glob("part-*.parquet"))
    if [f.name for f in fa] != [f.name for f in fb]:
        return False
    return all(pq.read_table(x, columns=["patch_keys"]).equals(pq.read_table(y, columns=["patch_keys"])) for x, y in zip(fa, fb))


def compare(images, labels, config, tmp: Path, tag: str, repeat: int, compression: str) -> dict:
    import pipeline
    from pipeline.data.sources import from_arrays

    ours_dir, base_dir = tmp / f"{tag}-ours", tmp / f"{tag}-baseline"

    def ours():
        return pipeline.extract(from_arrays(images, labels), ours_dir, config, overwrite=True, compression=compression, augment="none", workers=1)  # one core, as the baseline

    def base():
        shutil.rmtree(base_dir, ignore_errors=True)
        return baseline_extract(images, labels, base_dir, config, compression)

    ours(), base()  # warm up: compile, page cache
    t_ours, m = best_of(ours, repeat)
    t_base, patches = best_of(base, repeat)
    assert patches == m["patches"]
    res = {
        "images": len(images),
        "patches": m["patches"],
        "ours_patches_per_s": m["patches"] / t_ours,
        "baseline_patches_per_s": patches / t_base,
        "ratio": t_base / t_ours,
        "bytes_per_patch": m["bytes_per_patch"],
        "outputs_identical": _same_keys(ours_dir, base_dir),
    }
    sh = pipeline.open_shards(ours_dir)
    t_read, n = best_of(lambda: sum(b.keys.size for b in sh.iter_content()), repeat)
    res["read_patches_per_s"] = n / t_read
    t_keys, nk = best_of(lambda: sum(b.keys.size for b in sh.iter_batches()), 1)
    res["read_keys_per_s"] = nk / t_keys
    shutil.rmtree(base_dir, ignore_errors=True)
    return res


def workers_from_archive(n: int, config, tmp: Path, workers: list[int], compression: str) -> dict:
    """The whole stage from the tar (stream, decode, hash, write) with 1 and 2 processes; listing excluded."""
    import pipeline

    out = {}
    for w in workers:
        src = cifar_source(n)
        t = time.perf_counter()
        m = pipeline.extract(src, tmp / f"w{w}", config, overwrite=True, workers=w, compression=compression, augment="none")
        dt = time.perf_counter() - t
        out[str(w)] = {"images": m["images"], "seconds": round(dt, 3), "patches_per_s": m["patches"] / dt, "images_per_s": m["images"] / dt}
        shutil.rmtree(tmp / f"w{w}")
    base = out[str(workers[0])]["seconds"]
    for v in out.values():
        v["speedup"] = base / v["seconds"]
    return out


_RSS_CHILD = """
import sys, tempfile, shutil
sys.path.insert(0, {root!r})
import pipeline
from pipeline import ExtractConfig
src = pipeline.open_source({tar!r}, limit={n})
d = tempfile.mkdtemp()
m = pipeline.extract(src, d + "/s", ExtractConfig(**{cfg!r}), workers={workers}, augment="none")
shutil.rmtree(d)
RESULT = dict(images=m["images"], patches=m["patches"], bytes=m["bytes"])
"""


MATMUL_ROWS = 4096  # patches per product of the numpy coding, and in the bare product the coding is compared with (all cores)


def numpy_codes(images: np.ndarray, d, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline coding: whole-block numpy (distances, np.argpartition, sort of the k, triangle weights)."""
    from pipeline.extraction import codes

    atoms, weights = [], []
    for s in d.shapes:
        p, ny, nx = codes.patch_matrix(images, s.h, s.w, 1)
        codes.normalise(p, s.norm)
        out_a, out_w = [], []
        for b in range(0, len(p), MATMUL_ROWS):
            z = (p[b : b + MATMUL_ROWS] - s.mean) @ s.whiten
            dist = np.sqrt(np.maximum((z * z).sum(1, keepdims=True) - 2 * z @ s.atoms.T + (s.atoms**2).sum(1), 0))
            part = np.argpartition(dist, k - 1, axis=1)[:, :k]
            near = np.take_along_axis(dist, part, 1)
            order = np.argsort(near, axis=1, kind="stable")
            out_a.append(np.take_along_axis(part, order, 1))
            out_w.append(np.maximum(dist.mean(1, keepdims=True) - np.take_along_axis(near, order, 1), 0))
        n = len(images)
        atoms.append(np.concatenate(out_a).reshape(n, ny * nx, k).transpose(0, 2, 1).reshape(n, -1))
        weights.append(np.concatenate(out_w).reshape(n, ny * nx, k).transpose(0, 2, 1).reshape(n, -1))
    return np.concatenate(atoms, 1), np.concatenate(weights, 1)


_CODER = {}


def _coder_start(path: str) -> None:
    """Initializer of a coding worker: what an extract worker does first, then the dictionary, compiled."""
    from pipeline.extraction import codes
    from pipeline.extraction.workers import shard_worker

    shard_worker()
    _CODER["d"] = codes.Dictionary.load(path)


def _code_slice(args) -> int:
    images, stride, k, weighting = args
    return _CODER["d"].code(images, stride, k, weighting)[0].shape[0]


def coding_workers(dic, images: np.ndarray, cfg, repeat: int) -> tuple[float, int]:
    """Seconds to code ``images`` split over one extract-style worker process per core (best of
    ``repeat``, pool started and compiled outside the timing), and the number of workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.extraction.workers import machine_cores

    n = machine_cores()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dictionary.npz"
        dic.save(path)
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_coder_start, initargs=(str(path),)) as pool:
            list(pool.map(_code_slice, [(images[:2], cfg.code_stride, cfg.code_k, cfg.code_weight)] * n))
            parts = [(p, cfg.code_stride, cfg.code_k, cfg.code_weight) for p in np.array_split(images, n)]
            t, _ = best_of(lambda: list(pool.map(_code_slice, parts)), repeat)
    return t, n


def code_throughput(images: np.ndarray, repeat: int, atoms: int | None = None, sample: int | None = None) -> dict:
    """Images/s of the code view's coding (ours against :func:`numpy_codes`) and GFLOP/s of its
    products: in one process, and over one worker per core as pipe extract runs it, next to a bare
    matrix product of one block on all cores."""
    from pipeline import ExtractConfig, KeyPlan
    from pipeline.extraction import codes

    color = "gray" if images.shape[-1] == 1 else "rgb"
    cfg = KeyPlan(ExtractConfig(color=color, **({"atoms": atoms} if atoms else {})), *images.shape[1:3]).config  # the defaults, resolved
    shapes = codes.auto_shapes(*images.shape[1:3])[:1]  # the full-resolution square: the coding whose speed this measures
    dic = codes.fit([images[:1000]], shapes, cfg.atoms, cfg.whiten, sample or 50000, 0, images.shape[-1], cfg.code_norm)
    dic.code(images[:2], cfg.code_stride, cfg.code_k, cfg.code_weight)  # compiles the selection loop outside the timing
    t_ours, (a, w) = best_of(lambda: dic.code(images, cfg.code_stride, cfg.code_k, cfg.code_weight), repeat)
    t_base, (ba, bw) = best_of(lambda: numpy_codes(images, dic, cfg.code_k), repeat)
    t_workers, n_workers = coding_workers(dic, images, cfg, repeat)
    dims = [s.h * s.w * images.shape[-1] for s in dic.shapes]
    patches = [len(images) * (images.shape[1] - s.h + 1) * (images.shape[2] - s.w + 1) for s in dic.shapes]
    flops = sum(2 * p * dd * cfg.atoms + 2 * p * dd * dd for p, dd in zip(patches, dims))  # distances + whitening
    rng = np.random.default_rng(0)
    z = rng.standard_normal((MATMUL_ROWS, dims[0]), dtype=np.float32)
    c = rng.standard_normal((cfg.atoms, dims[0]), dtype=np.float32)
    t_mm, _ = best_of(lambda: z @ c.T, 3 * repeat)
    mm_gflops = 2 * MATMUL_ROWS * dims[0] * cfg.atoms / t_mm / 1e9
    return {
        "code_images": len(images), "code_shapes": [f"{s.h}x{s.w}" for s in dic.shapes], "atoms": cfg.atoms, "code_k": cfg.code_k,
        "ours_images_per_s": round(len(images) / t_ours, 1), "numpy_images_per_s": round(len(images) / t_base, 1),
        "ratio": round(t_base / t_ours, 2), "one_process_gflops": round(flops / t_ours / 1e9, 2),
        "workers": n_workers, "workers_images_per_s": round(len(images) / t_workers, 1), "ours_gflops": round(flops / t_workers / 1e9, 2),
        "numpy_matmul_gflops": round(mm_gflops, 1), "share_of_matmul": round(flops / t_workers / 1e9 / mm_gflops, 3),
        "same_atoms": float((a.astype(np.int64) == ba).mean()), "max_weight_difference": float(np.abs(w - bw).max()),
    }


def codes_main(args) -> None:
    if args.smoke:
        from tests.conftest import digits_images

        images, _ = digits_images("train")
        res = code_throughput(images[:200], 1, atoms=16, sample=2000)
    else:
        images, _, _ = cifar_images(args.code_images)
        res = code_throughput(images, args.repeat)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['code_images']} images, code shapes {','.join(res['code_shapes'])}, {res['atoms']} atoms, k {res['code_k']}, both cores:")
    print(f"  ours, {res['workers']} worker(s) {res['workers_images_per_s']:8.1f} images/s  {res['ours_gflops']:6.1f} GFLOP/s = {res['share_of_matmul']:.0%} "
          f"of a bare numpy matmul of {MATMUL_ROWS} patches on all cores ({res['numpy_matmul_gflops']:.1f})")
    print(f"  ours, one process {res['ours_images_per_s']:8.1f} images/s  {res['one_process_gflops']:6.1f} GFLOP/s")
    print(f"  numpy {res['numpy_images_per_s']:8.1f} images/s  ratio {res['ratio']:.2f}  same atoms {res['same_atoms']:.4f}")


def rss(counts: list[int], cfg: dict, workers: int = 1) -> list[dict]:
    root = str(Path(__file__).resolve().parents[1])
    return [child_peak_rss_mb(_RSS_CHILD.format(root=root, tar=str(CIFAR_TAR), n=n, cfg=cfg, workers=workers)) for n in counts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="images for the default-config comparison [2000]")
    ap.add_argument("--full-images", type=int, default=100, help="images for full enumeration (every rectangle up to 32x32) [100]")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side; the fastest counts [3]")
    ap.add_argument("--compression", default="snappy", help="shard codec for both sides [snappy, the default]")
    ap.add_argument("--workers", default="1,2", help="worker counts for the whole-stage run from the archive [1,2]")
    ap.add_argument("--worker-images", type=int, default=20000, help="images for the whole-stage runs with workers [20000]")
    ap.add_argument("--rss-images", default="1000,10000", help="image counts for peak memory at the default config [1000,10000]")
    ap.add_argument("--full-rss-images", default="100,1000", help="image counts for peak memory at full enumeration [100,1000]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--codes", action="store_true", help="measure the code view's coding only (see above)")
    ap.add_argument("--code-images", type=int, default=2000, help="with --codes: images coded [2000]")
    ap.add_argument("--smoke", action="store_true", help="seconds: a few images per measurement (with --codes: 200 digits images); checks the benchmark runs")
    args = ap.parse_args()
    if args.codes:
        codes_main(args)
        return
    if args.smoke:
        args.images, args.full_images, args.repeat, args.workers, args.worker_images = 40, 4, 1, "1", 80
        args.rss_images, args.full_rss_images = "40", "4"


    t_start = time.time()
    n_load = max(args.images, args.full_images)
    images, labels, decode_rate = cifar_images(n_load)
    default = measured_config(color="rgb")
    full = measured_config(color="rgb", max_h=32, max_w=32)
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "compression": args.compression}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _single_thread()
        a = compare(images[: args.images], labels[: args.images], default, tmp, "default", args.repeat, args.compression)
        f = compare(images[: args.full_images], labels[: args.full_images], full, tmp, "full", args.repeat, args.compression)
        res.update(a)
        res.update({f"full_{k}": v for k, v in f.items()})
        res["breakdown"] = breakdown(images[: args.images], default, tmp, args.repeat, args.compression)
        res["full_breakdown"] = breakdown(images[: args.full_images], full, tmp, args.repeat, args.compression)
        res["decode_images_per_s"] = decode_rate
        res["hashlib_patches_per_s"] = hashlib_patches_per_s(images[:50], default)
        res["peak_rss_mb"] = peak_rss_mb()
        res["workers"] = workers_from_archive(args.worker_images, default, tmp, [int(w) for w in args.workers.split(",")], args.compression)
    res["rss_default"] = rss([int(n) for n in args.rss_images.split(",")], {**MEASURED_EXTRACT, "color": "rgb"})
    res["rss_full"] = rss([int(n) for n in args.full_rss_images.split(",")], {**MEASURED_EXTRACT, "color": "rgb", "max_h": 32, "max_w": 32})
    res["seconds"] = round(time.time() - t_start, 1)
    if args.json:
        print(json.dumps(res, indent=None))
        return
    print(f"{res['images']} CIFAR images, default config ({res['patches']:,} patches), one core, codec {args.compression}:")
    print(f"  ours     {res['ours_patches_per_s'] / 1e6:8.1f} M patches/s")
    print(f"  baseline {res['baseline_patches_per_s'] / 1e6:8.1f} M patches/s   ratio {res['ratio']:.2f}   identical keys: {res['outputs_identical']}")
    print(f"{res['full_images']} images, full enumeration ({res['full_patches']:,} patches):")
    print(f"  ours     {res['full_ours_patches_per_s'] / 1e6:8.1f} M patches/s")
    print(f"  baseline {res['full_baseline_patches_per_s'] / 1e6:8.1f} M patches/s   ratio {res['full_ratio']:.2f}   identical keys: {res['full_outputs_identical']}")
    print(f"  per-patch blake2b (reference) {res['hashlib_patches_per_s'] / 1e6:.2f} M patches/s")
    for name in ("breakdown", "full_breakdown"):
        b = res[name]
        print(
            f"{name}: hashing alone: ours {b['hash_ours_patches_per_s'] / 1e6:.0f}, numpy {b['hash_numpy_patches_per_s'] / 1e6:.0f}; "
            f"Parquet writing alone {b['write_patches_per_s'] / 1e6:.0f} M patches/s"
        )
    print(f"storage: {res['bytes_per_patch']:.2f} B/patch; read back {res['read_patches_per_s'] / 1e6:.0f} M patches/s, {res['read_keys_per_s'] / 1e6:.0f} M keys/s with grid keys derived")
    for w, v in res["workers"].items():
        print(f"whole stage from the archive, {w} worker(s): {v['images_per_s']:.0f} images/s, {v['patches_per_s'] / 1e6:.1f} M patches/s, speedup {v['speedup']:.2f}")
    for name in ("rss_default", "rss_full"):
        print(f"{name}: " + ", ".join(f"{r['images']} images -> {r['peak_rss_mb']:.0f} MB peak" for r in res[name]))


if __name__ == "__main__":
    main()
