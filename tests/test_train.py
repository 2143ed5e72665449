"""Training: vocabulary against exact counts, bag weights by hand, patch dropout, determinism, resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline import PipelineError, TrainConfig, layout
from pipeline.errors import ParameterError
from pipeline.table import weights
from pipeline.model import PatchBagModel
from pipeline.table.vocab import KeyCounter, build

ROOT = Path(__file__).resolve().parents[1]


def _random_key_batches(seed: int = 0, n: int = 12):
    rng = np.random.default_rng(seed)
    # a skewed distribution: some keys common, most rare; multiplied to spread the bits
    return [(rng.zipf(1.3, size=(40, 70)) % 20000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) for _ in range(n)]


def test_counter_grows_and_counts_exactly():
    batches = _random_key_batches()
    c = KeyCounter(capacity=16)  # forces several rehashes
    for b in batches:
        c.add(b)
    keys, counts = c.result()
    u, n = np.unique(np.concatenate([b.ravel() for b in batches]), return_counts=True)
    assert np.array_equal(keys, u) and np.array_equal(counts, n)


@pytest.mark.parametrize("buckets", [0, 64])
def test_vocabulary_in_bounded_memory_equals_one_pass(buckets):
    """A budget too small for one table splits the count into passes over key ranges; same vocabulary."""
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 2**64, size=(50, 400), dtype=np.uint64) for _ in range(8)]
    batches += [b[:, :100] for b in batches]  # repeats, so some keys reach min_count
    one = build(lambda: iter(batches), min_count=2, buckets=buckets)
    calls = []

    def again():
        calls.append(1)
        return iter(batches)

    told = []
    small = build(again, min_count=2, buckets=buckets, memory_mb=1, progress=told.append)
    assert abs(sum(told) - 50 * len(batches)) < 1e-6 and min(told) < 0  # restarts were taken back: one pass in all
    assert one.stats["passes"] == 1 and small.stats["passes"] >= 4 and len(calls) >= small.stats["passes"]
    assert np.array_equal(small.keys, one.keys) and np.array_equal(small.counts, one.counts)
    assert {k: v for k, v in small.stats.items() if k != "passes"} == {k: v for k, v in one.stats.items() if k != "passes"}
    u, n = np.unique(np.concatenate([b.ravel() for b in batches]), return_counts=True)
    assert np.array_equal(one.keys, u[n >= 2]) and one.stats["distinct_keys"] == len(u)


@pytest.mark.parametrize("buckets", [0, 64])
def test_vocabulary_rows_buckets_and_bags(buckets):
    batches = _random_key_batches(1)
    v = build(lambda: iter(batches), min_count=3, buckets=buckets)
    u, n = np.unique(np.concatenate([b.ravel() for b in batches]), return_counts=True)
    assert np.array_equal(v.keys, u[n >= 3]) and v.rows == (n >= 3).sum() + buckets
    tail = u[n < 3]
    assert v.stats["tail_keys"] == len(tail)
    assert v.stats["tail_collisions"] == (len(tail) - len(np.unique(tail % np.uint64(buckets))) if buckets else 0)
    keys = batches[0]
    own = np.searchsorted(v.keys, keys)
    hit = v.keys[np.minimum(own, len(v.keys) - 1)] == keys
    expected = np.where(hit, own, (len(v.keys) + (keys % np.uint64(buckets)).astype(np.int64)) if buckets else -1)
    assert np.array_equal(v.rows_of(keys), expected)
    rows, offsets, counts = v.bags(keys)
    for a in range(len(keys)):
        r = expected[a][expected[a] >= 0]
        want = dict(zip(*np.unique(r, return_counts=True)))
        got = dict(zip(rows[offsets[a] : offsets[a + 1]].tolist(), counts[offsets[a] : offsets[a + 1]].tolist()))
        assert got == {int(k): float(c) for k, c in want.items()}


@pytest.mark.parametrize("bag", ["mean", "sum", "sqrt"])
def test_bag_pooling_by_hand(bag):
    torch.manual_seed(0)
    m = PatchBagModel(10, 3, 2, bag=bag).eval()
    rows, offsets, counts = torch.tensor([1, 4, 4, 2]), torch.tensor([0, 2, 4]), torch.tensor([3.0, 1.0, 2.0, 2.0])
    t = m.table.weight.detach()
    scale = {"mean": lambda n: 1 / n, "sum": lambda n: 1.0, "sqrt": lambda n: 1 / np.sqrt(n)}[bag]
    expected = torch.stack([(3 * t[1] + 1 * t[4]) * scale(4), (2 * t[4] + 2 * t[2]) * scale(4)])
    assert torch.allclose(m.pooled(rows, offsets, counts), expected, atol=1e-6)


def test_patch_dropout_drops_rows_only_in_training():
    torch.manual_seed(0)
    m = PatchBagModel(10, 3, 2, bag="sum", drop=0.3)
    counts = torch.ones(20000)
    offsets = torch.tensor([0, 20000])
    w = m.train().weights(counts, offsets)
    dropped = (w == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.02 and abs(w.mean().item() - 1.0) < 0.03  # expectation preserved
    assert torch.equal(m.eval().weights(counts, offsets), counts)


def test_auto_drop_rate_is_learned():
    torch.manual_seed(0)
    m = PatchBagModel(10, 3, 2, drop="auto")
    assert m.auto_drop is not None and abs(m.auto_drop.rate.item() - 0.1) < 1e-6
    rows, offsets, counts = torch.tensor([1, 2, 3]), torch.tensor([0, 3]), torch.ones(3)
    loss = torch.nn.functional.cross_entropy(m.train()(rows, offsets, counts), torch.tensor([1])) + m.penalty()
    loss.backward()
    assert m.auto_drop.logit.grad is not None and m.auto_drop.logit.grad.item() != 0
    assert torch.equal(m.eval().weights(counts, offsets), counts / 3)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "ids_per_s")} for r in rows]


def test_same_seed_gives_identical_metrics(digits_shards, tmp_path):
    sh = pipeline.open_shards(digits_shards)
    cfg = TrainConfig(epochs=2, dim=8, drop="0.2")
    pipeline.train(sh, tmp_path / "a", cfg)
    pipeline.train(sh, tmp_path / "b", cfg)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    pipeline.train(sh, tmp_path / "c", TrainConfig(epochs=2, dim=8, drop="0.2", seed=1))
    assert _metrics(tmp_path / "a") != _metrics(tmp_path / "c")


def test_early_stopping_keeps_the_best_epoch(digits_shards, tmp_path):
    # large initial vectors make the validation loss turn up within a few epochs, so the run stops early
    m = pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "r",
                       TrainConfig(epochs=30, dim=8, patience=2, lr=0.2, batch_size=128, init_std=0.5))
    rows = _metrics(tmp_path / "r")
    # the best accuracy; among epochs tied on it, the lowest validation loss (then the earliest)
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -rows[i]["val_loss"], -i))
    assert m["epochs_run"] == len(rows) < 30 and len(rows) - 1 - best == 2
    assert m["best_epoch"] == rows[best]["epoch"] and m["final"]["val_accuracy"] == rows[best]["val_accuracy"]
    run = pipeline.load(tmp_path / "r")
    res = run.evaluate(pipeline.open_shards(digits_shards))
    assert res["n"] == 898


def _train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", str(shards), "--out", str(out), "--epochs", "6", "--dim", "8", *extra]


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(digits_shards, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(digits_shards, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "run.json").exists()
    with pytest.raises(PipelineError, match="not a finished run"):
        pipeline.load(killed)
    r = subprocess.run(_train_cmd(digits_shards, killed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    r = subprocess.run(_train_cmd(digits_shards, clean), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _metrics(killed) == _metrics(clean)
    a = weights.load(killed / layout.WEIGHTS, "")
    b = weights.load(clean / layout.WEIGHTS, "")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_finished_runs(digits_shards, tmp_path):
    sh = pipeline.open_shards(digits_shards)
    pipeline.train(sh, tmp_path / "r", TrainConfig(epochs=1, dim=8))
    with pytest.raises(PipelineError, match="holds a finished run"):
        pipeline.train(sh, tmp_path / "r", TrainConfig(epochs=2, dim=8), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no checkpoint to resume from"):
        pipeline.train(sh, tmp_path / "empty", TrainConfig(epochs=2, dim=8), resume=True)


def test_lazy_adagrad_equals_torch_adagrad_on_the_touched_rows():
    from pipeline.training.optim import LazyAdagrad

    torch.manual_seed(0)
    w_ref = torch.randn(50, 4, requires_grad=True)
    ref = torch.optim.Adagrad([w_ref], lr=0.3, eps=1e-10)
    w = w_ref.detach().clone()
    lazy = LazyAdagrad(w, lr=0.3)
    for rows in (torch.tensor([1, 7, 30]), torch.tensor([7, 8]), torch.tensor([1, 2, 30, 49])):
        g = torch.randn(len(rows), 4)
        dense = torch.zeros(50, 4)
        dense[rows] = g
        w_ref.grad = dense
        ref.step()
        lazy.step(rows, g)
        assert torch.allclose(w, w_ref.detach(), atol=1e-6)


@pytest.mark.parametrize("name", ["adagrad", "rowwise-adagrad", "sparseadam", "sgd"])
def test_a_step_changes_exactly_the_rows_of_the_batch(name):
    from pipeline.training.optim import table_optimizer

    torch.manual_seed(0)
    m = PatchBagModel(100, 4, 3)
    before = m.table.weight.detach().clone()
    opt = table_optimizer(name, m.table.weight, 0.1)
    rows, offsets, counts = torch.tensor([1, 5, 7, 7, 9]), torch.tensor([0, 3, 5]), torch.tensor([1.0, 1, 1, 1, 2])
    logits, unique, sub = m.train().forward_rows(rows, offsets, counts)
    assert torch.allclose(logits, m(rows, offsets, counts), atol=1e-6)  # same function as the full-table forward
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    with torch.no_grad():
        opt.step(unique, sub.grad)
    changed = set(torch.nonzero((m.table.weight.detach() != before).any(1)).ravel().tolist())
    assert changed == {1, 5, 7, 9}


def test_rowwise_adagrad_against_a_hand_written_dense_step():
    """One accumulator per row, grown by the mean of the row's squared gradient; other rows untouched."""
    from pipeline.training.optim import LazyAdagrad

    torch.manual_seed(0)
    w0 = torch.randn(20, 6)
    w, acc = w0.clone(), torch.zeros(20)
    opt = LazyAdagrad(w0.clone(), lr=0.3, rowwise=True)
    for rows in (torch.tensor([2, 5, 11]), torch.tensor([5, 19]), torch.tensor([0, 2, 5])):
        g = torch.randn(len(rows), 6)
        opt.step(rows, g)
        for r, gr in zip(rows.tolist(), g):
            acc[r] += float((gr**2).sum()) / 6
            w[r] -= 0.3 * gr / (acc[r].sqrt() + 1e-10)
        assert torch.allclose(opt.weight, w, atol=1e-6)
        assert torch.allclose(opt.acc.ravel(), acc, atol=1e-6)
    assert opt.acc.shape == (20, 1)  # one number per row, not a second table


