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
from pipeline import PipelineError, TrainConfig
from pipeline.model import PatchBagModel
from pipeline.vocab import KeyCounter, build

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
def test_vocabulary_rows_buckets_and_bags(buckets):
    batches = _random_key_batches(1)
    v = build(iter(batches), min_count=3, buckets=buckets)
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
    m = pipeline.train(pipeline.open_shards(digits_shards), tmp_path / "r", TrainConfig(epochs=30, dim=8, patience=2, lr=0.2))
    rows = _metrics(tmp_path / "r")
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -i))
    assert m["epochs_run"] == len(rows) < 30 and len(rows) - 1 - best == 2
    assert m["best_epoch"] == rows[best]["epoch"] and m["final"]["val_accuracy"] == rows[best]["val_accuracy"]
    run = pipeline.load(tmp_path / "r")
    res = run.evaluate(pipeline.open_shards(digits_shards))
    assert res["n"] == 898


def _train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", str(shards), "--out", str(out), "--epochs", "6", "--dim", "8", *extra]


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
    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(clean / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_finished_runs(digits_shards, tmp_path):
    sh = pipeline.open_shards(digits_shards)
    pipeline.train(sh, tmp_path / "r", TrainConfig(epochs=1, dim=8))
    with pytest.raises(PipelineError, match="holds a finished run"):
        pipeline.train(sh, tmp_path / "r", TrainConfig(epochs=2, dim=8), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no checkpoint to resume from"):
        pipeline.train(sh, tmp_path / "empty", TrainConfig(epochs=2, dim=8), resume=True)


def test_lazy_adagrad_equals_torch_adagrad_on_the_touched_rows():
    from pipeline.optim import LazyAdagrad

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


@pytest.mark.parametrize("name", ["adagrad", "sparseadam", "sgd"])
def test_a_step_changes_exactly_the_rows_of_the_batch(name):
    from pipeline.optim import table_optimizer

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