def _random_bags(rng: np.random.Generator, rows: int, images: int):
    from pipeline.training.bags import Bags

    parts = [np.unique(rng.integers(0, rows, rng.integers(1, 40))) for _ in range(images)]
    offsets = np.zeros(images + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    counts = rng.integers(1, 5, offsets[-1]).astype(np.float32)
    return Bags(np.concatenate(parts).astype(np.int64), offsets, counts, rng.integers(0, 3, images), int(offsets[-1]))


@pytest.mark.parametrize("drop,bag,optimizer", [
    (drop, bag, "adagrad") for drop in ("0", "0.3", "auto") for bag in ("mean", "sqrt")
] + [("0.3", "mean", "rowwise-adagrad"), ("auto", "sqrt", "rowwise-adagrad")])
def test_compiled_cpu_step_equals_the_torch_step(drop, bag, optimizer):
    """The compiled pool + grouped Adagrad (training/optim.py) against autograd + LazyAdagrad, step by step."""
    from pipeline.model import build_model
    from pipeline.training.loop import _fused_step, _optimizers, _torch_step

    cfg = TrainConfig(dim=8, bag=bag, drop=drop, hidden=5, lr=0.2, optimizer=optimizer)
    models, optims = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model(cfg, 700, 3)
        nn_init = torch.Generator().manual_seed(1)
        with torch.no_grad():
            m.table.weight.copy_(torch.randn(700, 8, generator=nn_init))
        models.append(m.train())
        optims.append(_optimizers(m, cfg))
    from pipeline.training.optim import cpu_table_step

    fused = cpu_table_step(optims[1][0], torch.device("cpu"))
    assert fused is not None
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    for step in range(6):
        b = _random_bags(rng, 700 if step % 2 else 300, 9)  # rows shared across images and steps
        torch.manual_seed(step)
        loss_t, logits_t, _ = _torch_step(models[0], optims[0], b, cpu, None)
        torch.manual_seed(step)
        loss_f, logits_f, _ = _fused_step(models[1], optims[1], b, cpu, fused)
        assert torch.allclose(logits_t, logits_f, atol=1e-5)
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
        assert torch.allclose(optims[0][0].acc, optims[1][0].acc, atol=1e-5)
    if drop == "auto":  # the learned rate moved, equally on both paths (compared with the parameters above)
        assert models[1].auto_drop.rate.item() != pytest.approx(0.1, abs=1e-6)


def test_group_rows_against_numpy():
    """Blocks of distinct rows: every occurrence once, in its row's block, rows ascending."""
    from pipeline.training.optim import _BLOCK, group_rows

    rng = np.random.default_rng(3)
    rows_total = 5000
    b = _random_bags(rng, rows_total, 60)
    b.rows[:5] = 4999  # the last word of the bitmap
    n = b.rows.size
    bits = np.zeros((rows_total + 63) // 64, np.uint64)
    prefix = np.zeros(bits.size, np.int64)
    uniq, bstart = np.empty(n, np.int64), np.empty(n // _BLOCK + 2, np.int64)
    ou, oi, ow = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32)
    nu = group_rows(b.rows, b.offsets, b.counts, bits, prefix, uniq, bstart, ou, oi, ow)
    assert np.array_equal(uniq[:nu], np.unique(b.rows))
    assert not bits.any()
    image = np.repeat(np.arange(60), np.diff(b.offsets))
    want = sorted(zip(np.searchsorted(uniq[:nu], b.rows).tolist(), image.tolist(), b.counts.tolist()))
    assert sorted(zip(ou.tolist(), oi.tolist(), ow.tolist())) == want
    for blk in range((nu + _BLOCK - 1) // _BLOCK):
        assert (ou[bstart[blk] : bstart[blk + 1]] // _BLOCK == blk).all()


def _image_bags(batches) -> list[tuple]:
    out = []
    for b in batches:
        for a in range(len(b.labels)):
            lo, hi = b.offsets[a], b.offsets[a + 1]
            out.append((int(b.labels[a]), tuple(b.rows[lo:hi].tolist()), tuple(b.counts[lo:hi].tolist())))
    return sorted(out)


def test_bag_cache_serves_every_training_image_once_as_read(digits_shards):
    from pipeline.training.bags import BagCache, shuffled_bags, to_bags, validation_bags

    sh = pipeline.open_shards(digits_shards)
    v = build(lambda: (k for k, _, _, _ in sh.part_batches(False, 0.1)), 2, 0)
    direct = _image_bags(to_bags(v, k, y, w) for k, y, _, w in sh.part_batches(False, 0.1))
    cache = BagCache(1 << 30, sh.keys_per_image)
    streamed = _image_bags(shuffled_bags(sh, v, 0.1, 32, np.random.default_rng(0), cache))
    assert cache.seal() and cache.images == len(direct)
    assert streamed == direct
    first, second = (list(cache.batches(32, np.random.default_rng(s))) for s in (1, 2))
    assert _image_bags(first) == _image_bags(second) == direct
    assert [b.labels.tolist() for b in first] != [b.labels.tolist() for b in second]  # a fresh order each epoch
    # validation: read once into its cache, then served from it, same bags
    vcache = BagCache(1 << 30, sh.keys_per_image)
    read = _image_bags(validation_bags(sh, v, 0.1, 50, vcache))
    assert vcache.complete and _image_bags(validation_bags(sh, v, 0.1, 50, vcache)) == read
    assert read == _image_bags(to_bags(v, k, y, w) for k, y, _, w in sh.part_batches(True, 0.1))


def test_bag_cache_over_budget_is_dropped_and_training_streams(digits_shards, tmp_path):
    from pipeline.training.bags import BagCache, shuffled_bags

    sh = pipeline.open_shards(digits_shards)
    v = build(lambda: (k for k, _, _, _ in sh.part_batches(False, 0.1)), 2, 0)
    cache = BagCache(20_000, sh.keys_per_image)
    list(shuffled_bags(sh, v, 0.1, 32, np.random.default_rng(0), cache))
    assert not cache.seal() and cache.overflow and cache.nbytes == 0 and not cache.groups
    cfg = TrainConfig(epochs=2, dim=8)
    pipeline.train(sh, tmp_path / "cached", cfg)
    pipeline.train(sh, tmp_path / "streamed", TrainConfig(epochs=2, dim=8, cache_mb=0))
    cached, streamed = _metrics(tmp_path / "cached"), _metrics(tmp_path / "streamed")
    assert cached[0]["cached_mb"] > 0 and streamed[0]["cached_mb"] == 0
    drop = ("cached_mb",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in (cached[0], streamed[0])]
    assert strip[0] == strip[1]  # the first epoch reads the shards either way
    assert cached[1]["train_images"] == streamed[1]["train_images"]


@pytest.mark.slow
def test_two_process_training_matches_one_process(tmp_path, monkeypatch):
    """torchrun with 2 processes (DDP, gloo) against 1 process of the same path, same epochs:
    test accuracy within 1 point, and the run directory is complete and loads; a second launch
    into the finished run is refused before any process starts."""
    from pipeline.training import ddp

    pipeline.extract(pipeline.open_source("digits"), tmp_path / "s", images_per_shard=100)  # 9 row groups to share out
    cfg = TrainConfig(patience=0)  # the defaults, never stopping early (so both sides run the same epochs): 5 of dim 64
    m2 = ddp.launch(tmp_path / "s", tmp_path / "r2", cfg, 2)
    m1 = ddp.launch(tmp_path / "s", tmp_path / "r1", cfg, 1)
    assert m2["processes"] == 2 and m1["processes"] == 1 and m2["epochs_run"] == m1["epochs_run"] == 5
    test = pipeline.open_source("digits", split="test")
    a2, a1 = pipeline.load(tmp_path / "r2").evaluate(test)["accuracy"], pipeline.load(tmp_path / "r1").evaluate(test)["accuracy"]
    assert a1 > 0.85 and abs(a2 - a1) <= 0.01, (a1, a2)
    rows = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and all(r["train_images"] == rows[0]["train_images"] for r in rows)
    monkeypatch.setattr(ddp, "_launch", lambda *a: pytest.fail("torchrun was started for a run directory it refuses"))
    with pytest.raises(ParameterError, match="already holds a finished run"):
        ddp.launch(tmp_path / "s", tmp_path / "r2", cfg, 2)


def _descendants(pid: int) -> list[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        kids = [c for c, p in parent.items() if p == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


@pytest.mark.slow
def test_two_process_run_resumes_after_a_kill_to_the_uninterrupted_metrics(digits_shards, tmp_path):
    """Rank 0 checkpoints every epoch; killing the whole torchrun group after the first checkpoint
    and resuming with the same --nproc gives the metrics and model of an uninterrupted 2-process run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(digits_shards, killed, "--nproc", "2"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoint.pt").exists():
        time.sleep(0.01)
    for pid in [*_descendants(proc.pid), proc.pid]:  # the ranks run in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "run.json").exists()
    r = subprocess.run(_train_cmd(digits_shards, killed, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "trained by 2 processes; resume it with --nproc 2" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(_train_cmd(digits_shards, killed, "--resume", "--nproc", "3"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith("trained by 2 processes; resume it with --nproc 2"), r.stderr
    r = subprocess.run(_train_cmd(digits_shards, killed, "--resume", "--nproc", "2"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean"
    r = subprocess.run(_train_cmd(digits_shards, clean, "--nproc", "2"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got, want = _metrics(killed), _metrics(clean)
    assert [m["epoch"] for m in want] == [1, 2, 3, 4, 5, 6] and got == want
    a = weights.load(killed / layout.WEIGHTS, "")
    b = weights.load(clean / layout.WEIGHTS, "")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_count_training_is_what_an_epoch_trains_on(digits_shards, tmp_path):
    sh = pipeline.open_shards(digits_shards)
    m = pipeline.train(sh, tmp_path / "r", TrainConfig(epochs=1, dim=8))
    assert sh.count_training(TrainConfig().val_fraction) == m["final"]["train_images"]


def test_a_tie_on_accuracy_goes_to_the_lower_validation_loss(tmp_path):
    """Hand-made epochs: the second ties the first's accuracy with a lower loss and is kept; the
    third ties with a higher loss and is not; the fourth is worse; the fifth is better."""
    from pipeline.training.loop import record_epoch

    model = PatchBagModel(rows=2, dim=2, num_classes=2)
    best, stale, history = {"epoch": 0, "val_accuracy": -1.0}, 0, []
    kept = []
    for epoch, (acc, loss) in enumerate([(0.9, 0.5), (0.9, 0.3), (0.9, 0.4), (0.8, 0.1), (0.95, 0.6)], start=1):
        best, stale = record_epoch(tmp_path, model, {"epoch": epoch, "val_accuracy": acc, "val_loss": loss}, history, best, stale)
        kept.append((best["epoch"], stale))
    assert kept == [(1, 0), (2, 0), (2, 1), (2, 2), (5, 0)]


def test_the_automatic_batch_size():
    from pipeline.config import auto_batch

    assert [auto_batch(n) for n in (0, 100, 800, 4096, 4127, 100_000)] == [8, 8, 25, 128, 128, 128]
    assert TrainConfig().resolved(808, False).batch_size == 25 and TrainConfig(batch_size=64).resolved(808, False).batch_size == 64


def test_the_automatic_lr_and_drop_follow_the_code():
    """lr 0 and drop 'image' become 0.3 and 0.3 on shards whose code is large, 1.0 and 0 otherwise;
    given values are kept; an unresolved 'image' cannot build a model."""
    large, plain = TrainConfig().resolved(None, True), TrainConfig().resolved(None, False)
    assert (large.lr, large.drop, large.drop_rate, large.batch_size) == (0.3, "0.3", 0.3, 0)
    assert (plain.lr, plain.drop, plain.drop_rate) == (1.0, "0", 0.0)
    given = TrainConfig(lr=0.5, drop="auto").resolved(None, True)
    assert (given.lr, given.drop) == (0.5, "auto")
    assert TrainConfig(drop="0.1").resolved(None, True).drop == "0.1"
    with pytest.raises(PipelineError, match="still 'image'"):
        TrainConfig().drop_rate
    with pytest.raises(ParameterError, match="'image'"):
        TrainConfig(drop="often")


def test_a_digits_run_records_its_resolved_lr_and_drop(digits_run):
    """Digits (8x8 gray: a 4x4 code of 16 values) train with lr 1.0 and no patch dropout, and run.json
    records the values used, so a step from it keeps them."""
    cfg = json.loads((digits_run / "run.json").read_text())["train_config"]
    assert (cfg["lr"], cfg["drop"]) == (1.0, "0")


def test_a_small_held_out_part_is_warned_about(digits_shards, tmp_path, caplog):
    """About 180 digits images are held out: the run says the epoch choice rests on them, once; with
    --val-fraction 0 nothing is held out and nothing is said."""
    import logging

    from pipeline.training.loop import FEW_HELD_OUT

    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        m = pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "a", TrainConfig(epochs=2, dim=8))
    n = m["final"]["val_images"]
    assert 0 < n < FEW_HELD_OUT
    said = [r.getMessage() for r in caplog.records if "held-out images choose the best epoch" in r.getMessage()]
    assert said == [f"only {n} held-out images choose the best epoch (one image is {100 / n:.2f} points of accuracy), "
                    "so the choice is mostly noise: raise `val_fraction` (now 0.1) if there are images to spare"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "b", TrainConfig(epochs=1, dim=8, val_fraction=0))
    assert not [r for r in caplog.records if "held-out" in r.getMessage()]


def test_a_refit_is_the_run_trained_on_every_image_for_the_chosen_epochs(digits_shards, tmp_path, monkeypatch):
    """About 180 held-out digits images: the run chooses its epoch count on them, then trains again on
    every image. Reference: a run started with --val-fraction 0 and that many epochs (same batch size,
    seed and settings), whose vocabulary and weights must be the refit's bit for bit. Its held-out
    part is gone, so scoring it is refused; --refit off keeps it; a refit killed half-way starts again."""
    from pipeline.training import loop

    sh = pipeline.open_shards(digits_shards)
    m = pipeline.train(sh, tmp_path / "a", TrainConfig(epochs=3, dim=8))
    e = m["best_epoch"]
    assert m["refit"]["epochs"] == e and m["refit"]["images"] == sh.count_training(0.0) > m["final"]["train_images"]
    ref = pipeline.train(sh, tmp_path / "b", TrainConfig(epochs=e, dim=8, val_fraction=0.0, refit="off", batch_size=m["train_config"]["batch_size"]))
    assert ref["refit"] is None
    assert (tmp_path / "a" / layout.VOCAB).read_bytes() == (tmp_path / "b" / layout.VOCAB).read_bytes()
    a, b = weights.load(tmp_path / "a" / layout.WEIGHTS, ""), weights.load(tmp_path / "b" / layout.WEIGHTS, "")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(PipelineError, match="trained again on every image"):
        pipeline.load(tmp_path / "a").evaluate(sh, validation=True)

    off = pipeline.train(sh, tmp_path / "c", TrainConfig(epochs=1, dim=8, refit="off"))
    assert off["refit"] is None and pipeline.load(tmp_path / "c").evaluate(sh, validation=True)["n"] == off["final"]["val_images"]

    real = loop.finish_run
    monkeypatch.setattr(loop, "finish_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(sh, tmp_path / "d", TrainConfig(epochs=3, dim=8))
    monkeypatch.setattr(loop, "finish_run", real)
    with pytest.raises(PipelineError, match="no checkpoint to resume from"):
        pipeline.train(sh, tmp_path / "d", TrainConfig(epochs=3, dim=8), resume=True)
    again = pipeline.train(sh, tmp_path / "d", TrainConfig(epochs=3, dim=8))
    d = weights.load(tmp_path / "d" / layout.WEIGHTS, "")
    assert again["refit"] == m["refit"] and all(np.array_equal(a[k], d[k]) for k in a)
